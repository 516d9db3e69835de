"""Headless Chromium for the page's tests and benchmark: Debian's browser, driven by Playwright
(no browser download), and ``kws serve`` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
# Without the background-networking switches Chromium keeps calling Google's hosts, which a
# closed network refuses; --no-sandbox because tests may run as root.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> Optional[str]:
    """``$KWS_CHROMIUM``, else Chromium on the PATH."""
    return os.environ.get("KWS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install 'kws-toolkit[dev]')"
    if chromium_path() is None:
        return "Chromium is not installed (apt install chromium, or set KWS_CHROMIUM)"
    return ort_web_missing()


def ort_web_missing() -> Optional[str]:
    """Why ``kws serve`` cannot serve the page here (onnxruntime-web's files absent), or None."""
    from kws_runtime.serve import ServeError, find_ort_web

    try:
        find_ort_web()
    except ServeError as exc:
        return str(exc)
    return None


def fake_microphone_args(wav: Path) -> list:
    """Chromium plays ``wav`` (in a loop) as the microphone and grants access without asking."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}"]


@contextlib.contextmanager
def kws_serve(bundle, *options):
    """``kws serve BUNDLE --port 0 OPTIONS`` in a subprocess; yields the page's URL."""
    command = [sys.executable, "-m", "kws_runtime.cli", "serve", str(bundle), "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        found = re.search(r"(http://\S+)", line)
        if not found:
            process.kill()
            raise RuntimeError(f"kws serve did not start: {line}{process.stderr.read()}")
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(timeout=10)


def open_page(browser, url: str, permissions=(), timeout_ms: int = 60_000):
    """A new page at ``url`` once its model is loaded (``window.kws.ready``); page errors fail."""
    context = browser.new_context(permissions=list(permissions))
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_function("window.kws && (window.kws.ready || window.kws.error)", timeout=timeout_ms)
    problem = page.evaluate("window.kws.error")
    if problem or errors:
        raise AssertionError(f"the page failed to start: {problem or errors}")
    return page


def ort_web_dir() -> Path:
    """onnxruntime-web's files, as ``kws serve`` finds them."""
    from kws_runtime.serve import find_ort_web

    return find_ort_web()

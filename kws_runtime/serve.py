"""``kws serve``: a bundle in the browser, served from this machine.

    kws serve BUNDLE [--port P] [--host H] [--artifact NAME] [--ort-dir DIR] [--threshold T] ...

The page (``kws_runtime/web/``) runs the bundle's end-to-end ONNX model (waveform in,
probabilities out) with onnxruntime-web's WebAssembly backend and the same detection as
`kws_runtime.stream.Detector`, with the detector settings this server hands it in
``config.json`` (`DetectorConfig`, the bundle's ``detector`` entry, the options: the same
resolution as ``kws stream``). Nothing is fetched from elsewhere at run time: onnxruntime-web's
files come from the npm package installed under ``web/`` (``npm ci --prefix web``).

The server is the standard library's, bound to localhost by default: the page needs a secure
context for the microphone, which browsers grant to ``localhost`` over plain HTTP. It sends
the cross-origin isolation headers, so onnxruntime-web may use threads (``?threads=N``).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import os
import sys
import threading
from pathlib import Path
from typing import Optional

from . import exit_codes
from .bundle import Artifact, Bundle, load_bundle
from .stream import QUIET_LABELS, DetectorConfig
from .stream_cli import detector_config, detector_options

PAGE_DIR = Path(__file__).resolve().parent / "web"
# The page's own files, by URL path.
PAGE_FILES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/app.js": "app.js",
    "/detector.js": "detector.js",
    "/capture-worklet.js": "capture-worklet.js",
    "/style.css": "style.css",
}
# The WebAssembly build of onnxruntime-web the page imports (single file set, SIMD, threads
# when cross-origin isolated); the rest of the npm package is never served.
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ORT_ENV = "KWS_ORT_WEB"
_CHECKOUT_ORT = Path(__file__).resolve().parent.parent / "web" / "node_modules" / "onnxruntime-web" / "dist"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream"}


class ServeError(ValueError):
    """The page cannot be served: the message says what is missing and how to get it."""


def find_ort_web(ort_dir=None) -> Path:
    """The folder holding `ORT_FILES`: ``ort_dir``, else ``$KWS_ORT_WEB``, else the checkout's
    ``web/node_modules/onnxruntime-web/dist``, else ``./web/node_modules/onnxruntime-web/dist``.

    Raises:
        ServeError: none of them has the files.
    """
    if ort_dir is not None or os.environ.get(ORT_ENV):
        candidates = [Path(ort_dir if ort_dir is not None else os.environ[ORT_ENV])]
    else:
        candidates = [_CHECKOUT_ORT, Path.cwd() / "web" / "node_modules" / "onnxruntime-web" / "dist"]
    for folder in candidates:
        if all((folder / name).is_file() for name in ORT_FILES):
            return folder
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ServeError(
        f"onnxruntime-web not found (looked in {looked}): run 'npm ci --prefix web' in the repository, "
        f"or pass --ort-dir (or set {ORT_ENV}) to a folder with {', '.join(ORT_FILES)}"
    )


def choose_e2e(bundle: Bundle, name: Optional[str] = None) -> Artifact:
    """The end-to-end ONNX artifact the page runs: ``name``, else the int8 one, else the fp32 one."""
    waveform = {n: a for n, a in bundle.artifacts.items() if a.format == "onnx" and a.input_kind == "waveform"}
    if name is not None:
        if name not in waveform:
            raise ServeError(f"{bundle.path}: {name!r} is not an end-to-end ONNX artifact of this bundle "
                             f"(those are: {', '.join(waveform) or 'none'})")
        return waveform[name]
    if not waveform:
        raise ServeError(f"{bundle.path}: has no end-to-end ONNX artifact (waveform in); "
                         "export one with kws-export --formats onnx_e2e_int8 (or onnx_e2e)")
    return sorted(waveform.values(), key=lambda a: (a.precision != "int8", a.name))[0]


def page_config(bundle: Bundle, artifact: Artifact, config: DetectorConfig) -> dict:
    """What the page reads from ``config.json``: the model's ports and the detection settings."""
    return {
        "bundle": bundle.name,
        "model": "model.onnx",
        "artifact": artifact.name,
        "precision": artifact.precision,
        "input_name": artifact.input_name,
        "output_name": artifact.output_name,
        "labels": list(bundle.labels),
        "sample_rate": bundle.spec.sample_rate,
        "clip_samples": bundle.spec.clip_samples,
        "quiet_labels": list(QUIET_LABELS),
        "detector": dataclasses.asdict(config),
    }


class PageServer(http.server.ThreadingHTTPServer):
    """Serves the page, onnxruntime-web's files, the model and ``config.json``; nothing else.

    Every file is read when the server starts (the model checked against the manifest's
    sha256 as read) and served from memory: no request can name a path, and what the page
    gets is what was checked.
    """

    daemon_threads = True

    def __init__(self, bundle: Bundle, config: DetectorConfig, host: str = "127.0.0.1", port: int = 8000,
                 artifact: Optional[str] = None, ort_dir=None):
        ort = find_ort_web(ort_dir)
        self.artifact = choose_e2e(bundle, artifact)
        files = {url: PAGE_DIR / name for url, name in PAGE_FILES.items()}
        files.update({f"/ort/{name}": ort / name for name in ORT_FILES})
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise ServeError(f"the page's files are missing ({', '.join(missing)}): reinstall kws-toolkit")
        # {url: (body, content type)}
        self.files = {url: (path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"))
                      for url, path in files.items()}
        self.files["/model.onnx"] = (self.artifact.read(), _TYPES[".onnx"])
        config_json = json.dumps(page_config(bundle, self.artifact, config), indent=1).encode()
        self.files["/config.json"] = (config_json, _TYPES[".json"])
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/"

    def start(self) -> threading.Thread:
        """Serve from a background thread (for tests and benchmarks); `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, name="kws-serve", daemon=True)
        thread.start()
        return thread


class _Handler(http.server.BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self):
        self._reply(send_body=True)

    def do_HEAD(self):
        self._reply(send_body=False)

    def _reply(self, send_body: bool) -> None:
        found = self.server.files.get(self.path.split("?", 1)[0])
        if found is None:
            self.send_error(404, "not part of the page")
            return
        body, kind = found
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        # cross-origin isolation: SharedArrayBuffer, hence onnxruntime-web's threads
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # one line per request would drown the page's address


def add_command(commands) -> None:
    """Add ``serve`` to the ``kws`` subcommands."""
    serve = commands.add_parser("serve", help="run a bundle in the browser",
                                description="Serve a web page that finds keywords with the bundle's end-to-end "
                                "model in the browser (onnxruntime-web), from the microphone or a WAV file.")
    serve.add_argument("bundle", metavar="BUNDLE", help="model bundle folder with an end-to-end ONNX artifact")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; browsers allow the microphone only on localhost "
                       "or over HTTPS)")
    serve.add_argument("--artifact", metavar="NAME", help="end-to-end artifact (default onnx_e2e_int8, else onnx_e2e)")
    serve.add_argument("--ort-dir", metavar="DIR", help=f"onnxruntime-web's dist folder (default: ${ORT_ENV}, "
                       "else web/node_modules/onnxruntime-web/dist)")
    detector_options(serve)
    serve.set_defaults(run=_serve)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _serve(args) -> int:
    bundle = load_bundle(args.bundle)
    try:
        server = PageServer(bundle, detector_config(bundle, args), args.host, args.port, args.artifact, args.ort_dir)
    except OSError as exc:
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    print(f"serving {server.artifact.name} of {bundle.path} at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return exit_codes.OK

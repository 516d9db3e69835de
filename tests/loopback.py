"""LoopbackServer, an HTTP server on 127.0.0.1 with Range support, and build_archive, a dataset tar.gz of real clips."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from pathlib import Path

TEST_WORDS = ("yes", "no", "left")
CLIPS_PER_WORD = 4


class LoopbackServer:
    """Serves ``files`` (name -> bytes) with Range support; can drop a response mid-body."""

    def __init__(self, files: dict):
        self.files = dict(files)
        self.requests: list = []  # (path, Range header or None, body bytes sent)
        self.drop_at: int | None = None  # byte offset at which the next full body is cut
        self.ignore_range = False
        self.send_length = True  # False: no Content-Length header, the body ends with the connection
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                if name not in server.files:
                    server.requests.append((name, rng, 0))
                    self.send_error(404, "Not Found")
                    return
                data = server.files[name]
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        server.requests.append((name, rng, 0))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                if server.send_length:
                    self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drop_at is not None and start < server.drop_at:
                    body = body[: server.drop_at - start]
                    server.drop_at = None  # once
                # recorded before the body goes out: a client that has read it finds it listed
                server.requests.append((name, rng, len(body)))
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def build_archive(real_data: Path, extra: list | None = None) -> tuple[bytes, dict]:
    """A tar.gz in the official archive's layout (``./word/file.wav`` + lists) from real clips.

    Returns the archive bytes and {relative path: file bytes} of what it holds.
    """
    members = {}
    for word in TEST_WORDS:
        for path in sorted((real_data / word).glob("*.wav"))[:CLIPS_PER_WORD]:
            members[f"{word}/{path.name}"] = path.read_bytes()
    names = sorted(members)
    members["validation_list.txt"] = (names[0] + "\n").encode()
    members["testing_list.txt"] = (names[1] + "\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo("./" + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra or []:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue(), members

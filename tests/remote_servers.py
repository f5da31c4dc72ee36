"""Real servers on 127.0.0.1 for the sharing tests: a static HTTP server that honours Range
requests (as nginx, Apache, S3 and GCS do; Python's http.server does not), one that fails chosen
requests (503 answers or dropped connections) and then recovers, and moto's S3 server."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single byte ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n`)."""

    def log_message(self, *args):  # keep test output clean
        pass

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        if first == "":
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(size - 1, int(last) if last else size - 1)
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._range_left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        left = getattr(self, "_range_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(left))
        self._range_left = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(handler_class, directory: Path):
    handler = functools.partial(handler_class, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def http_server(directory: Path):
    """Serve `directory` read-only at http://127.0.0.1:PORT in a thread."""
    with _serve(RangeRequestHandler, directory) as base:
        yield base


class FaultPlan:
    """How many of the next requests a flaky server fails, and how: 'status' answers 503, 'drop' closes
    the connection without an answer."""

    def __init__(self):
        self.left, self.mode, self.failed = 0, "status", 0
        self._lock = threading.Lock()

    def fail_next(self, count: int, mode: str = "status") -> None:
        with self._lock:
            self.left, self.mode = count, mode

    def take(self) -> str | None:
        with self._lock:
            if self.left <= 0:
                return None
            self.left -= 1
            self.failed += 1
            return self.mode


class FlakyRangeRequestHandler(RangeRequestHandler):
    """RangeRequestHandler that fails the requests its FaultPlan asks for, then serves normally."""

    plan: FaultPlan

    def do_GET(self):
        mode = self.plan.take()
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "status":
            return self._unavailable()
        super().do_GET()

    def do_HEAD(self):
        if self.plan.take() is not None:
            return self._unavailable()
        super().do_HEAD()

    def _unavailable(self):
        self.send_response(503, "Service Unavailable")
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def flaky_http_server(directory: Path):
    """Like http_server, but yields (url, FaultPlan): requests fail as the plan says, then recover."""
    plan = FaultPlan()
    with _serve(type("Handler", (FlakyRangeRequestHandler,), {"plan": plan}), directory) as base:
        yield base, plan


def down_url() -> str:
    """The URL of a server that is down: a port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def s3_server():
    """moto's S3-compatible server in its own process; yields (endpoint_url, storage_options)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        yield endpoint, options
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload_dir(local: Path, bucket_url: str, storage_options: dict) -> None:
    """Copy an archive directory to s3://bucket/prefix with s3fs."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    bucket = bucket_url.removeprefix("s3://").split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(local), bucket_url.removeprefix("s3://"), recursive=True)

"""Hostile HTTP clients on raw sockets, and the ingress replica's memory and log: shared by tests/test_serve.py
and scripts/bench_abuse.py (loopback only)."""

from __future__ import annotations

import select
import socket
import threading
import time
from pathlib import Path


def upload_header(port: int, length: int, headers: dict[str, str] | None = None, path: str = "/geolocate") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: image/jpeg",
             f"Content-Length: {length}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def slow_uploads(port: int, clients: int, bound_s: float, every_s: float = 1.0, length: int = 1000,
                 headers: dict[str, str] | None = None) -> dict[int, tuple[str, float]]:
    """``clients`` connections each declaring a ``length``-byte body and sending one byte every ``every_s``;
    ``{client: (HTTP status or what ended it, seconds)}`` for those that ended within ``bound_s``."""
    header = upload_header(port, length, headers)
    socks = []
    for _ in range(clients):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(header)
        s.setblocking(False)
        socks.append(s)
    start, next_byte = time.monotonic(), time.monotonic() + every_s
    ended: dict[int, tuple[str, float]] = {}
    try:
        while len(ended) < clients and time.monotonic() - start < bound_s:
            waiting = {s.fileno(): i for i, s in enumerate(socks) if i not in ended}
            readable, _, _ = select.select([socks[i] for i in waiting.values()], [], [], 0.05)
            for s in readable:
                try:
                    first = s.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError as exc:
                    first = f"reset ({type(exc).__name__})"
                status = first.split(" ")[1] if first.startswith("HTTP/") else (first or "closed")
                ended[waiting[s.fileno()]] = (status, time.monotonic() - start)
                s.close()
            if time.monotonic() >= next_byte:
                next_byte += every_s
                for i, s in enumerate(socks):
                    if i not in ended:
                        try:
                            s.send(b"x")
                        except OSError:
                            pass  # closed by the server: its answer is read above
    finally:
        for s in socks:
            s.close()
    return ended


def cut_uploads(port: int, clients: int, headers: dict[str, str] | None = None, sent: int = 50_000) -> None:
    """``clients`` uploads, one after another, that send ``sent`` bytes of a larger body and hang up."""
    header = upload_header(port, 4 * sent, headers)
    for _ in range(clients):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(header + b"\xff" * sent)
            time.sleep(0.2)  # the body read has begun


def ingress_process(app: str):
    """The psutil process of the app's ingress replica (Ray titles actor processes
    ``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if cmd and cmd[0].startswith(f"ray::ServeReplica:{app}:Ingress"):
            return proc
    raise RuntimeError(f"no ingress replica process of the Serve app '{app}'")


def ingress_log(app: str) -> Path:
    """The app's ingress replica log in this driver's Ray session."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = sorted((session / "logs" / "serve").glob(f"replica_{app}_Ingress_*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise RuntimeError(f"no ingress replica log of the Serve app '{app}' under {session}")
    return logs[-1]


def ended(log_text: str) -> int:
    """Requests that Serve's access log shows as ended by their client: CANCELLED, or the ingress's 499."""
    return log_text.count("CANCELLED") + log_text.count(" 499 ")


def log_since(path: Path, mark: int, done, timeout_s: float = 15.0) -> str:
    """What was written to ``path`` after byte ``mark``, read again until ``done(text)`` or ``timeout_s``."""
    deadline, text = time.monotonic() + timeout_s, ""
    while True:
        with open(path, "rb") as fh:
            fh.seek(mark)
            text = fh.read().decode("utf-8", "replace")
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


class RssPeak:
    """The peak RSS of a process while the ``with`` block runs (sampled every 20 ms); ``growth`` above its start."""

    def __init__(self, proc):
        self.proc, self.base = proc, proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base

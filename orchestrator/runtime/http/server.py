"""Run the app under uvicorn in a background thread, with a handle to stop it.

The server owns its own asyncio event loop in that thread; the backend's
per-request async work runs on that loop. ``port=0`` picks a free port; the
handle tells which.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI


@dataclass
class ServerHandle:
    """A running server: its address, and ``stop()`` to shut it down."""

    host: str
    port: int
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server thread is still alive."""
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let open requests end (up to ``timeout_s``), then return."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_s)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C in the caller's thread stops waiting)."""
        while self._thread.is_alive():
            self._thread.join(0.5)


def serve(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
    startup_timeout_s: float = 30.0,
) -> ServerHandle:
    """Start ``app`` on ``host:port`` (0: any free port) and return once it accepts connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    bound_port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5, access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"pdserve-http-{bound_port}",
                              daemon=True)
    thread.start()
    deadline_s = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"the HTTP server on {host}:{bound_port} exited during startup")
        if time.monotonic() > deadline_s:
            server.should_exit = True
            raise TimeoutError(f"the HTTP server on {host}:{bound_port} did not start in {startup_timeout_s} s")
        time.sleep(0.01)
    return ServerHandle(host, bound_port, server, thread)

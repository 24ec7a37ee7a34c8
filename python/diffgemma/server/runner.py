"""`Server`: uvicorn serving `create_app(model)`, blocking (the command line) or on a background thread (tests,
notebooks), with a graceful stop on Ctrl-C / SIGTERM."""

import asyncio
import copy
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import uvicorn
import uvicorn.config

from ..errors import Error
from ..model import Model
from .app import create_app
from .auth import api_keys
from .defaults import MAX_BATCH
from .engine import Engine


def _log_config() -> dict:
    """uvicorn's logging, with the access log on stderr beside the server's other lines (uvicorn sends it to
    stdout): `diffgemma serve 2> server.log` keeps the whole story in one place."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


class _Uvicorn(uvicorn.Server):
    """uvicorn, which on shutdown waits for open responses; after `grace` seconds the engine ends them itself (a
    503 error event / response), so they close cleanly instead of being cancelled mid-write."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    async def shutdown(self, sockets: Any = None) -> None:
        asyncio.get_running_loop().call_later(self.grace, self.engine.abort)
        await super().shutdown(sockets)


class Server:
    """uvicorn serving `create_app(model)`: `run()` blocks (Ctrl-C / SIGTERM stop it gracefully); `start()` runs
    it on a background thread (tests, notebooks) until `stop()`. port=0 picks a free port (see `.port`).
    api_key (one key, several separated by commas, or a list) and api_key_file (one key a line): requests must
    carry one of them (server.auth). access_log: one line per request on stderr, in uvicorn's format."""

    def __init__(self, model: Model, *, host: str = "127.0.0.1", port: int = 8080, queue_size: int = 16,
                 model_name: str | None = None, log_level: str = "info", shutdown_timeout: float = 10.0,
                 reasoning_format: str = "auto", max_batch: int = MAX_BATCH,
                 api_key: str | Iterable[str] | None = None, api_key_file: str | os.PathLike | None = None,
                 access_log: bool = True):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise Error(f"port must be in 0..65535, got {port!r}")
        self.app = create_app(model, queue_size=queue_size, model_name=model_name, reasoning_format=reasoning_format,
                              max_batch=max_batch, api_key=api_keys(api_key, api_key_file))
        self.host = host
        self._sock = self._bind(host, port)
        self.port = self._sock.getsockname()[1]
        # uvicorn's own limit is only a backstop, for responses that ignore the abort.
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="on", log_config=_log_config(),
                                access_log=access_log, timeout_graceful_shutdown=shutdown_timeout + 5)
        self._uv = _Uvicorn(config, self.app.state.engine, shutdown_timeout)
        self._thread: threading.Thread | None = None

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        # Bound here, not by uvicorn: port 0 then tells us the real port, and "address in use" is our Error.
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)  # connections made before uvicorn's loop runs wait in the backlog, not refused
        except OSError as e:
            raise Error(f"cannot listen on {host}:{port}: {e}") from e
        sock.set_inheritable(True)
        return sock

    @property
    def url(self) -> str:
        """http://host:port"""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM, then finish open responses (up to shutdown_timeout) and return."""
        main = threading.current_thread() is threading.main_thread()
        # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler for that moment
        # turns a graceful stop into a normal return instead of a KeyboardInterrupt or a kill.
        saved = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            self._uv.run(sockets=[self._sock])
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
            self._sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve on a background thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [self._sock]},
                                        name="diffgemma-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise Error("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a server started with start() (open responses finish first, up to shutdown_timeout)."""
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()



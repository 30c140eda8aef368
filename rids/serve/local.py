"""A server on 127.0.0.1 in a background thread (tests, the load test, notebooks)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI


class LocalServer:
    """`with LocalServer(app) as s:` serves `app` at `s.url` on a free local port."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="rids-http", daemon=True)
        self.url = ""

    def __enter__(self) -> LocalServer:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the local server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

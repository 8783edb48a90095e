"""The dashboard served on a free local port from a background thread, for the browser tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from steptune.dashboard import create_app, open_read_only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(url: str, **app_options) -> Iterator[str]:
    """The dashboard of the database at ``url`` (read-only), until the block ends; yields its address."""
    import uvicorn

    store = open_read_only(url)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store, poll_seconds=0.5, **app_options), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the dashboard server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        store.close()

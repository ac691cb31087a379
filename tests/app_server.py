"""The app served in the test process on a free loopback port (for the browser and API tests)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from repo_scripts import REPO

SHIPPED = REPO / "checkpoints" / "tiny_synthetic_demo"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    url: str
    model: object  # the PromptRIS the app answers with
    answerer: object


@contextmanager
def served_app() -> Iterator[Served]:
    """The shipped model's app, served on 127.0.0.1 until the block ends."""
    from prompt_ris import PromptRIS
    from prompt_ris.app.answers import Answerer
    from prompt_ris.app.server import serve

    model = PromptRIS.from_pretrained(SHIPPED)
    answerer = Answerer(model)
    port = free_port()
    app = serve(answerer, host="127.0.0.1", port=port, block=False)
    try:
        yield Served(f"http://127.0.0.1:{port}/", model, answerer)
    finally:
        app.close()

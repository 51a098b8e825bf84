"""The bench client survives a server that closes idle keep-alive connections.

uvicorn (SGLang's HTTP server) closes a connection idle for 5 s; a client that reuses a
pooled connection at that moment sees ``ServerDisconnectedError`` and the bench counts a
failed request. The server here is the worst case of that race, made deterministic: it
answers the first request on a connection and drops the connection when a second one
arrives on it.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator

import pytest

from sglang_cacheflow.bench.sglang.client import replay
from sglang_cacheflow.bench.workloads import Session, Turn

BODY = b'data: {"output_ids": [7], "meta_info": {"cached_tokens": 0}}\n\ndata: [DONE]\n\n'


class _OneRequestPerConnection(socketserver.StreamRequestHandler):
    reused = 0

    def _read_request(self) -> bool:
        length = 0
        line = self.rfile.readline()
        if not line:
            return False
        while line not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            line = self.rfile.readline()
        self.rfile.read(length)
        return True

    def handle(self) -> None:
        if not self._read_request():
            return
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        )
        self.wfile.write(head.encode() + BODY)
        self.wfile.flush()
        if self._read_request():  # a reused connection: drop it as a closing server would
            type(self).reused += 1


@pytest.fixture
def server_url() -> Iterator[str]:
    _OneRequestPerConnection.reused = 0
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _OneRequestPerConnection) as srv:
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{srv.server_address[1]}"
        srv.shutdown()


def test_rounds_never_reuse_a_connection_the_server_may_be_closing(server_url: str) -> None:
    sessions = [
        Session(f"s{i}", [Turn((1, 2, 3), 1, False), Turn((1, 2, 3, 4), 1, True)]) for i in range(3)
    ]
    results = replay(server_url, sessions, concurrency=3)
    assert [r.error for r in results] == [""] * 6
    assert all(r.output_ids == [7] for r in results)
    assert _OneRequestPerConnection.reused == 0

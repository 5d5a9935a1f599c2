"""A TCP relay in front of the S3 server that records the HTTP requests and responses it carries.

Claims like "an object over the limit is not downloaded" or "a read stops at max_bytes + 1"
are about what crosses the wire, so the tests look at the wire: each request's method, path
and Range header, and each response's status and body length (Content-Length), in order.
Plain HTTP/1.1 with keep-alive only (what SeaweedFS and the S3 clients speak in the tests).
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import unquote

_HEAD_END = b"\r\n\r\n"


@dataclass
class Exchange:
    method: str
    path: str  # unquoted, without the query string
    query: str
    range: Optional[str]
    status: Optional[int] = None
    body_bytes: Optional[int] = None


@dataclass
class _Parser:
    """Splits one direction of a connection into messages (head + Content-Length body)."""

    buf: bytes = b""
    skip: int = 0
    heads: list = field(default_factory=list)

    def feed(self, data: bytes) -> list[tuple[str, dict, int]]:
        out = []
        self.buf += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                self.buf, self.skip = self.buf[n:], self.skip - n
                if self.skip:
                    return out
            i = self.buf.find(_HEAD_END)
            if i < 0:
                return out
            head, self.buf = self.buf[:i].decode("latin-1"), self.buf[i + 4:]
            first, *lines = head.split("\r\n")
            headers = {}
            for ln in lines:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            out.append((first, headers, length))
            self.skip = length


class HttpTap:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def requests_for(self, key_suffix: str, method: str = "GET") -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.method == method and e.path.endswith(key_suffix)]

    def close(self) -> None:
        self._closed = True
        self.server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            pending: list[Exchange] = []
            threading.Thread(target=self._pump, args=(client, upstream, True, pending), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, pending), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, is_request: bool, pending: list) -> None:
        parser = _Parser()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                for first, headers, length in parser.feed(data):
                    self._record(first, headers, length, is_request, pending)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _record(self, first: str, headers: dict, length: int, is_request: bool, pending: list) -> None:
        with self._lock:
            if is_request:
                m = re.match(r"(\S+) (\S+) HTTP/", first)
                if not m:
                    return
                target = m.group(2)
                path, _, query = target.partition("?")
                ex = Exchange(m.group(1), unquote(path), query, headers.get("range"))
                self.exchanges.append(ex)
                pending.append(ex)
            else:
                m = re.match(r"HTTP/\S+ (\d+)", first)
                if m and pending:
                    ex = pending.pop(0)
                    ex.status, ex.body_bytes = int(m.group(1)), length

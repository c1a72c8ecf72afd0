"""A raw HTTP/1.1 client: sends exactly the bytes a test writes, hostile ones included."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import orjson


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> object:
        return orjson.loads(self.body)


def request(
    port: int,
    target: str | bytes,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | list[tuple[bytes, bytes]] | None = None,
    key: str | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> Response:
    """Send one request to 127.0.0.1:*port* on a new connection and read the whole answer."""
    target_b = target if isinstance(target, bytes) else target.encode()
    lines = [method.encode() + b" " + target_b + b" HTTP/1.1", b"Host: localhost"]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    for k, v in headers or []:
        kb = k if isinstance(k, bytes) else k.encode()
        vb = v if isinstance(v, bytes) else v.encode("utf-8")
        lines.append(kb + b": " + vb)
    if body or method in ("POST", "PATCH", "PUT"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return _parse(b"".join(chunks))


def _parse(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = []
    for line in header_lines:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    if any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in headers):
        body = _dechunk(body)
    return Response(status, headers, body)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)

"""A lean HTTP/1.1 client on one kept-alive connection, for tests that send many requests."""

from __future__ import annotations

import socket


class Connection:
    """Sends requests as given, one at a time, and reconnects when the server closes."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send the request *raw* (head and body); return the status and body of the answer.

        A connection the server closed while idle is opened again and the request sent once
        more, so *raw* should be safe to repeat.
        """
        for attempt in (1, 2):
            fresh = self.sock is None
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
            try:
                self.sock.sendall(raw)
                status, body, close = self._response()
            except (ConnectionError, EOFError):
                self.close()
                if fresh or attempt == 2:
                    raise
                continue
            if close:
                self.close()
            return status, body
        raise AssertionError("not reached")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buf.clear()

    def _response(self) -> tuple[int, bytes, bool]:
        status = int(self._line().split()[1])
        length, chunked, close = 0, False, False
        while line := self._line():
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value == b"chunked"
            elif name == b"connection":
                close = value == b"close"
        if not chunked:
            return status, self._exact(length), close
        body = bytearray()
        while size := int(self._line().split(b";")[0], 16):
            body += self._exact(size)
            self._line()
        while self._line():  # trailers
            pass
        return status, bytes(body), close

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

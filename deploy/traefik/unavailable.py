#!/usr/bin/env python3
"""Wacrm gate: the answer Traefik gives while the sidecar cannot answer.

Traefik cannot answer a fixed body by itself: its errors middleware fetches the page from a
service.  This is that service.  Every request gets Wacrm's 503,

    {"error":{"code":"internal","message":"Rate limit service unavailable"}}

with ``Retry-After: 1``, except ``GET /healthz`` (200, for a liveness probe).  Python 3.11 or
later, standard library only: run it with any python3, e.g. from the sidecar's image, next to
Traefik (on the same host or in Traefik's pod, so that it is up when the sidecar is not):

    python3 unavailable.py --listen 127.0.0.1:9182

It logs to stderr at most one line every 5 s while it answers, with how many it answered:
then Traefik is getting no usable answer from the sidecar (down, timed out, or Redis down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time

BODY = b'{"error":{"code":"internal","message":"Rate limit service unavailable"}}'
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Cache-Control: no-store\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
HEALTHY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
    b'{"status":"ok"}'
)
#: The most a request's head may hold; Traefik's error-page requests hold a few hundred bytes.
MAX_HEAD = 16384
#: An idle connection is closed after this many seconds.
IDLE = 60.0
#: At most one log line this often, while requests are answered.
LOG_EVERY = 5.0

log = logging.getLogger("wacrm.unavailable")


class Counter:
    """Counts the 503s; logs them at most once every LOG_EVERY seconds."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last_log = -LOG_EVERY

    def answered(self) -> None:
        now = time.monotonic()
        if self.count == 0:
            self.first = now
        self.count += 1
        if now - self.last_log >= LOG_EVERY:
            log.warning(
                "answered %d request(s) with 503 in %.1f s: Traefik gets no usable answer "
                "from the sidecar",
                self.count,
                now - self.first,
            )
            self.count, self.last_log = 0, now


async def serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter
) -> None:
    """Answer the requests of one connection, keeping it open between them."""
    try:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            request_line, _, fields = head.partition(b"\r\n")
            method, _, rest = request_line.partition(b" ")
            target = rest.partition(b" ")[0]
            if method in (b"GET", b"HEAD") and target == b"/healthz":
                writer.write(HEALTHY if method == b"GET" else HEALTHY[: HEALTHY.index(b"{")])
            else:
                counter.answered()
                writer.write(UNAVAILABLE if method != b"HEAD" else UNAVAILABLE[: -len(BODY)])
            await writer.drain()
            # A request with a body (never Traefik's) or asking to close: answer, then close,
            # rather than read its body.
            lower = fields.lower()
            if (
                (b"content-length:" in lower and b"content-length: 0\r\n" not in lower)
                or b"transfer-encoding:" in lower
                or b"connection: close" in lower
                or not request_line.endswith(b"HTTP/1.1")
            ):
                return
    except ConnectionError:
        return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def main(host: str, port: int) -> None:
    counter = Counter()
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, counter), host, port, limit=MAX_HEAD, reuse_address=True
    )
    log.info("answering 503 on %s:%d", host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:9182", help="host:port (127.0.0.1:9182)")
    args = parser.parse_args()
    listen_host, _, listen_port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(listen_host.strip("[]") or "127.0.0.1", int(listen_port)))

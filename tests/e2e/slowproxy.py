"""A slow Redis for tests: a TCP proxy that holds every reply for a delay set while it runs.

`SlowProxy` listens on a free port and relays each connection to the server on *target*.  What
the client sends passes at once; each chunk the server answers is held `SlowProxy.delay`
seconds (the value when the chunk arrived) before it is passed on, in order.  The proxy runs
its own event loop in a thread, so a test changes `delay` between two of its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class SlowProxy:
    """Relay connections on `port` to 127.0.0.1:*target*, holding replies `delay` seconds."""

    def __init__(self, target: int) -> None:
        self.target = target
        #: Seconds each chunk of a reply is held; set it at any time.
        self.delay = 0.0
        #: Connections accepted so far: a client that gave up and connected again adds one.
        self.accepted = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self._thread.start()
        listening = asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(listening, self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Close the port and every relayed connection, then end the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shut(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._relays:
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._relays.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        try:
            async with asyncio.TaskGroup() as both:
                both.create_task(self._forward(reader, up_writer, held=False))
                both.create_task(self._forward(up_reader, writer, held=True))
        except* OSError:
            pass  # either side went away: close both
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _forward(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, held: bool
    ) -> None:
        """Copy *src* to *dst* until *src* ends; *held*: each chunk `delay` seconds late."""
        if not held:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()
            return
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while data := (item := await due.get())[1]:
                if (wait := item[0] - loop.time()) > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await src.read(65536):
                due.put_nowait((loop.time() + self.delay, data))
            due.put_nowait((0.0, b""))
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            dst.close()

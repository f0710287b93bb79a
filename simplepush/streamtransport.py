"""An asyncio Transport over a Tornado IOStream, for device sockets that came over TLS.

Why: after the upgrade a plain socket is handed to asyncio (see web.py), but
a TLS socket's session state lives in Tornado's SSLIOStream and cannot be
moved. A DeviceConnection talks to such a stream through this adapter: the
same protocol code for ws:// and wss://, at the price of one reading
coroutine per socket. Terminating TLS in a load balancer in front keeps
devices on the lighter path (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
from functools import partial

from tornado.iostream import IOStream, StreamClosedError

READ_CHUNK = 64 * 1024
# asyncio's own marks for pausing and resuming the protocol's writes.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


class StreamTransport(asyncio.Transport):
    """Only what DeviceConnection uses: write, close, abort, flow control both ways."""

    def __init__(self, stream: IOStream, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._stream = stream
        self._protocol = protocol
        self._buffered = 0
        self._writes_paused = False
        self._closing = False
        self._last_write: asyncio.Future[None] | None = None
        self._reading = asyncio.Event()
        self._reading.set()
        stream.set_close_callback(self._lost)
        protocol.connection_made(self)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        stream = self._stream
        try:
            while True:
                await self._reading.wait()
                data = await stream.read_bytes(READ_CHUNK, partial=True)
                self._protocol.data_received(data)
        except StreamClosedError:
            pass

    def _lost(self) -> None:
        self._reader.cancel()
        self._protocol.connection_lost(None)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._stream.closed():
            return
        try:
            future = self._stream.write(data)
        except StreamClosedError:
            return
        size = len(data)
        self._buffered += size
        self._last_write = future
        future.add_done_callback(partial(self._written, size))
        if not self._writes_paused and self._buffered > HIGH_WATER:
            self._writes_paused = True
            self._protocol.pause_writing()

    def _written(self, size: int, _future: asyncio.Future[None]) -> None:
        self._buffered -= size
        if self._writes_paused and self._buffered <= LOW_WATER and not self._stream.closed():
            self._writes_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def close(self) -> None:
        """Close once what was written has gone out, as asyncio's transports do."""
        if self._closing:
            return
        self._closing = True
        if self._last_write is None or self._last_write.done():
            self._stream.close()
        else:
            self._last_write.add_done_callback(lambda _future: self._stream.close())

    def abort(self) -> None:
        self._closing = True
        self._stream.close()

    def is_closing(self) -> bool:
        return self._closing or self._stream.closed()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

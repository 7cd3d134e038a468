"""A minimal HTTP/1.1 keep-alive client on asyncio protocols, for load generation with little client CPU.

One request at a time per connection; responses must carry Content-Length (FastAPI/uvicorn JSON
responses do). Requests are pre-encoded bytes, so the client does almost no work per request; that keeps
the measurement about the server on a machine where client and server share the cores.
"""

from __future__ import annotations

import asyncio


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._need: int | None = None  # total bytes of the response being read, once headers are in
        self._head = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._need is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head = end + 4
            length = 0
            for line in bytes(self._buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self._need = self._head + length
        if len(self._buffer) >= self._need:
            status = int(self._buffer[9:12])
            body = bytes(self._buffer[self._head : self._need])
            del self._buffer[: self._need]
            self._need = None
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request; return (status, body)."""
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def post(host: str, port: int, path: str, body: bytes) -> bytes:
    """A pre-encoded JSON POST."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

"""A lean HTTP/1.1 client over one keep-alive connection, for the web section.

httpx spends about 0.8 ms of its own CPU per request on this machine, against about
0.2 ms for a round trip through uvicorn and Starlette (bench/NOTES.md): measured with
httpx alone, section 7 would charge the client library to the web role. Browsers and
curl parse HTTP in native code; this client's cost is close to theirs. It speaks only
what the web role answers: Content-Length bodies and chunked Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


class Http11:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Http11:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body) of a request whose answer has a Content-Length."""
        status, headers = await self._send(method, path, body)
        assert self._reader is not None
        return status, await self._reader.readexactly(int(headers["content-length"]))

    async def events(self, path: str, *, parse: bool = True) -> AsyncIterator[tuple[str, Any]]:
        """(event name, its JSON data) from a chunked text/event-stream, to its end (the
        connection can be used again then); the data as bytes, unparsed, if not `parse`."""
        status, headers = await self._send("GET", path, None)
        assert status == 200 and headers.get("transfer-encoding") == "chunked", headers
        reader = self._reader
        assert reader is not None
        pending = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await reader.readexactly(2)
                return
            pending += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in pending:
                frame, pending = pending.split(b"\n\n", 1)
                name, data = "", None
                for line in frame.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip().decode()
                    elif line.startswith(b"data:"):
                        data = json.loads(line[5:]) if parse else line[5:].strip()
                if name:
                    yield name, data

    async def _send(self, method: str, path: str, body: Any) -> tuple[int, dict[str, str]]:
        assert self._reader is not None and self._writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + payload)
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

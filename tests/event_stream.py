"""A real HTTP client for /events that reads the stream line by line and parses it as EventSource does
(the HTML standard's "interpreting an event stream"), with a timeout on every read.

Every event's data is checked against docs/schema/server-frame.schema.json, as the WebSocket
client in conftest.py checks every frame.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest_asyncio
from conftest import TIMEOUT
from schema_check import validate_server_frame


@dataclass
class Event:
    kind: str  # the event's type: "message" when the stream named none
    data: str
    # This event's own id: line (None: it had none); and what EventSource would send as
    # Last-Event-ID once it has seen this event (ids persist until the next one).
    id: str | None
    last_event_id: str
    retry: int | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def frame(self) -> dict[str, Any]:
        return json.loads(self.data)


class EventStream:
    def __init__(self, session: aiohttp.ClientSession, response: aiohttp.ClientResponse) -> None:
        self.session = session
        self.response = response
        self.last_event_id = ""
        self.comments = 0
        self.welcome: dict[str, Any] = {}

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def connection_id(self) -> str:
        return self.welcome["connection_id"]

    async def line(self, timeout: float = TIMEOUT) -> str | None:
        """The next line without its end, or None at the end of the stream."""
        raw = await asyncio.wait_for(self.response.content.readline(), timeout)
        if not raw:
            return None
        assert raw.endswith(b"\n"), raw  # the bridge ends every line with LF
        return raw[:-1].decode("utf-8")

    async def next(self, timeout: float = TIMEOUT) -> Event:
        """The next event EventSource would dispatch (comment-only and empty blocks are skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        kind, data, own_id, retry, lines = "", [], None, None, []
        while True:
            line = await self.line(max(0.01, deadline - asyncio.get_running_loop().time()))
            if line is None:
                raise EOFError("the stream ended")
            if line == "":
                if not data:
                    kind, own_id, retry, lines = "", None, None, []
                    continue
                found = Event(kind or "message", "\n".join(data), own_id, self.last_event_id, retry, lines)
                validate_server_frame(found.frame)
                return found
            lines.append(line)
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                own_id = self.last_event_id = value
            elif name == "retry" and value.isdigit():
                retry = int(value)

    async def message(self, timeout: float = TIMEOUT) -> Event:
        """The next NATS message (an event EventSource's onmessage gets), skipping named events."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.next(max(0.01, deadline - asyncio.get_running_loop().time()))
            if found.kind == "message":
                return found

    async def named(self, kind: str, timeout: float = TIMEOUT) -> Event:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.next(max(0.01, deadline - asyncio.get_running_loop().time()))
            if found.kind == kind:
                return found

    async def end(self, timeout: float = TIMEOUT) -> list[Event]:
        """Every event up to the end of the stream."""
        found: list[Event] = []
        while True:
            try:
                found.append(await self.next(timeout))
            except EOFError:
                return found

    async def json(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.response.json(), TIMEOUT)

    async def close(self) -> None:
        self.response.close()
        await self.session.close()


OpenEvents = Callable[..., Any]


@pytest_asyncio.fixture
async def events() -> AsyncIterator[OpenEvents]:
    """``await events(url, subject=[...], last=..., headers=...)``: an EventStream (welcomed if 200)."""
    opened: list[EventStream] = []

    async def open_(url: str, headers: dict[str, str] | None = None, welcome: bool = True,
                    **params: Any) -> EventStream:
        query = [(k, str(v)) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
        session = aiohttp.ClientSession()
        try:
            response = await asyncio.wait_for(session.get(url, params=query, headers=headers or {}), TIMEOUT)
        except BaseException:
            await session.close()
            raise
        stream = EventStream(session, response)
        opened.append(stream)
        if welcome and response.status == 200:
            first = await stream.next()
            assert first.kind == "welcome", first
            stream.welcome = first.frame
        return stream

    yield open_
    for stream in opened:
        with suppress(Exception):
            await stream.close()

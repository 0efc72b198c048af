"""Fuzzing the control protocol with hypothesis, over one real WebSocket to a real bridge process.

One campaign per test run (a module-scoped fixture): hypothesis generates
batches of frames (random JSON shapes, unicode including lone surrogates, huge
numbers, deep nesting, random bytes sent as text and as binary frames,
near-valid control frames with random subjects and actions (``presence`` asks and
``"presence"`` members on subscribes among them, on a bridge keeping presence
on ``fuzz.>`` with JetStream), ``refresh`` frames
carrying random tokens: forged, expired, another user's, garbage, and validly
signed ones with random ``nats`` permission claims; ``request`` frames with
random headers and timeouts, to subjects an echo service answers, a silent one
takes and nobody serves; each is sent as generated and again with one byte
changed) and sends them to a bridge process (JWT on)
whose control-frame rate limit is set out of the way.  Every frame is followed
by a sentinel frame whose reply carries a known id, so each frame's answer is
the set of replies between two sentinel replies; a frame may instead end the
connection, but only with the close its kind calls for (1009 for a frame at or
over MAX_FRAME_BYTES, 1007 for text that is not UTF-8), after which the fuzzer
reconnects.  A request the bridge accepts is answered when NATS answers, maybe
after later frames' replies: such answers are counted apart, and every accepted
request must get exactly one before the connection moves on.  Anything else
is recorded as an anomaly rather than stopping the campaign, so one bug does
not hide the others; the tests below then each check one property of the
campaign's record.

Meanwhile a healthy client on the side follows a subject that a publisher
writes a numbered stream to; it must see every number, in order.

Inputs the campaign found to break the bridge (lone surrogates, sent as JSON
\\ud800 escapes, in subjects, ids and actions) are pinned down by deterministic
tests at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
import pytest
from conftest import TIMEOUT, BridgeProcess, NatsServer, spawn_bridge, wait_for_port
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from minting import SECRET, claims, hs256, tampered, unsigned

# The campaign runs in the first test's setup: more than the default 120 s must be allowed.
pytestmark = pytest.mark.timeout(300)

FRAME_LIMIT = 16 * 1024
MIN_FRAMES = 10_000
EXAMPLES = 140
BATCH = (45, 60)  # pairs of frames per example: at least 12 600 frames in all
TIME_BUDGET = 75.0  # seconds of fuzzing at most; the frame count is checked separately

OK_CLOSES = {"oversize": {1009}, "invalid_utf8": {1007}}
AUTH = {"Authorization": f"Bearer {hs256(claims('fuzzer', ttl=7200))}"}


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick a strategy with the given relative weights.

    Not one_of with repeated branches: hypothesis does not draw those in proportion.
    """
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda strategy: strategy)


SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b"])
TEXT = weighted((12, st.text(max_size=16)), (1, SURROGATES))
KEYS = st.sampled_from(["action", "subjects", "subject", "id", "data", "encoding", "type", "presence",
                        "headers", "timeout", ""]) | TEXT

HUGE_INTS = st.integers(min_value=-(10**300), max_value=10**300)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True), TEXT,
)


def json_values(depth: int) -> st.SearchStrategy[Any]:
    """Any JSON value nested up to ``depth`` levels (st.recursive is several times slower)."""
    if depth == 0:
        return SCALARS
    children = json_values(depth - 1)
    return st.one_of(SCALARS, st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=4))


JSON_VALUES = json_values(3)

TOKENS = st.sampled_from(
    ["a", "b", "fuzz", "fuzz.pub", "*", ">", "$SYS", "_INBOX", "$JS", "API", "$KV", "", " ", "a b",
     "ä", "日本", "\x00", "\t", "\ud800", "x" * 300, "*x", "x>", "..", "\u2028"]
)
SUBJECTS = weighted(
    (3, st.lists(TOKENS, min_size=1, max_size=4).map(".".join)),
    (1, TEXT),
    (1, st.sampled_from(["fuzz.pub.a", "fuzz.pub.b.c", ">", "*.>", "_INBOX.>", "$SYS.>", "a.*.b"])),
)
ACTIONS = weighted(
    (8, st.sampled_from(["subscribe", "unsubscribe", "publish", "refresh", "presence", "request", "request",
                         "SUBSCRIBE", "sub", ""])),
    (1, TEXT),
    (1, JSON_VALUES),
)
IDS = st.one_of(st.integers(), HUGE_INTS, st.floats(), TEXT, st.booleans(), st.none(), JSON_VALUES)
BASE64ISH = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | TEXT

# The fuzzer's own user: every connection it makes carries a token for it.
USER = "fuzzer"
LOGIN = hs256(claims(USER, ttl=7200))
PATTERN_LISTS = st.lists(SUBJECTS, max_size=3)
NATS_CLAIMS = weighted(
    (3, st.fixed_dictionaries({}, optional={
        "sub": st.fixed_dictionaries({}, optional={"allow": PATTERN_LISTS, "deny": PATTERN_LISTS}),
        "pub": st.fixed_dictionaries({}, optional={"allow": PATTERN_LISTS, "deny": PATTERN_LISTS}),
    })),
    (1, JSON_VALUES),
)
FUZZ_TOKENS = weighted(
    (4, NATS_CLAIMS.map(lambda claim: hs256(claims(USER, ttl=7200, nats=claim)))),
    (1, st.just(LOGIN)),
    (1, st.sampled_from([
        hs256(claims("someone-else", ttl=7200)),
        hs256(claims(USER, ttl=-60)),
        hs256(claims(USER, ttl=7200), secret="a-different-secret-thirty-two-bytes!"),
        unsigned(claims(USER, ttl=7200)),
        tampered(LOGIN),
        LOGIN + "x",
    ])),
    (1, TEXT),
    (1, JSON_VALUES),
)

HEADER_NAMES = st.sampled_from(["X-Trace", "x-tag", "Nats-Rollup", "nats-expected-stream", "NATS-MSG-ID",
                                 "Status", "description", "bad name", "", "X:Y", "ä"]) | TEXT
HEADER_VALUES = st.sampled_from(["abc", "", " padded ", "a\r\nNats-Rollup: sub", "a\nStatus: 503",
                                 "ü"]) | TEXT
HEADERS = weighted(
    (3, st.dictionaries(HEADER_NAMES, HEADER_VALUES | st.lists(HEADER_VALUES, max_size=3), max_size=3)),
    (1, JSON_VALUES),
)
TIMEOUTS = weighted(
    (2, st.sampled_from([0.05, 0.1, 1, 30, 0, -1, 1e999])),
    (1, st.floats(allow_nan=True, allow_infinity=True)),
    (1, JSON_VALUES),
)
# Who answers what: an echo service, a silent one (its requests time out), and for any other
# subject nobody (no responders).
ECHO_SUBJECT, SILENT_SUBJECT = "fuzz.pub.a", "fuzz.pub.b.c"
REQUEST_TIMEOUT = 0.2
# A request's answer, as opposed to a refusal, which comes before its frame's sentinel.
LATE_ERRORS = {"no_responders", "timeout"}

NEAR_VALID = st.fixed_dictionaries(
    {"action": ACTIONS},
    optional={
        "token": FUZZ_TOKENS,
        "subjects": weighted((4, st.lists(SUBJECTS, max_size=5)), (1, JSON_VALUES)),
        "subject": SUBJECTS,
        "id": IDS,
        "data": st.one_of(JSON_VALUES, BASE64ISH),
        "encoding": st.sampled_from(["base64", "text", "utf-8", 1, None]),
        "presence": weighted((4, st.booleans()), (1, JSON_VALUES)),
        "headers": HEADERS,
        "timeout": TIMEOUTS,
    },
)

# Watching and asking presence where it is kept (random subjects rarely all are), and leaving again.
ROOM = st.sampled_from(["fuzz.room.a", "fuzz.room.b", "fuzz.pub.a"])
PRESENCE_FRAMES = st.fixed_dictionaries(
    {"action": st.sampled_from(["subscribe", "subscribe", "unsubscribe"]),
     "subjects": st.lists(ROOM, min_size=1, max_size=2), "presence": st.just(True)},
    optional={"id": IDS},
) | st.fixed_dictionaries({"action": st.just("presence"), "subject": ROOM}, optional={"id": IDS})

# Requests that mostly pass the checks, so that NATS's side is fuzzed too: answered, timed out,
# no responders, and the headers and timeouts that must be refused.
CALLED = st.sampled_from([ECHO_SUBJECT, SILENT_SUBJECT, "fuzz.pub.nobody"])
REQUESTS = st.fixed_dictionaries(
    {"action": st.just("request"), "subject": weighted((4, CALLED), (1, SUBJECTS)),
     "data": st.one_of(JSON_VALUES, BASE64ISH)},
    optional={"id": IDS, "headers": HEADERS, "timeout": TIMEOUTS,
              "encoding": st.sampled_from(["base64", "text"])},
)


def dumps(value: Any) -> str:
    return json.dumps(value)  # NaN/Infinity allowed, surrogates escaped: as a browser could send


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def truncated(value: dict[str, Any], cut: int) -> str:
    text = dumps(value)
    return text[: cut % (len(text) + 1)]


def text_frame(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, bytes]]:
    return strategy.map(lambda t: ("text", t.encode("utf-8", "surrogatepass")))


AT_LIMIT = st.integers(min_value=FRAME_LIMIT - 3, max_value=FRAME_LIMIT + 64)

# Frames that end the connection (oversize, not UTF-8) are kept rare: each costs a reconnect.
FRAMES = weighted(
    (40, text_frame(NEAR_VALID.map(dumps))),
    (3, text_frame(PRESENCE_FRAMES.map(dumps))),
    (10, text_frame(REQUESTS.map(dumps))),
    (20, text_frame(JSON_VALUES.map(dumps))),
    (8, text_frame(st.builds(truncated, NEAR_VALID, st.integers(min_value=0)))),
    (6, text_frame(st.text(max_size=200))),
    (5, text_frame(st.binary(max_size=200).map(lambda b: b.decode("latin-1")))),
    (4, text_frame(st.integers(min_value=1, max_value=6000).map(
        lambda n: '{"subjects": ["a"], "id": ' + "9" * n + "}"))),
    (2, text_frame(st.integers(min_value=1, max_value=6000).map(lambda d: nested(d, "array")))),
    (2, text_frame(st.integers(min_value=1, max_value=2500).map(lambda d: nested(d, "object")))),
    (3, text_frame(st.sampled_from(
        ["1e999", "-1e999", "NaN", '{"id": 1e400, "subjects": ["a"]}', "", " ", "{}", "[]",
         '{"action": "subscribe"}', "null", '"subscribe"', "\x00"]))),
    (5, st.binary(max_size=300).map(lambda b: ("binary", b))),
    (1, st.binary(max_size=200).map(lambda b: ("text", b))),  # random bytes as a text frame
    (1, text_frame(AT_LIMIT.map(lambda n: "x" * n))),
    (1, AT_LIMIT.map(lambda n: ("binary", b"\0" * n))),
)


def mutated(frame: tuple[str, bytes], position: int, byte: int) -> tuple[str, bytes]:
    """``frame`` with one byte replaced; only an ASCII byte, so text stays UTF-8."""
    kind, payload = frame
    ascii_at = [i for i, b in enumerate(payload) if b < 0x80 or kind == "binary"]
    if not ascii_at:
        return kind, payload + bytes([byte])
    i = ascii_at[position % len(ascii_at)]
    return kind, payload[:i] + bytes([byte]) + payload[i + 1 :]


# Each generated frame goes out twice: as generated, and with one byte changed.
FRAME_PAIRS = st.builds(
    lambda frame, position, byte: [frame, mutated(frame, position, byte)],
    FRAMES,
    st.integers(min_value=0, max_value=2**16),
    st.sampled_from(b'{}[]",:.*> \x00\n' + bytes(range(0x20, 0x7F))),
)


def closing_kind(kind: str, payload: bytes) -> str | None:
    """Which clean close this frame may end the connection with, if any."""
    if len(payload) >= FRAME_LIMIT:
        return "oversize"
    if kind == "text":
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_utf8"
    return None


# ---------------------------------------------------------------------------
# The fuzzing client
# ---------------------------------------------------------------------------


@dataclass
class Record:
    frames: int = 0  # frames whose outcome was seen (answered or closed)
    replies: int = 0
    closes: dict[int, int] = field(default_factory=dict)
    reconnects: int = 0
    anomalies: dict[str, tuple[int, str]] = field(default_factory=dict)  # kind -> (count, example)
    refreshes: dict[bool, int] = field(default_factory=dict)  # refresh replies by success
    presence: dict[bool, int] = field(default_factory=dict)  # presence replies by success
    presence_frames: int = 0  # join and leave frames received
    requests: dict[str, int] = field(default_factory=dict)  # request outcomes: "ok" or the error
    side_published: int = 0
    side_received: list[int] = field(default_factory=list)
    alive_during: bool = True
    healthz_after: int = 0
    new_client_ok: bool = False
    exit_code: int | None = None
    log: str = ""
    elapsed: float = 0.0

    def anomaly(self, kind: str, frame: tuple[str, bytes]) -> None:
        count, example = self.anomalies.get(kind, (0, ""))
        if not example:
            example = f"{frame[0]} frame {frame[1][:300]!r} ({len(frame[1])} bytes)"
        self.anomalies[kind] = (count + 1, example)


class Fuzzer:
    """One WebSocket at a time to the bridge; reconnects only after the bridge closed it."""

    def __init__(self, url: str, record: Record) -> None:
        self.url = url
        self.record = record
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.counter = 0
        self.tag = uuid.uuid4().hex
        # Requests accepted (no reply before their sentinel) less answers received.
        self.outstanding = 0

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        if self.ws is not None and not self.ws.closed:
            return self.ws
        if self.ws is not None:
            self.record.reconnects += 1
        if self.session is None:
            self.session = aiohttp.ClientSession()
        self.ws = await asyncio.wait_for(self.session.ws_connect(self.url, headers=AUTH), TIMEOUT)
        welcome = await asyncio.wait_for(self.ws.receive(), TIMEOUT)
        assert welcome.type is aiohttp.WSMsgType.TEXT, welcome
        return self.ws

    async def drop(self) -> None:
        if self.ws is not None:
            with suppress(Exception):
                await asyncio.wait_for(self.ws.close(), TIMEOUT)

    async def close(self) -> None:
        await self.drop()
        if self.session is not None:
            await self.session.close()

    def sentinel(self) -> tuple[str, str]:
        self.counter += 1
        sid = f"sentinel-{self.tag}-{self.counter}"
        return sid, json.dumps({"action": "fuzz-sentinel", "id": sid})

    async def send(self, ws: aiohttp.ClientWebSocketResponse, frame: tuple[str, bytes]) -> None:
        kind, payload = frame
        opcode = aiohttp.WSMsgType.BINARY if kind == "binary" else aiohttp.WSMsgType.TEXT
        await asyncio.wait_for(ws.send_frame(payload, opcode), TIMEOUT)

    async def run_batch(self, frames: list[tuple[str, bytes]]) -> None:
        segment: list[tuple[str, bytes]] = []
        for frame in frames:
            if closing_kind(*frame):
                await self.run_segment(segment)
                segment = []
                await self.run_segment([frame])
            else:
                segment.append(frame)
        await self.run_segment(segment)

    async def run_segment(self, frames: list[tuple[str, bytes]]) -> None:
        """Send each frame followed by a sentinel, pipelined; then account for every frame."""
        if not frames:
            return
        ws = await self.connect()
        sentinels = []
        try:
            for frame in frames:
                sid, text = self.sentinel()
                sentinels.append(sid)
                await self.send(ws, frame)
                await asyncio.wait_for(ws.send_str(text), TIMEOUT)
        except (ConnectionError, RuntimeError):
            pass  # closed under us: the reads below say why
        for frame, sid in zip(frames, sentinels, strict=False):
            if not await self.await_answer(ws, frame, sid):
                self.outstanding = 0  # the connection ended: its requests with it
                await self.drop()
                return
        await self.drain(ws, frames[-1])

    async def drain(self, ws: aiohttp.ClientWebSocketResponse, frame: tuple[str, bytes]) -> None:
        """Every request accepted so far gets its one answer (within its timeout, or at once)."""
        while self.outstanding > 0:
            try:
                msg = await asyncio.wait_for(ws.receive(), REQUEST_TIMEOUT + TIMEOUT)
            except TimeoutError:
                self.record.anomaly("an accepted request was never answered", frame)
                break
            if msg.type is not aiohttp.WSMsgType.TEXT:
                self.record.anomaly(f"the connection ended ({msg.type.name}) with requests in flight", frame)
                break
            reply = json.loads(msg.data)
            if isinstance(reply, dict) and reply.get("type") == "reply":
                if self.is_answer(reply):
                    self.count_answer(reply)
                else:
                    self.record.anomaly("a reply to no frame while requests were in flight", frame)
        if self.outstanding < 0:
            self.record.anomaly("more request answers than requests accepted", frame)
        self.outstanding = 0

    @staticmethod
    def is_answer(reply: dict[str, Any]) -> bool:
        """A request's answer (NATS's, or no responders, or its timeout), not a refusal."""
        return reply.get("action") == "request" and (reply.get("success") is True
                                                     or reply.get("error") in LATE_ERRORS)

    def count_answer(self, reply: dict[str, Any]) -> None:
        self.outstanding -= 1
        outcome = "ok" if reply.get("success") is True else str(reply.get("error"))
        self.record.requests[outcome] = self.record.requests.get(outcome, 0) + 1

    async def await_answer(
        self, ws: aiohttp.ClientWebSocketResponse, frame: tuple[str, bytes], sid: str
    ) -> bool:
        """True once ``frame`` is answered and its sentinel seen; False if the connection ended."""
        record = self.record
        answers = 0
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            except TimeoutError:
                record.anomaly("no answer within 10 s", frame)
                record.frames += 1
                return False
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    reply = json.loads(msg.data)
                except ValueError:
                    record.anomaly("bridge sent a text frame that is not JSON", frame)
                    continue
                if isinstance(reply, dict) and reply.get("type") in ("join", "leave"):
                    record.presence_frames += 1
                if not isinstance(reply, dict) or reply.get("type") != "reply":
                    continue  # a forwarded message, a status, join or leave frame
                if reply.get("id") == sid:
                    if answers == 0 and b"request" in frame[1]:
                        self.outstanding += 1  # an accepted request: its answer comes when NATS answers
                    elif answers == 0:
                        record.anomaly("frame got no reply", frame)
                    record.frames += 1
                    return True
                if self.is_answer(reply):
                    self.count_answer(reply)
                    continue
                if not isinstance(reply.get("success"), bool) or not isinstance(reply.get("message"), str):
                    record.anomaly("reply without boolean success and string message", frame)
                answers += 1
                record.replies += 1
                if reply.get("action") in ("refresh", "presence"):
                    ok = reply.get("success") is True
                    tally = record.refreshes if reply["action"] == "refresh" else record.presence
                    tally[ok] = tally.get(ok, 0) + 1
                if reply.get("action") == "request":
                    refused = str(reply.get("error"))
                    record.requests[refused] = record.requests.get(refused, 0) + 1
                continue
            record.frames += 1
            if msg.type is aiohttp.WSMsgType.CLOSE:
                code = int(msg.data)
                record.closes[code] = record.closes.get(code, 0) + 1
                allowed = OK_CLOSES.get(closing_kind(*frame) or "", set())
                if answers == 0 and code not in allowed:
                    why = f"frame closed the connection with {code} ({msg.extra!r}) instead of a reply"
                    record.anomaly(why, frame)
                return False
            if msg.type is aiohttp.WSMsgType.ERROR:
                error = str(msg.data)
                if "UTF-8" in error:
                    record.anomaly("bridge sent a text frame that is not valid UTF-8", frame)
                else:
                    record.anomaly(f"connection error: {error}", frame)
                return False
            record.anomaly(f"connection ended without a close frame ({msg.type.name})", frame)
            return False


# ---------------------------------------------------------------------------
# The campaign
# ---------------------------------------------------------------------------


async def side_stream(url: str, nats_url: str, record: Record, stop: asyncio.Event) -> None:
    """A healthy client following a numbered stream published the whole time."""
    subject = f"fuzzside.{uuid.uuid4().hex[:12]}"
    async with aiohttp.ClientSession() as session:
        ws = await asyncio.wait_for(session.ws_connect(url, headers=AUTH), TIMEOUT)
        await asyncio.wait_for(ws.receive(), TIMEOUT)
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": [subject], "id": "side"}))
        while True:
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            if json.loads(msg.data).get("id") == "side":
                break
        nc = await asyncio.wait_for(nats.connect(nats_url), TIMEOUT)

        async def read() -> None:
            while True:
                msg = await asyncio.wait_for(ws.receive(), 30)
                assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
                frame = json.loads(msg.data)
                if frame.get("subject") == subject:
                    if frame["data"] == "end":
                        return
                    record.side_received.append(frame["data"])

        reader = asyncio.create_task(read())
        try:
            n = 0
            while not stop.is_set():
                await nc.publish(subject, str(n).encode())
                n += 1
                if n % 50 == 0:
                    await asyncio.wait_for(nc.flush(), TIMEOUT)
                await asyncio.sleep(0.002)
            record.side_published = n
            await nc.publish(subject, b'"end"')
            await asyncio.wait_for(nc.flush(), TIMEOUT)
            await asyncio.wait_for(reader, 30)
        finally:
            reader.cancel()
            with suppress(BaseException):
                await reader
            await asyncio.wait_for(nc.close(), TIMEOUT)
            await asyncio.wait_for(ws.close(), TIMEOUT)


def run_hypothesis(fuzzer: Fuzzer, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(FRAME_PAIRS, min_size=BATCH[0], max_size=BATCH[1]))
    def fuzz(pairs: list[list[tuple[str, bytes]]]) -> None:
        if time.monotonic() > deadline:
            return
        batch = [frame for pair in pairs for frame in pair]
        asyncio.run_coroutine_threadsafe(fuzzer.run_batch(batch), loop).result(timeout=120)

    fuzz()


async def http_status(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
            return resp.status


async def services(nats_url: str) -> nats.NATS:
    """The echo and the silent service the fuzzer's requests reach."""
    nc = await asyncio.wait_for(nats.connect(nats_url), TIMEOUT)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)  # with the request's own headers

    async def silent(msg: Any) -> None:
        pass

    await nc.subscribe(ECHO_SUBJECT, cb=echo)
    await nc.subscribe(SILENT_SUBJECT, cb=silent)
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    return nc


async def campaign(nats_url: str, bp: BridgeProcess, record: Record) -> None:
    ws_url = bp.http_url + "/stream"
    fuzzer = Fuzzer(ws_url, record)
    stop = asyncio.Event()
    side = asyncio.create_task(side_stream(ws_url, nats_url, record, stop))
    started = time.monotonic()
    responders = await services(nats_url)
    try:
        await asyncio.sleep(0.2)  # the side client is subscribed and streaming
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(
            asyncio.to_thread(run_hypothesis, fuzzer, loop, started + TIME_BUDGET), TIME_BUDGET + 60
        )
        record.elapsed = time.monotonic() - started
        record.alive_during = bp.proc.poll() is None
    finally:
        stop.set()
        await fuzzer.close()
        await asyncio.wait_for(side, 60)
        await asyncio.wait_for(responders.close(), TIMEOUT)
    record.healthz_after = await http_status(bp.http_url + "/healthz")
    async with aiohttp.ClientSession() as session:
        ws = await asyncio.wait_for(session.ws_connect(ws_url, headers=AUTH), TIMEOUT)
        await asyncio.wait_for(ws.receive(), TIMEOUT)
        await ws.send_str(json.dumps({"subjects": ["fuzz.after"], "id": 1}))
        reply = json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
        record.new_client_ok = reply.get("success") is True
        await asyncio.wait_for(ws.close(), TIMEOUT)


@pytest.fixture(scope="module")
def fuzz_record(js_server: NatsServer) -> Iterator[Record]:
    record = Record()
    bp = spawn_bridge(env={
        "NATS_URL": js_server.url,
        "PRESENCE_SUBJECTS": "fuzz.>",
        "CONTROL_RATE": "1000000",
        "MAX_FRAME_BYTES": str(FRAME_LIMIT),
        "PUBLISH_ALLOW": "fuzz.pub.>",
        "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "JWT_SECRET": SECRET,
        "TEST_PUBLISH_INTERVAL": "0",
        "LOG_LEVEL": "WARNING",
        "SERVICE_NAME": f"fuzz_{uuid.uuid4().hex[:8]}",
    })
    try:
        wait_for_port(bp.port, timeout=30, proc=bp.proc)
        # A Runner, not asyncio.run: panini's nest_asyncio replaces asyncio.run with one
        # that needs a current loop, and pytest-asyncio leaves none between tests.
        with asyncio.Runner() as runner:
            runner.run(campaign(js_server.url, bp, record))
    finally:
        record.exit_code, record.log = bp.stop(signal.SIGTERM, timeout=20)
    print(f"fuzz campaign: {describe(record)}")  # shown with -s
    yield record


def describe(record: Record) -> str:
    return (f"{record.frames} frames, {record.replies} replies, closes {record.closes}, "
            f"{record.reconnects} reconnects, refreshes {record.refreshes}, presence {record.presence} "
            f"and {record.presence_frames} join/leave frames, requests {record.requests}, "
            f"{record.elapsed:.1f} s")


# ---------------------------------------------------------------------------
# What the campaign must show
# ---------------------------------------------------------------------------


def test_fuzz_campaign_sends_at_least_10000_frames(fuzz_record):
    assert fuzz_record.frames >= MIN_FRAMES, describe(fuzz_record)


def test_fuzz_every_frame_is_answered_by_a_reply_or_a_clean_close(fuzz_record):
    found = {kind: f"{count}x, e.g. {example}" for kind, (count, example) in fuzz_record.anomalies.items()}
    assert found == {}, describe(fuzz_record)


def test_fuzz_refreshes_were_both_accepted_and_refused(fuzz_record):
    assert fuzz_record.refreshes.get(True, 0) > 0 and fuzz_record.refreshes.get(False, 0) > 0, (
        fuzz_record.refreshes
    )


def test_fuzz_presence_was_answered_refused_and_watched(fuzz_record):
    assert fuzz_record.presence.get(True, 0) > 0 and fuzz_record.presence.get(False, 0) > 0, (
        fuzz_record.presence
    )
    assert fuzz_record.presence_frames > 0, describe(fuzz_record)


def test_fuzz_requests_were_answered_timed_out_and_refused(fuzz_record):
    outcomes = fuzz_record.requests
    assert {"ok", "no_responders", "timeout", "invalid"} <= set(outcomes), outcomes


def test_fuzz_bridge_process_stays_up(fuzz_record):
    assert fuzz_record.alive_during
    assert fuzz_record.healthz_after == 200


def test_fuzz_bridge_accepts_a_new_client_afterwards(fuzz_record):
    assert fuzz_record.new_client_ok


def test_fuzz_side_client_receives_every_message_in_order(fuzz_record):
    assert fuzz_record.side_published > 0
    assert fuzz_record.side_received == list(range(fuzz_record.side_published))


def test_fuzz_bridge_logs_no_unhandled_exception(fuzz_record):
    failures = [line for line in fuzz_record.log.splitlines() if "failed" in line or "Traceback" in line]
    assert failures == []


def test_fuzz_bridge_exits_cleanly_afterwards(fuzz_record):
    assert fuzz_record.exit_code == 0, fuzz_record.log[-2000:]


# ---------------------------------------------------------------------------
# What the fuzzing found, pinned down (each closed the connection or sent invalid UTF-8)
# ---------------------------------------------------------------------------


async def raw_reply(client: Any, text: str) -> aiohttp.WSMessage:
    await client.ws.send_str(text)
    return await asyncio.wait_for(client.ws.receive(), TIMEOUT)


@pytest.mark.parametrize(
    "text",
    [
        '{"action": "subscribe", "subjects": ["\\ud800"]}',
        '{"action": "subscribe", "subjects": ["a.\\udc00.b"]}',
        '{"action": "unsubscribe", "subjects": ["\\ud800"]}',
        '{"action": "publish", "subject": "fuzz.pub.\\ud800", "data": 1}',
    ],
)
async def test_subject_with_escaped_lone_surrogate_gets_an_error_reply(
    bridge_factory, nats_server, ws_factory, text
):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("fuzz.pub.>",))
    client = await ws_factory(bridge.ws_url)
    msg = await raw_reply(client, text)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    frame = json.loads(msg.data)
    assert (frame["type"], frame["success"]) == ("reply", False)


@pytest.mark.parametrize("data", ["ä", "\\ud800", "日本"], ids=["latin", "surrogate", "cjk"])
async def test_publish_of_base64_data_that_is_not_ascii_gets_an_error_reply(
    bridge_factory, nats_server, ws_factory, data
):
    # Found by the fuzzer: base64.b64decode raised ValueError, not binascii.Error, on such text.
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("fuzz.pub.>",))
    client = await ws_factory(bridge.ws_url)
    text = '{"action": "publish", "subject": "fuzz.pub.a", "encoding": "base64", "data": "' + data + '"}'
    msg = await raw_reply(client, text)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    frame = json.loads(msg.data)
    assert (frame["success"], frame["message"].startswith("Invalid base64")) == (False, True)


async def test_refresh_with_a_lone_surrogate_token_gets_an_error_reply(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET)
    client = await ws_factory(bridge.ws_url, headers=AUTH)
    msg = await raw_reply(client, '{"action": "refresh", "token": "\\udfff"}')
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    frame = json.loads(msg.data)
    assert (frame["type"], frame["success"]) == ("reply", False)
    assert frame["message"].startswith("Token refused: the token is malformed")


@pytest.mark.parametrize(
    "text",
    [
        '{"action": "subscribe", "subjects": ["fuzz.a"], "id": "\\ud800"}',
        '{"action": "\\ud800"}',
        '{"action": ["\\udfff"]}',
    ],
)
async def test_reply_echoing_a_lone_surrogate_is_valid_utf8(bridge, ws_factory, text):
    client = await ws_factory(bridge.ws_url)
    msg = await raw_reply(client, text)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    assert json.loads(msg.data)["type"] == "reply"

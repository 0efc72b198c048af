"""The wire format: what the bridge sends and how it reads what clients send.

NATS message -> JSON frame bytes (built once per message, shared by every
client), the reply and the protocol's fixed strings, complete WebSocket frame
bytes (the bridge writes them straight to transports), and the parsing of a
client's control frame.  Pure functions, no I/O; docs/protocol.md and
docs/schema/ describe the same frames for client authors.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import TYPE_CHECKING, Any

from bridge.core.subjects import subject_error

if TYPE_CHECKING:
    from nats.aio.msg import Msg

PROTOCOL_VERSION = 1

# Close codes (RFC 6455 section 7.4.1).
CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_POLICY_VIOLATION = 1008  # kept flooding
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # slow consumer
# Application codes (4000-4999, RFC 6455 7.4.2).
CLOSE_TOKEN_EXPIRED = 4001  # the token's exp passed without a refresh
CLOSE_DISCONNECTED = 4003  # a backend disconnected this connection (control API)

# The example's exact strings are part of the wire protocol.
MSG_CONNECTED = "Successfully connected"
MSG_SUBJECTS_REQUIRED = "subjects required"


def msg_bad_action(action: Any) -> str:
    return (
        "The user has to specify action in message ('subscribe' or 'unsubscribe'), "
        f"got {action} instead"
    )


def msg_subscribed(subjects: list[str]) -> str:
    # str(list)[1:-1] is the example's formatting: 'a', 'b'
    return f"Successfully connected to events: {str(subjects)[1:-1]}"


def msg_unsubscribed(subject: str) -> str:
    return f"Successfully unsubscribed from event: {subject}"


def msg_not_subscribed(subject: str) -> str:
    return f"The user did not subscribe to event {subject}"


# ---------------------------------------------------------------------------
# Frames the bridge sends
# ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are accepted by json.loads but are not JSON (RFC 8259): a
    # browser's JSON.parse would choke on a frame holding one, so such payloads
    # travel as text; and a client frame holding one is refused (parse_object).
    raise ValueError(f"{name} is not a JSON value")


def encode_nats_message(msg: Msg, seq: int | None = None, time: str | None = None,
                        history: bool = False) -> bytes:
    """The UTF-8 JSON frame for one NATS message, built once and shared by all clients.

    The payload goes in as ``payload_members`` says.  ``seq`` is the message's
    stream sequence when it came through JetStream (whose reply subject is
    JetStream's own, not the publisher's: not forwarded), and ``time`` when it
    was stored (RFC 3339); ``history`` marks a stored message sent because the
    client asked for history.
    """
    head = '{"subject":' + json.dumps(msg.subject, ensure_ascii=False)
    body = payload_members(msg.data)
    extra = headers_member(msg.headers)
    if seq is not None:
        extra += f',"seq":{seq:d}'
        if time is not None:
            extra += f',"time":"{time}"'
        if history:
            extra += ',"history":true'
    elif msg.reply:
        extra += ',"reply":' + json.dumps(msg.reply, ensure_ascii=False)
    return (head + body + extra + "}").encode("utf-8")


def payload_members(payload: bytes) -> str:
    """A payload as frame members: ``,"data":...`` and, unless it is JSON, ``,"encoding":...``.

    JSON is spliced in verbatim (after validation) rather than re-serialised:
    cheaper, and big integers or exact float spellings survive.  Message frames
    and request answers carry payloads the same way.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return ',"data":"' + base64.b64encode(payload).decode("ascii") + '","encoding":"base64"'
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # Marked, so that the text `hello` and the JSON string `"hello"` differ on the wire.
        return ',"data":' + json.dumps(text, ensure_ascii=False) + ',"encoding":"text"'
    return ',"data":' + text.strip()


def headers_member(headers: dict[str, str] | None) -> str:
    """``,"headers":{...}`` for a message's NATS headers, or nothing when it has none."""
    return ',"headers":' + json.dumps(headers, ensure_ascii=False) if headers else ""


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client WebSocket text frame (RFC 6455 5.2; servers never mask)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


# What a close frame's reason can carry (RFC 6455 5.5: 125 bytes of payload, 2 of them the code).
MAX_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame carries, never inside a UTF-8 character."""
    return text.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


def close_frame(code: int, reason: bytes) -> bytes:
    payload = struct.pack("!H", code) + reason
    return bytes((0x88, len(payload))) + payload


def dump(frame: dict[str, Any]) -> bytes:
    try:
        return json.dumps(frame, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate echoed from the client (an id, an action) is not
        # UTF-8; as a \u escape it is still valid JSON in a valid text frame.
        return json.dumps(frame).encode("ascii")


def reply(success: bool, message: str, request_id: Any = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"success": success, "message": message, "type": "reply"}
    if request_id is not None:
        frame["id"] = request_id
    frame.update(extra)
    return frame


class BadFrame(Exception):
    """A control frame we answer with an error reply; ``kind`` labels the metric.

    ``extra``: members the error reply carries besides the message (a request's
    ``action``, ``error`` and ``subjects``).
    """

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.extra = extra


def json_frame(frame: dict[str, Any]) -> bytes:
    """A control frame as complete WebSocket frame bytes."""
    return text_frame(dump(frame))


def dropped_notice(n: int) -> dict[str, Any]:
    return {"success": False, "type": "dropped", "dropped": n,
            "message": f"{n} messages dropped: this client reads too slowly"}


def close_notice(code: int, reason: str) -> dict[str, Any]:
    """The ``close`` event that ends a Server-Sent Events stream: what a close frame says on a socket."""
    return {"type": "close", "code": code, "reason": reason}


# ---------------------------------------------------------------------------
# Frames clients send
# ---------------------------------------------------------------------------


def parse_object(text: str | bytes) -> dict[str, Any]:
    try:
        # NaN/Infinity refused here, or a browser's publish of them would reach NATS as
        # `NaN`, which no subscriber's JSON parser must be made to accept.
        body = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise BadFrame("json", f"Invalid JSON: {exc}") from None
    except RecursionError:
        raise BadFrame("json", "Invalid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadFrame("not_object", f"Expected a JSON object, got {_json_type(body)}")
    return body


def peek(text: str) -> tuple[Any, Any]:
    """The id and action of a frame we will not otherwise process, so even that reply can be matched."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    return (echoable(body.get("id")), body.get("action")) if isinstance(body, dict) else (None, None)


def echoable(request_id: Any) -> Any:
    """The request id to echo, if it is a plain JSON scalar that survives the round trip."""
    if isinstance(request_id, bool) or request_id is None:
        return request_id
    if isinstance(request_id, str) and len(request_id) <= 256:
        return request_id
    if isinstance(request_id, int) and abs(request_id) < 2**53:
        return request_id
    if isinstance(request_id, float) and math.isfinite(request_id):
        return request_id
    return None


def requested_subjects(body: dict[str, Any], max_subjects: int, max_length: int) -> list[str]:
    """A subscribe's or unsubscribe's subjects, each once, in the order first given; else BadFrame."""
    if "subjects" not in body:
        raise BadFrame("subjects", MSG_SUBJECTS_REQUIRED)
    subjects = body["subjects"]
    if not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) for s in subjects):
        raise BadFrame("subjects", "subjects must be a non-empty list of strings")
    if len(subjects) > max_subjects:
        raise BadFrame("limit", f"Too many subjects: at most {max_subjects} per request")
    for subject in subjects:
        error = subject_error(subject, max_length)
        if error:
            raise BadFrame("subject", error)
    return list(dict.fromkeys(subjects))


PAYLOAD_ENCODINGS = ("text", "base64")


def publish_payload(body: dict[str, Any]) -> bytes:
    """A string is sent as its text, base64 as its bytes, any other JSON value as JSON.

    For a publish and a request alike: ``"encoding": "text"`` says the string is
    text (as without it), ``"base64"`` that it holds bytes; any other encoding is
    refused rather than guessed at.
    """
    action = body.get("action", "publish")
    if "data" not in body:
        raise BadFrame("publish", f"{action} needs 'data'")
    data = body["data"]
    encoding = body.get("encoding")
    if encoding is not None and encoding not in PAYLOAD_ENCODINGS:
        raise BadFrame("publish", "encoding must be \"text\" or \"base64\"")
    if encoding == "text" and not isinstance(data, str):
        raise BadFrame("publish", "text data must be a string")
    if encoding == "base64":
        if not isinstance(data, str):
            raise BadFrame("publish", "base64 data must be a string")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError as exc:  # binascii.Error, or text that is not even ASCII
            raise BadFrame("publish", f"Invalid base64: {exc}") from None
    try:
        if isinstance(data, str):
            return data.encode("utf-8")
        # allow_nan=False: a JSON number beyond a double's range (1e999) parses to inf,
        # which json.dumps would write as `Infinity`; NATS subscribers must only get JSON.
        text = json.dumps(data, ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadFrame("publish", "data is not valid Unicode (lone surrogate)") from None
    except ValueError:
        raise BadFrame("publish", "data holds a number too large for JSON (beyond ±1.8e308, like 1e999); "
                                  "send it as a string") from None


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)

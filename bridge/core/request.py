"""A browser's NATS request: its headers, its timeout, and the frames that answer it.

The rules only; bridge/actions/request.py sends the request and waits.  A
request is a publish with a reply subject of the bridge's own, so its subject
and payload follow the publish rules (actions/publish.py, core/frames.py);
what is added here:

- **headers** go out as NATS headers, except the names NATS and JetStream give
  meaning to (``Nats-*``, ``Status``, ``Description``, any case), which are
  refused: a browser must never steer JetStream (``Nats-Rollup: sub`` purges a
  subject, ``Nats-Expected-Last-Sequence`` makes a writer's next publish fail,
  ``Nats-Msg-Id`` fakes a deduplication) or forge a server status (a
  ``Status: 503`` reads as "no responders" to a requester).  Names are
  RFC 7230 tokens and values printable ASCII, so no CR or LF can end a
  header line early and smuggle one of those names in after it;
- **the timeout**: ``REQUEST_TIMEOUT`` is the default and the most a request
  may wait, a smaller ``timeout`` in the request applies;
- **the answer** carries the response as a message frame carries a payload
  (core/frames.py: JSON verbatim, text marked, bytes as base64), spliced
  into the reply's bytes once, never re-serialised.
"""

from __future__ import annotations

import math
import re
from typing import Any

from bridge.core.frames import BadFrame, dump, headers_member, payload_members, reply, text_frame
from bridge.core.stats import REQUEST_RESULTS

ACTION = "request"

# The answer's ``error`` and the metric's ``result`` (bridge_requests_total{result}).
OK, TIMEOUT, NO_RESPONDERS, NOT_ALLOWED, TOO_MANY_REQUESTS, INVALID = REQUEST_RESULTS

# What nats-server puts in the Status header of "nobody is subscribed to that subject".
NO_RESPONDERS_STATUS = "503"

# RFC 7230 3.2.6: a header name is a token; a value, visible ASCII, spaces and tabs.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\t\x20-\x7e]*")
_RESERVED_NAMES = ("status", "description")
_RESERVED_PREFIX = "nats-"


def refused(kind: str, message: str, subject: str | None = None) -> BadFrame:
    """A request refused before NATS sees it: the error reply names the action and why, in a word.

    ``kind`` is the bad-frame kind: ``policy`` (the subject policy, or publishing
    off) is ``not_allowed``, ``pending`` (MAX_PENDING_REQUESTS in flight)
    ``too_many_requests``, anything else ``invalid``.
    """
    extra: dict[str, Any] = {"action": ACTION, "error": error_of(kind)}
    if subject is not None:
        extra["subjects"] = [subject]
    return BadFrame(kind, message, **extra)


def error_of(kind: str) -> str:
    return {"policy": NOT_ALLOWED, "pending": TOO_MANY_REQUESTS}.get(kind, INVALID)


def reserved(name: str) -> bool:
    """A header name NATS or JetStream gives meaning to (any case)."""
    lowered = name.lower()
    return lowered.startswith(_RESERVED_PREFIX) or lowered in _RESERVED_NAMES


def parse_headers(value: Any, subject: str) -> dict[str, tuple[str, ...]]:
    """A request's ``headers``: name -> its values (one or more); else BadFrame."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise refused("headers", "headers must be an object of header name -> string or list of strings",
                      subject)
    headers: dict[str, tuple[str, ...]] = {}
    for name, given in value.items():
        if not _TOKEN.fullmatch(name):
            raise refused("headers", f"Invalid header name {name[:64]!r}: letters, digits and "
                                     "!#$%&'*+.^_`|~- only", subject)
        if reserved(name):
            # Threat: a browser steering JetStream or forging a server status (module docstring).
            raise refused("headers", f"Header {name!r} is reserved: NATS and JetStream give Nats-*, "
                                     "Status and Description a meaning", subject)
        values = (given,) if isinstance(given, str) else given
        if not isinstance(values, list | tuple) or not values or not all(isinstance(v, str) for v in values):
            raise refused("headers", f"Header {name!r} must be a string or a non-empty list of strings",
                          subject)
        for text in values:
            if not _VALUE.fullmatch(text):
                # Threat: a CR or LF ending the line early, so that what follows it is read
                # as another header (a reserved one); other bytes break other clients' parsers.
                raise refused("headers", f"Header {name!r} has a value that is not printable ASCII "
                                         "(no line breaks or control characters)", subject)
        headers[name] = tuple(values)
    return headers


def wire_headers(headers: dict[str, tuple[str, ...]]) -> dict[str, str] | None:
    """``headers`` as nats-py's ``publish`` takes them (None: no headers at all).

    nats-py writes each item as one ``name: value`` line and knows no repeated
    names; a header with several values is written as that many lines by
    putting the later ones inside the value, after a line break.  Only here can
    a value hold one: every value passed parse_headers, which refuses CR and LF.
    """
    if not headers:
        return None
    return {name: f"\r\n{name}: ".join(values) for name, values in headers.items()}


def parse_timeout(value: Any, most: float, subject: str) -> float:
    """Seconds to wait for the answer: ``most`` (REQUEST_TIMEOUT) unless the request asks for less."""
    if value is None:
        return most
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise refused("timeout", "timeout must be a number of seconds > 0", subject)
    return min(float(value), most)


def answer(request_id: Any, subject: str, payload: bytes, headers: dict[str, str] | None) -> bytes:
    """The success reply to a request, as complete WebSocket frame bytes.

    The head is serialised once, its closing brace replaced by the payload's
    members as a message frame would carry them (JSON spliced verbatim, so big
    numbers stay exact) and the response's headers.
    """
    head = dump(reply(True, f"Answer from {subject}", request_id, action=ACTION, subjects=[subject]))
    tail = payload_members(payload) + headers_member(headers) + "}"
    return text_frame(head[:-1] + tail.encode("utf-8"))


def failure(error: str, message: str, request_id: Any, subject: str) -> dict[str, Any]:
    """The reply to a request NATS did not answer (``no_responders``, ``timeout``)."""
    return reply(False, message, request_id, action=ACTION, subjects=[subject], error=error)

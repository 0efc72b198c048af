"""Console logging, as text or as one JSON object a line (``LOG_FORMAT``), safe to read and to ship.

What a log line may carry comes partly from outside (paths, headers, subjects,
ids), and what the bridge knows includes credentials.  So, in every line:

- **No forged lines** (log injection): text lines escape line breaks and other
  control characters in the message (``\\n``, ``\\x1b``, ``\\u2028``), so
  ``POST /clients/x%0a2026-12-05 ... INFO handler: connection FORGED opened``
  cannot start a line of its own, nor can ANSI sequences repaint a terminal.
  Tracebacks stay multi-line: they are ours.  JSON lines escape the same
  characters inside their strings, so a shipper splitting on any Unicode line
  break still sees one object per line.
- **No credentials**: ``?token=`` values (any case) and the passwords and
  tokens in URLs (``nats://user:pass@host``) are replaced before a line is
  written (``redact``), and the access log (``AccessLog``) records the request
  line and Referer that way too.
- **No tracebacks for bad requests**: a request line or header over aiohttp's
  8 KB limit is one line, not an ERROR with a traceback (``OneLineBadRequests``).
"""

from __future__ import annotations

import json
import logging
import sys

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from bridge.core.redaction import UNSAFE, redact, scrub

BAD_REQUEST_DETAIL = 160  # characters of aiohttp's description of a request it could not parse


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, the message scrubbed; a traceback follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        rendered = record.message
        record.message = scrub(rendered)
        try:
            return super().formatMessage(record)
        finally:
            record.message = rendered

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        # json.dumps escapes C0 controls but leaves DEL, C1, U+2028/2029 and the bidi
        # controls as they are; each can only sit inside a string here, where \\uXXXX is
        # the same character to a JSON reader and no line break to anything else.
        return UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(entry, ensure_ascii=False))


class AccessLog(AbstractAccessLogger):
    """aiohttp's access log line without the credentials a request carries in its URL.

    Browsers cannot put headers on a WebSocket, so the page's token travels as
    ``/stream?token=...``, and a page opened as ``/?token=...`` names it in the
    Referer of what it fetches: aiohttp's own access log writes both in full on
    every (re)connect.  Here the request line and Referer go through ``redact``.
    The fields are aiohttp's default format's, less its time (the log line has one).
    Pass it as ``access_log_class`` wherever the app is served (main.serve, the tests).
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request is None:  # aiohttp's own logger allows for it
            return
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d "%s" "%s"',
            request.remote or "-", request.method, redact(request.path_qs),
            request.version.major, request.version.minor, response.status, response.body_length,
            redact(request.headers.get("Referer", "-")), request.headers.get("User-Agent", "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class OneLineBadRequests(logging.Filter):
    """A request aiohttp cannot parse is one line at INFO, not an ERROR with a traceback.

    aiohttp 3.14 reports an unparsable request (a request line or header over
    8190 bytes, a bad header, garbage on the port) from
    ``web_protocol.RequestHandler.handle_error`` through ``log_exception``: a
    10-line traceback at ERROR on ``aiohttp.server``.  Anyone can send one, so
    a client could fill the log and raise alerts at will, and nothing of ours
    failed.  This filter, on that logger, rewrites such a record (its exception
    is an ``HttpProcessingError``) into one line naming the client and what was
    wrong; any other record from aiohttp.server (a bug in a handler) keeps its
    traceback.  The client has its 400 either way, and the access log its line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        detail = " ".join(exc.message.split())[:BAD_REQUEST_DETAIL]
        record.msg, record.args = "bad request from %s: %d %s: %s", (remote, exc.code, type(exc).__name__,
                                                                       detail)
        record.exc_info, record.exc_text = None, None
        # A client's mistake, not ours: INFO, like a refused handshake (or lower, as aiohttp
        # itself logs a first bad method at DEBUG).
        record.levelno = min(record.levelno, logging.INFO)
        record.levelname = logging.getLevelName(record.levelno)
        return logging.getLogger(record.name).isEnabledFor(record.levelno)


def configure_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """``worker``: with WORKERS > 1, each worker's lines name it (``w2``, or ``"worker": 2``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = f" w{worker}" if worker is not None else ""
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, OneLineBadRequests) for f in server.filters):  # a worker configures again
        server.addFilter(OneLineBadRequests())

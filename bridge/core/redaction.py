"""What may reach a log line: values from outside escaped onto one line, credentials hidden.

Pure functions over text (no I/O); process/logs.py applies them to every line
it writes, config.py to a bad setting's value.  Threats: log injection (a
``%0a`` in a path forging a line of its own, ANSI sequences repainting a
terminal) and credentials in logs (``?token=`` values, passwords and tokens in
URLs such as ``nats://user:pass@host``).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

REDACTED = "[redacted]"

# C0 and C1 controls, DEL, the Unicode line and paragraph separators (str.splitlines
# and many viewers break lines there) and the bidi overrides that reorder what a
# reader sees ("Trojan source").
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# scheme://userinfo@ : up to the last @ before the host (a password may hold an @).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#\s,]*)@")
# One key=value of a query string, after its ? or &.
_QUERY_PARAM = re.compile(r"(?<=[?&;])([^=&;#\s\"'<>]*)=([^&;#\s\"'<>]*)")


def escape(text: str) -> str:
    """``text`` on one line: every control character and Unicode line break written as an escape."""
    return UNSAFE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def redact_url(text: str) -> str:
    """Every URL in ``text`` without the secret in its userinfo: ``nats://user:***@host``.

    A lone name is a secret too: ``nats://TOKEN@host`` is how a NATS URL carries a token.
    """
    def hide(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"

    return _USERINFO.sub(hide, text)


def redact_query_tokens(text: str) -> str:
    """Every ``token=`` query parameter in ``text`` (any case, even percent-encoded) with its value hidden."""
    def hide(match: re.Match[str]) -> str:
        key, value = match.group(1), match.group(2)
        if value and unquote_plus(key).strip().lower() == "token":
            return f"{key}={REDACTED}"
        return match.group()

    return _QUERY_PARAM.sub(hide, text)


def redact(text: str) -> str:
    """``text`` without the credentials a URL can carry: query tokens and userinfo."""
    return redact_query_tokens(redact_url(text))


def scrub(text: str) -> str:
    """``text`` fit for a text log line: credentials hidden, then one line."""
    return escape(redact(text))

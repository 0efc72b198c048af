"""NATS subject grammar and wildcard matching: pure functions, no I/O.

Whether a subject is valid, whether a pattern matches it, whether one pattern
lies within or overlaps another: decided here, tested directly and checked
against nats-server's own behaviour (tests/test_policy.py).  Who may use which
subjects is permissions.py.
"""

from __future__ import annotations


def subject_error(subject: str, max_length: int, wildcards: bool = True) -> str | None:
    """Why ``subject`` is not a valid NATS subject, or None if it is.

    Checked here, before NATS sees it, because nats-server answers an invalid
    SUB with -ERR and drops the whole connection: one bad browser frame would
    otherwise cut every client off.
    """
    if not subject:
        return "Invalid subject '': must not be empty"
    try:
        encoded = subject.encode()
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        return f"Invalid subject {subject!r}: not valid Unicode"
    if len(encoded) > max_length:
        return f"Invalid subject: longer than {max_length} bytes"
    for ch in subject:
        if ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"Invalid subject {subject!r}: whitespace and control characters are not allowed"
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token == "":
            return f"Invalid subject {subject!r}: empty token"
        if token in ("*", ">") and not wildcards:
            return f"Invalid subject {subject!r}: wildcards are not allowed here"
        if token == ">":
            if i != len(tokens) - 1:
                return f"Invalid subject {subject!r}: '>' is only allowed as the last token"
        elif token != "*" and ("*" in token or ">" in token):
            return f"Invalid subject {subject!r}: wildcards must be a whole token"
    return None


def subject_matches(pattern: str, subject: str) -> bool:
    """Does the concrete ``subject`` match ``pattern`` (NATS wildcard rules)?"""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def pattern_within(inner: str, outer: str) -> bool:
    """Is every subject that ``inner`` matches also matched by ``outer``?"""
    p, q = inner.split("."), outer.split(".")
    for i, token in enumerate(p):
        if i >= len(q):
            return False
        if q[i] == ">":
            return True
        if token == ">" or (q[i] != "*" and (token == "*" or token != q[i])):
            return False
    return len(p) == len(q)


def patterns_overlap(a: str, b: str) -> bool:
    """Is there a subject that both patterns match?"""
    p, q = a.split("."), b.split(".")
    for i in range(min(len(p), len(q))):
        if p[i] == ">" or q[i] == ">":
            return True
        if p[i] != "*" and q[i] != "*" and p[i] != q[i]:
            return False
    return len(p) == len(q)

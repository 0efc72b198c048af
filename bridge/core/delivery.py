"""Which of a session's patterns delivers a message: each message arrives once, never a denied one.

Pure, no I/O.  Most sessions take every message of a pattern they follow.
Some need a check per message, a ``Rule``: a session following an older
pattern that overlaps this one (``a.*`` then ``a.b``) gets the message from
that older pattern instead, so it arrives once; and a user's token may deny
some subjects inside an allowed pattern (its ``filters``).  Sessions with
neither pay nothing (hub/topic.py keeps them apart).
"""

from __future__ import annotations

from bridge.core.subjects import subject_matches

# One older pattern a session also follows, with that pattern's own filters.
Older = tuple[str, tuple[str, ...]]


def denied(filters: tuple[str, ...], subject: str) -> bool:
    """Does one of a session's filters (its token's denied patterns) match ``subject``?"""
    return any(subject_matches(f, subject) for f in filters)


class Rule:
    """How one session takes one pattern's messages."""

    __slots__ = ("filters", "older")

    def __init__(self, older: tuple[Older, ...] = (), filters: tuple[str, ...] = ()) -> None:
        # The session's older patterns that overlap this one: they deliver what they match.
        self.older = older
        # The session's own denied patterns this one can reach (its token's).
        self.filters = filters

    @property
    def plain(self) -> bool:
        """Every message of the pattern goes to the session: no check needed."""
        return not self.older and not self.filters

    def delivers(self, subject: str) -> bool:
        """Does the session get a message on ``subject`` through this pattern?"""
        if denied(self.filters, subject):
            return False  # the user's token denies it
        # An older pattern that matches (and does not filter it) delivers it instead.
        return not any(subject_matches(p, subject) and not denied(pf, subject) for p, pf in self.older)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and (self.older, self.filters) == (other.older, other.filters)

    def __hash__(self) -> int:
        return hash((self.older, self.filters))

    def __repr__(self) -> str:
        return f"Rule(older={self.older!r}, filters={self.filters!r})"

"""Who may follow and publish what: the server's subject policy, and each user's share of it.

Pure functions, no I/O.  The vocabulary is nats-server's own (user permissions
with ``allow``/``deny`` lists for ``subscribe`` and ``publish``, deny wins), and
so is the check of a subscription: a pattern must lie *within* an allowed
pattern (``user.alice.>`` allows ``user.alice.x`` and ``user.alice.*``, never
``user.*.x`` or ``>``); a pattern that merely overlaps a denied one is accepted
and the denied subjects are filtered out message by message.

What a connection may do is the server's policy (``SUBJECT_ALLOW``,
``SUBJECT_DENY``, ``PUBLISH_ALLOW``) **and** its token's ``nats`` claim.
``{sub}`` in the allow lists and in the claim's patterns stands for the token's
``sub``; tokens.py refuses any ``sub`` that is not one plain subject token, so a
``sub`` can never widen a template into a wildcard (template injection).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from bridge.core.subjects import pattern_within, patterns_overlap, subject_error, subject_matches

SUB_TEMPLATE = "{sub}"

# The built-in protected subjects: the server's own control subjects, JetStream's
# API and internal streams, reply inboxes of other apps.  A browser that may
# publish to ``$JS.API.STREAM.DELETE.X`` deletes a stream; one that follows
# ``_INBOX.>`` reads every answer to every request.  So they are always denied:
# ``SUBJECT_DENY`` adds to them, never replaces them (an operator hiding
# ``internal.>`` must not open these by the way), and only
# ``DANGEROUSLY_UNPROTECT_SUBJECTS``, naming each pattern exactly, removes one.
DEFAULT_DENY = ("$SYS.>", "$JS.>", "$KV.>", "$O.>", "_INBOX.>")

# Where the bridges take commands from each other and from backends (CONTROL_SUBJECT).
DEFAULT_CONTROL_SUBJECT = "bridge.control"


def control_patterns(control_subject: str) -> tuple[str, ...]:
    """The control plane's subjects, denied to browsers whatever the settings say.

    Threat: a browser publishing to the control plane.  The bridge's own NATS
    connection must be allowed to publish and subscribe there (it serves the
    plane), and a browser's publish goes out on that very connection, so NATS
    permissions cannot tell the two apart: only this check can.  A frame
    published to ``bridge.control.users.disconnect`` would be a trusted backend
    command (disconnect anyone, subscribe anyone to anything); a subscription
    there would read other people's connection ids, which are capabilities.
    So both are refused, even to a trusted backend acting for a client, and a
    wildcard that reaches the plane (``>``, ``bridge.*``) is filtered message by
    message.
    """
    return (control_subject, f"{control_subject}.>")


def template_error(pattern: str) -> str | None:
    """Why ``pattern`` (which may hold ``{sub}``) is not a valid pattern, or None."""
    tokens = pattern.split(".")
    if any(SUB_TEMPLATE in t and t != SUB_TEMPLATE for t in tokens):
        return f"Invalid pattern {pattern!r}: {SUB_TEMPLATE} must be a whole token"
    return subject_error(".".join("x" if t == SUB_TEMPLATE else t for t in tokens), 1024)


def expand(patterns: Iterable[str], sub: str | None) -> tuple[str, ...]:
    """``patterns`` with ``{sub}`` replaced by ``sub``; without a user, templated patterns match nothing."""
    out = []
    for pattern in patterns:
        tokens = pattern.split(".")
        if SUB_TEMPLATE not in tokens:
            out.append(pattern)
        elif sub is not None:
            out.append(".".join(sub if t == SUB_TEMPLATE else t for t in tokens))
    return tuple(out)


@dataclass(frozen=True)
class NatsClaim:
    """A token's ``nats`` claim; ``None`` for an allow list means "not narrowed by the token"."""

    sub_allow: tuple[str, ...] | None = None
    sub_deny: tuple[str, ...] = ()
    pub_allow: tuple[str, ...] | None = None
    pub_deny: tuple[str, ...] = ()


def parse_nats_claim(value: Any) -> NatsClaim:
    """``{"sub": {"allow": [...], "deny": [...]}, "pub": {...}}``; ValueError saying what is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError("'nats' must be an object")
    unknown = set(value) - {"sub", "pub"}
    if unknown:
        raise ValueError(f"'nats' has unknown members {sorted(unknown)}; expected 'sub' and 'pub'")
    lists: dict[str, tuple[str, ...] | None] = {}
    for kind in ("sub", "pub"):
        section = value.get(kind, {})
        if not isinstance(section, Mapping) or set(section) - {"allow", "deny"}:
            raise ValueError(f"'nats.{kind}' must be an object with 'allow' and/or 'deny'")
        for verb in ("allow", "deny"):
            if verb not in section:
                lists[f"{kind}_{verb}"] = None if verb == "allow" else ()
                continue
            patterns = section[verb]
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"'nats.{kind}.{verb}' must be a list of subject patterns")
            for pattern in patterns:
                error = template_error(pattern)
                if error:
                    raise ValueError(f"'nats.{kind}.{verb}': {error}")
            lists[f"{kind}_{verb}"] = tuple(patterns)
    return NatsClaim(**lists)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Permissions:
    """What one connection may follow and publish, templates resolved.

    Each ``*_allow`` is a list of lists: a subject must be allowed by every one
    of them (the server's, then the token's, when it has one).  ``*_deny`` are
    the server's; ``token_*_deny`` the token's, which bind only what the
    connection asks for itself, never what a trusted backend asks for it.
    """

    sub_allow: tuple[tuple[str, ...], ...] = ((">",),)
    sub_deny: tuple[str, ...] = DEFAULT_DENY + control_patterns(DEFAULT_CONTROL_SUBJECT)
    token_sub_deny: tuple[str, ...] = ()
    pub_allow: tuple[tuple[str, ...], ...] = ((),)
    pub_deny: tuple[str, ...] = DEFAULT_DENY + control_patterns(DEFAULT_CONTROL_SUBJECT)
    token_pub_deny: tuple[str, ...] = ()

    def subscribe_refusal(self, pattern: str, trusted: bool = False) -> str | None:
        """Why a subscription to ``pattern`` is refused, or None.  ``trusted``: asked by a backend."""
        deny = self.sub_deny if trusted else self.sub_deny + self.token_sub_deny
        if any(pattern_within(pattern, d) for d in deny):
            return f"Subject {pattern!r} is not allowed: it only matches denied subjects"
        for allow in self.sub_allow[:1] if trusted else self.sub_allow:
            if not any(pattern_within(pattern, a) for a in allow):
                return (f"Subject {pattern!r} is not allowed: "
                        "it is not within the subjects this connection may follow")
        return None

    def filters(self, pattern: str, trusted: bool = False) -> tuple[str, ...]:
        """This connection's own denied patterns that ``pattern`` can reach: checked per message."""
        if trusted:
            return ()
        return tuple(d for d in self.token_sub_deny if patterns_overlap(pattern, d))

    def publish_refusal(self, subject: str, trusted: bool = False) -> str | None:
        """Why publishing to the concrete ``subject`` is refused, or None."""
        deny = self.pub_deny if trusted else self.pub_deny + self.token_pub_deny
        allowed = all(
            any(subject_matches(a, subject) for a in allow)
            for allow in (self.pub_allow[:1] if trusted else self.pub_allow)
        )
        if not allowed or any(subject_matches(d, subject) for d in deny):
            return f"Publishing to {subject!r} is not allowed"
        return None


@dataclass(frozen=True)
class SubjectPolicy:
    """The server's policy: ``SUBJECT_ALLOW``, ``PUBLISH_ALLOW``, and what is denied: the
    built-in protected subjects (``DEFAULT_DENY`` less ``unprotect``, from
    ``DANGEROUSLY_UNPROTECT_SUBJECTS``), ``SUBJECT_DENY`` on top of them, and the
    control plane (``CONTROL_SUBJECT``), which no setting opens.

    The allow lists may hold ``{sub}``; ``for_user`` resolves them for one user.
    """

    allow: tuple[str, ...] = (">",)
    deny: tuple[str, ...] = ()
    publish_allow: tuple[str, ...] = ()
    control_subject: str = DEFAULT_CONTROL_SUBJECT
    unprotect: tuple[str, ...] = ()

    @cached_property  # permits() runs per message on filtered subscriptions
    def denied(self) -> tuple[str, ...]:
        """What no connection may follow or publish: the protected subjects, ``SUBJECT_DENY``
        and the control plane."""
        protected = tuple(p for p in DEFAULT_DENY if p not in self.unprotect)
        return protected + self.deny + control_patterns(self.control_subject)

    def for_user(self, sub: str | None = None, claim: NatsClaim | None = None) -> Permissions:
        claim = claim or NatsClaim()
        sub_allow = [expand(self.allow, sub)]
        pub_allow = [expand(self.publish_allow, sub)]
        if claim.sub_allow is not None:
            sub_allow.append(expand(claim.sub_allow, sub))
        if claim.pub_allow is not None:
            pub_allow.append(expand(claim.pub_allow, sub))
        return Permissions(
            sub_allow=tuple(sub_allow),
            sub_deny=self.denied,
            token_sub_deny=expand(claim.sub_deny, sub),
            pub_allow=tuple(pub_allow),
            pub_deny=self.denied,
            token_pub_deny=expand(claim.pub_deny, sub),
        )

    def needs_filter(self, pattern: str) -> bool:
        """Can ``pattern`` deliver a subject the server denies (so each must be checked)?"""
        return any(patterns_overlap(pattern, d) for d in self.denied)

    def permits(self, subject: str) -> bool:
        """Is the concrete ``subject`` outside the server's deny list and the control plane?"""
        return not any(subject_matches(d, subject) for d in self.denied)

"""A fresh token on the open socket: same user, new expiry and permissions.

Subscriptions the new token no longer allows are dropped (presence left too)
and named in the reply; the others are filtered by the new token's denies.  Another user's
token, or one that fails any check, is refused and the connection keeps its
old expiry (a refresh never changes who a connection is).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.core.frames import BadFrame, reply
from bridge.core.tokens import TokenError

if TYPE_CHECKING:
    from bridge.core.permissions import SubjectPolicy
    from bridge.core.stats import Stats
    from bridge.core.tokens import Verifier
    from bridge.hub.lifetime import TokenLifetime
    from bridge.hub.registry import Registry
    from bridge.hub.session import Session
    from bridge.presence.room import Presence

logger = logging.getLogger(__name__)


class Refresher:
    def __init__(self, verifier: Callable[[], Verifier | None], policy: SubjectPolicy, registry: Registry,
                 lifetime: TokenLifetime, stats: Stats, presence: Presence | None = None) -> None:
        # The current Verifier (None: no JWT); a callable, since a JWKS refresh swaps it.
        self._verifier = verifier
        self._policy = policy
        self._registry = registry
        self._lifetime = lifetime
        self._stats = stats
        # Leaves presence on the subscriptions a refresh drops.
        self._presence = presence

    async def refresh(self, session: Session, body: dict[str, Any], request_id: Any = None) -> dict[str, Any]:
        verifier = self._verifier()
        if verifier is None or session.user is None:
            raise BadFrame("refresh", "This bridge does not use tokens: there is nothing to refresh")
        token = body.get("token")
        if not isinstance(token, str):
            raise BadFrame("refresh", "refresh needs a string 'token'")
        try:
            user = verifier.verify(token)
        except TokenError as exc:
            self._stats.token_refreshes["refused"] += 1
            return reply(False, f"Token refused: {exc.message}", request_id, action="refresh")
        if user.sub != session.user.sub:
            self._stats.token_refreshes["refused"] += 1
            return reply(False, "Token refused: it is for another user (sub); reconnect to change users",
                         request_id, action="refresh")
        session.renew(user, self._policy.for_user(user.sub, user.claim))
        self._lifetime.arm(session)
        revoked = []
        for pattern, subscription in session.subscriptions.items():
            if subscription.trusted:
                continue  # a backend's subscription: the user's claims never bound it
            if session.perms.subscribe_refusal(pattern):
                revoked.append(pattern)
            else:
                subscription.filters = session.perms.filters(pattern)
        await self._registry.remove(session, revoked)
        if self._presence is not None:
            await self._presence.unsubscribed(session, revoked)
        self._registry.reroute(session)
        self._stats.token_refreshes["ok"] += 1
        logger.info("connection %s: token refreshed, expires at %d%s", session.label, user.expires_at,
                    f"; dropped {revoked}" if revoked else "")
        message = "Token refreshed" + (f"; unsubscribed from {', '.join(revoked)}" if revoked else "")
        return reply(True, message, request_id, action="refresh", expires_at=user.expires_at,
                     unsubscribed=revoked)

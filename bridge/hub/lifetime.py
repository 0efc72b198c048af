"""A token's lifetime on an open connection: a warning before ``exp``, the close at it.

``JWT_REFRESH_LEAD`` seconds before the token's ``exp`` the client is sent
``token_expiring`` and may answer with a fresh token (actions/refresh.py,
which arms the timers again); at ``exp`` without one it is closed with 4001.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from bridge.core.frames import CLOSE_TOKEN_EXPIRED

if TYPE_CHECKING:
    from bridge.core.stats import Stats
    from bridge.hub.session import Session

logger = logging.getLogger(__name__)


class TokenLifetime:
    def __init__(self, stats: Stats, refresh_lead: float) -> None:
        self._stats = stats
        self._refresh_lead = refresh_lead

    def arm(self, session: Session) -> None:
        """Warn ``refresh_lead`` seconds before the token's exp; close with 4001 at exp."""
        self.disarm(session)
        if session.user is None:
            return
        loop = asyncio.get_running_loop()
        left = session.user.expires_at - time.time()
        session.expiry = [
            loop.call_later(max(0.0, left - self._refresh_lead), self._warn, session),
            loop.call_later(max(0.0, left), self._expire, session),
        ]

    def disarm(self, session: Session) -> None:
        for timer in session.expiry:
            timer.cancel()
        session.expiry = []

    def _warn(self, session: Session) -> None:
        assert session.user is not None  # armed only for a user
        expires_at = session.user.expires_at
        # A Server-Sent Events stream cannot send a refresh: its page reconnects with a new token.
        then = ("reconnect with a new token" if session.outbox.sse
                else 'send {"action": "refresh", "token": "<a new token>"}')
        session.send_json({
            "type": "token_expiring", "expires_at": expires_at,
            "message": f"The token expires in {max(0, round(expires_at - time.time()))} s; {then}",
        })

    def _expire(self, session: Session) -> None:
        logger.info("connection %s: token expired; closing", session.label)
        self._stats.token_expiries += 1
        session.outbox.close_soon(CLOSE_TOKEN_EXPIRED, "token expired", send_queued=True)

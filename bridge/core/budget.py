"""A connection's budget of control frames: a token bucket, and a leaky count of refusals.

Pure: the clock is passed in.  Every frame a client sends spends a token
(requests, and pings and pongs too: a ping flood is a flood); the bucket
refills at ``rate`` a second up to ``rate`` (at least one).  A frame past the
budget is refused and counted as a strike; strikes leak one a second, and a
client that earns ``strikes`` of them is closed (1008).
"""

from __future__ import annotations


class ControlBudget:
    __slots__ = ("_rate", "_strikes", "_strikes_at", "_tokens", "_tokens_at", "limit")

    def __init__(self, rate: float, strikes: int, now: float) -> None:
        self._rate = rate
        self.limit = strikes
        # The bucket holds at least one token, so rates below 1/s still allow frames.
        self._tokens = max(1.0, rate)
        self._tokens_at = now
        self._strikes = 0.0
        self._strikes_at = now

    def take(self, now: float) -> bool:
        """True if a frame arriving ``now`` is within the budget (and spend its token)."""
        rate = self._rate
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def strike(self, now: float) -> bool:
        """Count a refused frame; True once the client has earned a disconnect."""
        self._strikes = max(0.0, self._strikes - (now - self._strikes_at)) + 1
        self._strikes_at = now
        # "> limit - 1", not ">= limit": a burst's strikes come microseconds
        # apart, and that much forgiveness must not buy an extra frame.
        return self._strikes > self.limit - 1

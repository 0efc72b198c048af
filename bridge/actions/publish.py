"""A browser publishes to NATS: only where the server's and the user's publish permissions allow.

Publishing is off unless ``PUBLISH_ALLOW`` names subjects; the protected
subjects and the control plane are refused whatever it says (a browser
publishing to ``$JS.API.STREAM.DELETE.X`` or to the control plane would
command the deployment); a subject is checked before NATS sees it (an invalid
one would make nats-server drop the bridge's connection for everyone); the
payload is bounded and must be JSON, text or base64 (core/frames.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nats.errors import Error as NatsError

from bridge.core.frames import BadFrame, publish_payload, reply
from bridge.core.subjects import subject_error

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from bridge.config import Limits
    from bridge.core.permissions import SubjectPolicy
    from bridge.core.stats import Stats
    from bridge.hub.session import Session


class Publisher:
    def __init__(self, nats_client: Callable[[], NATS], policy: SubjectPolicy, limits: Limits,
                 stats: Stats) -> None:
        self._nats = nats_client
        self._policy = policy
        self._limits = limits
        self._stats = stats

    @property
    def enabled(self) -> bool:
        """Publishing (and so requesting) is on at all: PUBLISH_ALLOW names subjects."""
        return bool(self._policy.publish_allow)

    def check(self, session: Session, body: dict[str, Any], trusted: bool) -> tuple[str, bytes]:
        """The subject and payload of a publish (or a request) the session may make; else BadFrame."""
        if not self.enabled:
            # Said before anything else is checked: the rest of the frame is moot.
            raise BadFrame("policy", "Publishing is disabled on this bridge")
        subject = body.get("subject")
        if not isinstance(subject, str):
            raise BadFrame("publish", f"{body.get('action', 'publish')} needs a string 'subject'")
        error = subject_error(subject, self._limits.max_subject_length, wildcards=False)
        if error:
            raise BadFrame("subject", error)
        refusal = session.perms.publish_refusal(subject, trusted=trusted)
        if refusal:
            raise BadFrame("policy", refusal)
        payload = publish_payload(body)
        if len(payload) > self._limits.max_publish_bytes:
            raise BadFrame("limit", f"Payload too large: at most {self._limits.max_publish_bytes} bytes")
        return subject, payload

    async def publish(self, session: Session, body: dict[str, Any], request_id: Any = None,
                      trusted: bool = False) -> dict[str, Any]:
        subject, payload = self.check(session, body, trusted)
        try:
            await self._nats().publish(subject, payload)
        except (TimeoutError, NatsError, OSError) as exc:
            return reply(False, f"Could not publish: {exc or type(exc).__name__}", request_id,
                         action="publish", subjects=[subject])
        self._stats.published += 1
        return reply(True, f"Published to {subject}", request_id, action="publish", subjects=[subject])

"""A request refused before it reaches the bridge (a handshake, an event stream, the control API).

Pure data: the HTTP status, the reason it is counted under
(``bridge_handshake_refusals_total{reason}``) and the words the answer gives.
web/access.py turns one into the plain HTTP answer.
"""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

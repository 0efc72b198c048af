"""The security headers on every response of the bridge: the page, its files, the API, probes, metrics.

- ``Content-Security-Policy``: the page loads nothing but this server's own
  scripts, styles and workers and talks to nothing else (``connect-src 'self'``:
  its own WebSocket; Chromium, as CSP3 says, counts ws:/wss: to the page's own
  host and port as 'self'), so injected markup could not fetch or send
  anywhere.  ``frame-ancestors 'self'`` stops clickjacking: a page on another
  origin cannot frame the bridge's page and trick a visitor into clicking its
  buttons (Disconnect, Publish) under a decoy.  It is a header, not the page's
  <meta>, because browsers ignore frame-ancestors in a <meta>; one header is
  then the one place the policy lives.  On JSON and text answers it forbids
  everything, should a browser ever render one.
- ``X-Frame-Options: SAMEORIGIN``: the same framing rule for browsers without CSP2.
- ``X-Content-Type-Options: nosniff``: a JSON answer that echoes request data
  (a subject, a Host) is never sniffed into HTML or script.
- ``Referrer-Policy: no-referrer``: a page opened as ``/?token=...`` would
  otherwise send its address, token included, as the Referer of every file it
  fetches (to our access log, or to any proxy between).

Set in ``on_response_prepare``, which every response passes through (the
static files, the 421/401/403 refusals, aiohttp's 404s and the WebSocket's 101,
which these headers do not disturb).
"""

from __future__ import annotations

from aiohttp import web
from multidict import istr

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "worker-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",  # the favicon is a data: URL
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'self'",
])

# istr names, made once: the headers multidict then keeps these instead of folding a new copy of each
# name for every response (the WebSocket's 101 lives as long as its connection).
SECURITY_HEADERS = {
    istr("Content-Security-Policy"): CONTENT_SECURITY_POLICY,
    istr("X-Frame-Options"): "SAMEORIGIN",
    istr("X-Content-Type-Options"): "nosniff",
    istr("Referrer-Policy"): "no-referrer",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp on_response_prepare: the headers above, unless a handler set its own."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)

"""Loading the keys connection tokens are checked with: JWT_SECRET, JWT_PUBLIC_KEY, JWT_JWKS.

The keys become a ``tokens.Verifier``.  A JWKS is loaded at start (a start
without it fails with one line) and re-read every ``JWT_JWKS_REFRESH``
seconds, or soon after a token names a ``kid`` we do not know (key rotation);
a failed refresh keeps the keys we have and says so in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.config import EXIT_BAD_SETTING, EXIT_RUNTIME, Config, StartupError
from bridge.core.tokens import BadKey, Verifier, VerifyingKey, algorithms_for, jwks_keys

logger = logging.getLogger(__name__)

JWKS_FETCH_TIMEOUT = 10.0
# However many unknown kids arrive, the JWKS is fetched at most this often for them.
UNKNOWN_KID_REFETCH = 30.0


class KeyLoadError(StartupError):
    """A configured key cannot be used; the message is the one line the operator sees.

    A bad setting (exit 2) unless said otherwise: a key file of the operator's that is
    not a usable key stays so however often the bridge restarts.
    """

    def __init__(self, message: str, exit_code: int = EXIT_BAD_SETTING) -> None:
        super().__init__(message, exit_code)


def jwks_problem(exc: BaseException) -> str:
    """What is wrong with a JWKS that could not be read, in words (a timeout's own text is empty)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not a JSON document (line {exc.lineno} column {exc.colno}: {exc.msg})"
    if isinstance(exc, UnicodeDecodeError):
        return "not a JSON document (its bytes are not Unicode text)"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, aiohttp.ClientError):
        return exc.strerror
    return str(exc) or type(exc).__name__


def load_public_key(path: str) -> VerifyingKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # checked readable at start, but it may have gone since
        raise KeyLoadError(f"JWT_PUBLIC_KEY={path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        raise KeyLoadError(f"JWT_PUBLIC_KEY={path}: holds a private key; give the bridge the public key only")
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise KeyLoadError(f"JWT_PUBLIC_KEY={path}: not a PEM public key or certificate") from None
    try:
        return VerifyingKey(key, algorithms_for(key))
    except BadKey as exc:
        raise KeyLoadError(f"JWT_PUBLIC_KEY={path}: {exc}") from None


class KeyStore:
    """The current ``Verifier``, swapped whole when the JWKS changes."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._static: tuple[VerifyingKey, ...] = ()
        self._jwks: tuple[VerifyingKey, ...] = ()
        self._jwks_loaded_at = float("-inf")
        self._refetch: asyncio.Task[None] | None = None
        self.verifier: Verifier | None = None

    async def load(self) -> None:
        """Everything configured, now; KeyLoadError if any of it is unusable."""
        config = self._config
        if not config.jwt_enabled:
            return
        if config.jwt_public_key:
            self._static = (load_public_key(config.jwt_public_key),)
        if config.jwt_jwks:
            try:
                self._jwks = await self._read_jwks()
            except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
                # A file is the operator's to fix (2); an https JWKS that cannot be fetched or used
                # now is a runtime failure (1): its server may answer, or answer better, later.
                remote = config.jwt_jwks.startswith("https://")
                raise KeyLoadError(f"JWT_JWKS={config.jwt_jwks}: {jwks_problem(exc)}",
                                   EXIT_RUNTIME if remote else EXIT_BAD_SETTING) from None
        self.verifier = Verifier(
            secret=config.jwt_secret.encode() if config.jwt_secret else None,
            public_keys=self._static + self._jwks,
            audience=config.jwt_audience or None,
            issuer=config.jwt_issuer or None,
            leeway=config.jwt_leeway,
        )

    async def _read_jwks(self) -> tuple[VerifyingKey, ...]:
        source = self._config.jwt_jwks
        if source.startswith("https://"):
            timeout = aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(source) as resp:
                resp.raise_for_status()
                document = await resp.json(content_type=None)
        else:
            # Bytes: json.loads finds the encoding of a JSON text itself (UTF-8, -16 or -32).
            document = json.loads(await asyncio.to_thread(Path(source).read_bytes))
        self._jwks_loaded_at = time.monotonic()
        try:
            return jwks_keys(document)
        except BadKey as exc:
            raise ValueError(str(exc)) from None

    async def refresh(self) -> None:
        """Re-read the JWKS; on failure keep the keys we have."""
        try:
            keys = await self._read_jwks()
        except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("JWKS refresh from %s failed, keeping %d keys: %s",
                           self._config.jwt_jwks, len(self._jwks), jwks_problem(exc))
            return
        if {k.kid for k in keys} != {k.kid for k in self._jwks}:
            kids = sorted(str(k.kid) for k in keys)
            logger.info("JWKS from %s now has keys %s", self._config.jwt_jwks, kids)
        self._jwks = keys
        assert self.verifier is not None
        self.verifier = self.verifier.with_keys(self._static + keys)

    def unknown_kid(self) -> None:
        """A token named a kid we lack: perhaps the keys rotated.  Re-read soon, not for every token."""
        if not self._config.jwt_jwks or (self._refetch is not None and not self._refetch.done()):
            return
        if time.monotonic() - self._jwks_loaded_at >= UNKNOWN_KID_REFETCH:
            self._refetch = asyncio.create_task(self.refresh())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._config.jwt_jwks_refresh)
            await self.refresh()

    async def lifecycle(self, web_app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: load the keys at start, keep a JWKS fresh while serving."""
        await self.load()
        task = asyncio.create_task(self._refresh_periodically()) if self._config.jwt_jwks else None
        yield
        running = [t for t in (task, self._refetch) if t is not None]
        for t in running:
            t.cancel()
        # Their CancelledError is collected; ours (a cancelled stop) still propagates.
        await asyncio.gather(*running, return_exceptions=True)


# The aiohttp application's key to this process's keys.
KEYS = web.AppKey("keys", KeyStore)

"""Verifying a connection's JWT: pure functions over keys already loaded (process/keys.py loads them).

Each check names what it stops:

- ``alg: none`` and unknown algorithms are never accepted (unsigned tokens).
- The algorithms a key accepts follow from the key's type, never from the
  token: an HMAC token is verified only with ``JWT_SECRET``, never with a
  public key (the algorithm-confusion attack, where a token "signed" with the
  public key's PEM as an HMAC secret would otherwise verify).
- A JWKS key's own ``alg``, when present, must be the token's (no downgrade
  from PS256 to RS256 on a key published for one of them).
- ``sub`` must be one plain subject token: it is substituted into subject
  templates (``user.{sub}.>``), and a ``sub`` of ``*``, ``>`` or ``a.b`` would
  widen them (template injection through a ``sub``).
- ``exp`` is required: a token without one would never expire.
- ``info``, when present, is an object of at most ``MAX_INFO_BYTES`` as JSON:
  it is copied into every presence entry of the user's, read by every bridge
  process and listed up to PRESENCE_MAX times in one answer, so a token must
  not be able to make those unbounded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import jwt.exceptions
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from bridge.core.permissions import NatsClaim, parse_nats_claim

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_RSA_BITS = 2048
# Far beyond any real token; refused before any parsing work.
MAX_TOKEN_BYTES = 16 * 1024

# The largest ``info`` claim a token may carry, as JSON.  It travels in every presence entry
# of the user's, to every bridge process, and up to PRESENCE_MAX times in one answer.
MAX_INFO_BYTES = 1024

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class TokenError(Exception):
    """A token we refuse; ``reason`` labels the metric, ``message`` tells the person."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class BadKey(ValueError):
    """A configured key we cannot use (reported as one line at start)."""


def algorithms_for(key: PublicKey) -> tuple[str, ...]:
    """The signature algorithms a public key may verify, from its type alone."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadKey(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise BadKey(f"EC curve {key.curve.name} is not supported (P-256, P-384, P-521 are)")
        return (alg,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise BadKey(f"unsupported key type {type(key).__name__}")


@dataclass(frozen=True)
class VerifyingKey:
    key: Any
    algorithms: tuple[str, ...]
    kid: str | None = None


def jwk_key(jwk: Mapping[str, Any]) -> VerifyingKey:
    """One public key from a JWKS; refuses symmetric keys and keys not meant for signatures."""
    if jwk.get("kty") == "oct":
        raise BadKey("symmetric (kty 'oct') keys are not accepted from a JWKS; use JWT_SECRET")
    if jwk.get("use", "sig") != "sig":
        raise BadKey(f"key {jwk.get('kid')!r} is for {jwk.get('use')!r}, not signatures")
    try:
        key = jwt.PyJWK(dict(jwk)).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
        raise BadKey(f"key {jwk.get('kid')!r}: {exc}") from None
    if not isinstance(key, PublicKey):
        raise BadKey(f"key {jwk.get('kid')!r} is not a public key")
    algorithms = algorithms_for(key)
    if "alg" in jwk:
        if jwk["alg"] not in algorithms:
            raise BadKey(f"key {jwk.get('kid')!r}: alg {jwk['alg']!r} does not fit a {jwk.get('kty')} key")
        algorithms = (jwk["alg"],)
    kid = jwk.get("kid")
    return VerifyingKey(key, algorithms, kid if isinstance(kid, str) else None)


def jwks_keys(jwks: Any) -> tuple[VerifyingKey, ...]:
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise BadKey('a JWKS is a JSON object {"keys": [...]}')
    return tuple(jwk_key(k) for k in jwks["keys"])


def valid_sub(sub: Any) -> bool:
    """One plain NATS subject token: non-empty, no '.', '*', '>', whitespace or control characters."""
    return (
        isinstance(sub, str)
        and sub != ""
        and len(sub) <= 256
        and not any(c in ".*>" or c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in sub)
    )


def info_error(info: Any) -> str | None:
    """Why a token's ``info`` claim cannot be shown in presence entries, or None."""
    if not isinstance(info, dict):
        return "'info' must be an object"
    try:
        size = len(json.dumps(info, ensure_ascii=False, allow_nan=False).encode())
    except (TypeError, ValueError, UnicodeEncodeError):
        return "'info' must hold JSON values only"
    if size > MAX_INFO_BYTES:
        return f"'info' is {size} bytes as JSON; at most {MAX_INFO_BYTES} are allowed"
    return None


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the connection is."""

    sub: str
    expires_at: int
    claim: NatsClaim = field(default_factory=NatsClaim)
    # The token's ``info`` claim (an object), shown as it is in the user's presence entries.
    info: dict[str, Any] | None = field(default=None, hash=False)


_DECODE_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "the token is not valid yet (nbf)"),
    (jwt.InvalidAudienceError, "audience", "the token's audience (aud) is not this bridge's"),
    (jwt.InvalidIssuerError, "issuer", "the token's issuer (iss) is not the expected one"),
    (jwt.MissingRequiredClaimError, "claims", "the token lacks a required claim"),
    (jwt.exceptions.InvalidSubjectError, "sub", "the token's sub is not a string"),
    (jwt.InvalidSignatureError, "signature", "the token's signature is invalid"),
    (jwt.InvalidAlgorithmError, "algorithm", "the token's algorithm is not accepted"),
    (jwt.DecodeError, "malformed", "the token is malformed"),
    (jwt.InvalidKeyError, "algorithm", "the token's algorithm does not fit the key"),
)


class Verifier:
    """Checks tokens against the configured keys, audience and issuer."""

    def __init__(
        self,
        secret: bytes | None = None,
        public_keys: Iterable[VerifyingKey] = (),
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        self._secret = secret
        self._keys = tuple(public_keys)
        self._by_kid = {k.kid: k for k in self._keys if k.kid is not None}
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    def with_keys(self, public_keys: Iterable[VerifyingKey]) -> Verifier:
        """The same checks with another set of public keys (a refreshed JWKS)."""
        return Verifier(self._secret, public_keys, self._audience, self._issuer, self._leeway)

    def _candidates(self, alg: str, kid: Any) -> list[Any]:
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise TokenError("algorithm", f"{alg} tokens are not accepted here (no JWT_SECRET)")
            return [self._secret]
        if kid is not None and self._by_kid:
            found = self._by_kid.get(kid) if isinstance(kid, str) else None
            if found is None:
                raise TokenError("unknown_key", f"no key with kid {kid!r}")
            keys = [found]
        else:
            keys = list(self._keys)
        keys = [k.key for k in keys if alg in k.algorithms]
        if not keys:
            raise TokenError("algorithm", f"{alg} tokens are not accepted here")
        return keys

    def verify(self, token: str) -> Identity:
        """The token's identity, or TokenError saying why not."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("malformed", "the token is too long")
        if not token.isascii():
            # A JWT is base64url text; anything else (a lone surrogate from a JSON
            # "\ud800" escape among them) is refused before PyJWT tries to encode it.
            raise TokenError("malformed", "the token is malformed (not a JWT)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed", "the token is malformed (not a JWT)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in (*HMAC_ALGORITHMS, *RSA_ALGORITHMS,
                                                     *EC_ALGORITHMS.values(), "EdDSA"):
            raise TokenError("algorithm", f"algorithm {alg!r} is not accepted")
        claims = self._decode(token, alg, self._candidates(alg, header.get("kid")))
        if not valid_sub(claims["sub"]):
            raise TokenError("sub", "the token's sub is not one plain subject token "
                                    "(empty, or it holds '.', '*', '>', spaces or control characters)")
        try:
            claim = parse_nats_claim(claims["nats"]) if "nats" in claims else NatsClaim()
        except ValueError as exc:
            raise TokenError("claims", f"the token's nats claim is malformed: {exc}") from None
        info = claims.get("info")
        if info is not None and (error := info_error(info)):
            raise TokenError("claims", f"the token's info claim is malformed: {error}")
        return Identity(sub=claims["sub"], expires_at=int(claims["exp"]), claim=claim, info=info)

    def _decode(self, token: str, alg: str, keys: list[Any]) -> dict[str, Any]:
        options = {"require": ["exp", "sub"], "verify_aud": self._audience is not None,
                   "verify_iss": self._issuer is not None}
        error: TokenError | None = None
        for key in keys:
            try:
                return jwt.decode(token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer,
                                  leeway=self._leeway, options=options)  # type: ignore[arg-type]
            except jwt.InvalidSignatureError:
                # Another key of the same type may have signed it (a file and a JWKS).
                error = TokenError("signature", "the token's signature is invalid")
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise _token_error(exc) from None
        assert error is not None
        raise error


def _token_error(exc: Exception) -> TokenError:
    for kind, reason, message in _DECODE_ERRORS:
        if isinstance(exc, kind):
            if isinstance(exc, jwt.MissingRequiredClaimError):
                return TokenError(reason, f"the token has no {exc.claim!r} claim")
            return TokenError(reason, message)
    return TokenError("invalid", f"the token is invalid: {exc}")

"""Keys and tokens for the tests: real keys generated here, real JWTs signed with PyJWT.

Also the forgeries the bridge must refuse, built by hand because PyJWT (rightly)
will not make them: ``alg: none`` and an HS256 token whose secret is an RSA
public key's PEM (the algorithm-confusion attack).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET = "test-secret-of-at-least-thirty-two-bytes!"


@dataclass(frozen=True)
class KeyPair:
    alg: str
    private: Any
    kid: str | None = None

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[self.alg].to_jwk(self.private.public_key()))
        if self.kid:
            jwk["kid"] = self.kid
        return jwk


@cache
def rsa_key(kid: str | None = None) -> KeyPair:
    return KeyPair("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048), kid)


@cache
def ec_key(kid: str | None = None) -> KeyPair:
    return KeyPair("ES256", ec.generate_private_key(ec.SECP256R1()), kid)


@cache
def ed_key(kid: str | None = None) -> KeyPair:
    return KeyPair("EdDSA", ed25519.Ed25519PrivateKey.generate(), kid)


def claims(sub: str = "alice", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "exp": int(now + ttl), "iat": now, **extra}


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def signed(payload: dict[str, Any], key: KeyPair, alg: str | None = None) -> str:
    headers = {"kid": key.kid} if key.kid else None
    return jwt.encode(payload, key.private, algorithm=alg or key.alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def unsigned(payload: dict[str, Any]) -> str:
    """``alg: none``: no signature at all."""
    return _segments({"alg": "none", "typ": "JWT"}, payload) + "."


def hmac_with_public_key(payload: dict[str, Any], key: KeyPair) -> str:
    """HS256 "signed" with the RSA public key's PEM as the secret: anyone can make this."""
    signing_input = _segments({"alg": "HS256", "typ": "JWT"}, payload)
    mac = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(mac)


def tampered(token: str) -> str:
    """The same token with one payload claim changed and the old signature kept."""
    head, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = "mallory"
    return ".".join((head, _b64(json.dumps(body).encode()), signature))

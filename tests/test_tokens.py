"""Token verification and per-user permissions as pure functions (tokens.py, permissions.py).

Each attack the code names is attacked here: alg none, algorithm confusion,
tampering, a key's alg downgrade, template injection through a ``sub``.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from minting import (
    SECRET,
    claims,
    ec_key,
    ed_key,
    hmac_with_public_key,
    hs256,
    rsa_key,
    signed,
    tampered,
    unsigned,
)

from bridge.core.permissions import NatsClaim, SubjectPolicy, parse_nats_claim, template_error
from bridge.core.tokens import BadKey, TokenError, Verifier, VerifyingKey, algorithms_for, jwk_key, jwks_keys


def public(key) -> VerifyingKey:
    pub = key.private.public_key()
    return VerifyingKey(pub, algorithms_for(pub), key.kid)


def reason_of(verifier: Verifier, token: str) -> str:
    with pytest.raises(TokenError) as refused:
        verifier.verify(token)
    return refused.value.reason


# ---------------------------------------------------------------------------
# Accepted tokens, one per algorithm family
# ---------------------------------------------------------------------------


def test_hs256_token_gives_its_sub_and_exp():
    payload = claims("alice")
    identity = Verifier(secret=SECRET.encode()).verify(hs256(payload))
    assert (identity.sub, identity.expires_at) == ("alice", payload["exp"])


@pytest.mark.parametrize("make_key", [rsa_key, ec_key, ed_key], ids=["RS256", "ES256", "EdDSA"])
def test_public_key_token_is_accepted(make_key):
    key = make_key()
    assert Verifier(public_keys=[public(key)]).verify(signed(claims("bob"), key)).sub == "bob"


def test_rsa_key_also_verifies_ps256():
    key = rsa_key()
    assert Verifier(public_keys=[public(key)]).verify(signed(claims(), key, alg="PS256")).sub == "alice"


# ---------------------------------------------------------------------------
# Refused tokens: each names its reason
# ---------------------------------------------------------------------------


def test_alg_none_is_refused():
    assert reason_of(Verifier(secret=SECRET.encode()), unsigned(claims())) == "algorithm"


def test_hs256_signed_with_the_public_keys_pem_is_refused_without_a_secret():
    # Algorithm confusion: the public key is public, so anyone can make this token.
    key = rsa_key()
    assert reason_of(Verifier(public_keys=[public(key)]), hmac_with_public_key(claims(), key)) == "algorithm"


def test_hs256_signed_with_the_public_keys_pem_is_refused_beside_a_secret():
    key = rsa_key()
    verifier = Verifier(secret=SECRET.encode(), public_keys=[public(key)])
    assert reason_of(verifier, hmac_with_public_key(claims(), key)) == "signature"


def test_tampered_payload_is_refused():
    assert reason_of(Verifier(secret=SECRET.encode()), tampered(hs256(claims()))) == "signature"


def test_token_signed_with_another_secret_is_refused():
    token = hs256(claims(), secret="another-secret-of-at-least-thirty-two-b")
    assert reason_of(Verifier(secret=SECRET.encode()), token) == "signature"


def test_es256_token_is_refused_when_only_an_rsa_key_is_configured():
    assert reason_of(Verifier(public_keys=[public(rsa_key())]), signed(claims(), ec_key())) == "algorithm"


def test_expired_token_is_refused():
    assert reason_of(Verifier(secret=SECRET.encode()), hs256(claims(ttl=-10))) == "expired"


def test_token_not_valid_yet_is_refused():
    token = hs256(claims(nbf=int(claims()["iat"]) + 3600))
    assert reason_of(Verifier(secret=SECRET.encode()), token) == "not_yet_valid"


def test_wrong_audience_is_refused():
    verifier = Verifier(secret=SECRET.encode(), audience="bridge")
    assert reason_of(verifier, hs256(claims(aud="other"))) == "audience"


def test_right_audience_is_accepted():
    verifier = Verifier(secret=SECRET.encode(), audience="bridge")
    assert verifier.verify(hs256(claims(aud=["other", "bridge"]))).sub == "alice"


def test_wrong_issuer_is_refused():
    verifier = Verifier(secret=SECRET.encode(), issuer="https://auth.example")
    assert reason_of(verifier, hs256(claims(iss="https://evil.example"))) == "issuer"


def test_token_without_exp_is_refused():
    payload = claims()
    del payload["exp"]
    assert reason_of(Verifier(secret=SECRET.encode()), hs256(payload)) == "claims"


def test_token_without_sub_is_refused():
    payload = claims()
    del payload["sub"]
    assert reason_of(Verifier(secret=SECRET.encode()), hs256(payload)) == "claims"


@pytest.mark.parametrize("sub", ["*", ">", "a.b", "", " alice", "al ice", "a\x00b", "a\tb", "user.*"])
def test_sub_that_is_not_one_plain_subject_token_is_refused(sub):
    # Template injection: user.{sub}.> with sub "*" would be user.*.>: everyone's subjects.
    assert reason_of(Verifier(secret=SECRET.encode()), hs256(claims(sub))) == "sub"


def test_malformed_token_is_refused():
    assert reason_of(Verifier(secret=SECRET.encode()), "not.a.jwt") == "malformed"


@pytest.mark.parametrize("token", ["\ud800", "eyJ\udfff.x.y", "jwt-ä.x.y"],
                         ids=["surrogate", "surrogate-inside", "non-ascii"])
def test_token_that_is_not_ascii_is_refused_as_malformed(token):
    # Found by the fuzzer: PyJWT raised UnicodeEncodeError on a lone surrogate.
    assert reason_of(Verifier(secret=SECRET.encode()), token) == "malformed"


def test_malformed_nats_claim_is_refused():
    token = hs256(claims(nats={"sub": {"allow": "user.>"}}))
    assert reason_of(Verifier(secret=SECRET.encode()), token) == "claims"


# ---------------------------------------------------------------------------
# JWKS
# ---------------------------------------------------------------------------


def test_jwks_kid_picks_the_key():
    one, two = rsa_key("one"), ec_key("two")
    verifier = Verifier(public_keys=jwks_keys({"keys": [one.jwk, two.jwk]}))
    assert verifier.verify(signed(claims("a"), one)).sub == "a"
    assert verifier.verify(signed(claims("b"), two)).sub == "b"


def test_jwks_unknown_kid_is_refused():
    verifier = Verifier(public_keys=jwks_keys({"keys": [rsa_key("one").jwk]}))
    assert reason_of(verifier, signed(claims(), rsa_key("gone"))) == "unknown_key"


def test_jwks_token_signed_by_another_key_under_a_known_kid_is_refused():
    verifier = Verifier(public_keys=jwks_keys({"keys": [rsa_key("one").jwk]}))
    impostor = rsa_key("impostor")
    token = signed(claims(), type(impostor)(impostor.alg, impostor.private, "one"))
    assert reason_of(verifier, token) == "signature"


def test_jwks_keys_own_alg_is_the_only_one_accepted():
    # A key published for PS256 must not verify an RS256 token (no downgrade).
    key = rsa_key("ps")
    verifier = Verifier(public_keys=jwks_keys({"keys": [{**key.jwk, "alg": "PS256"}]}))
    assert reason_of(verifier, signed(claims(), key, alg="RS256")) == "algorithm"


def test_jwks_symmetric_key_is_refused():
    with pytest.raises(BadKey):
        jwk_key({"kty": "oct", "k": "c2VjcmV0", "kid": "s"})


def test_jwks_key_for_encryption_is_refused():
    with pytest.raises(BadKey):
        jwk_key({**rsa_key("enc").jwk, "use": "enc"})


def test_short_rsa_key_is_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(BadKey):
        algorithms_for(small.public_key())


# ---------------------------------------------------------------------------
# Permissions: the server's policy and the token's claim
# ---------------------------------------------------------------------------

POLICY = SubjectPolicy(allow=("user.{sub}.>", "public.>"), publish_allow=("user.{sub}.>",))


@pytest.mark.parametrize("pattern", ["user.alice.x", "user.alice.*", "user.alice.>", "public.news",
                                     "public.>"])
def test_alice_may_follow_her_subjects_and_public_ones(pattern):
    assert POLICY.for_user("alice").subscribe_refusal(pattern) is None


@pytest.mark.parametrize("pattern", [">", "user.>", "user.*.>", "user.*.x", "user.bob.x", "*.alice.x",
                                     "other"])
def test_alice_may_not_follow_anything_reaching_beyond_them(pattern):
    assert POLICY.for_user("alice").subscribe_refusal(pattern) is not None


def test_anonymous_connection_gets_no_templated_subjects():
    perms = POLICY.for_user(None)
    assert perms.subscribe_refusal("public.news") is None
    assert perms.subscribe_refusal("user.alice.x") is not None


def test_claim_allow_narrows_the_servers_policy():
    perms = POLICY.for_user("alice", NatsClaim(sub_allow=("user.{sub}.orders.>",)))
    assert perms.subscribe_refusal("user.alice.orders.1") is None
    assert perms.subscribe_refusal("user.alice.profile") is not None
    assert perms.subscribe_refusal("public.news") is not None


def test_claim_allow_cannot_widen_the_servers_policy():
    perms = POLICY.for_user("alice", NatsClaim(sub_allow=(">",)))
    assert perms.subscribe_refusal("user.bob.x") is not None


def test_claim_deny_wins_and_filters_broader_patterns():
    perms = POLICY.for_user("alice", NatsClaim(sub_deny=("public.secret",)))
    assert perms.subscribe_refusal("public.secret") is not None
    assert perms.subscribe_refusal("public.>") is None
    assert perms.filters("public.>") == ("public.secret",)
    assert perms.filters("public.news") == ()


def test_backend_is_bound_by_the_server_policy_not_the_claim():
    perms = POLICY.for_user("alice", NatsClaim(sub_allow=("user.{sub}.a",), sub_deny=("public.x",)))
    assert perms.subscribe_refusal("user.alice.b", trusted=True) is None
    assert perms.subscribe_refusal("public.x", trusted=True) is None
    assert perms.filters("public.>", trusted=True) == ()
    assert perms.subscribe_refusal("user.bob.b", trusted=True) is not None


def test_publish_needs_server_and_claim_and_no_deny():
    claim = NatsClaim(pub_allow=("user.{sub}.chat.>",), pub_deny=("user.{sub}.chat.admin",))
    perms = POLICY.for_user("alice", claim)
    assert perms.publish_refusal("user.alice.chat.room") is None
    assert perms.publish_refusal("user.alice.profile") is not None
    assert perms.publish_refusal("user.alice.chat.admin") is not None
    assert perms.publish_refusal("user.bob.chat.room") is not None


@pytest.mark.parametrize("pattern", ["user.x{sub}.>", "user.{sub}x", "{sub}{sub}"])
def test_template_must_be_a_whole_token(pattern):
    assert template_error(pattern) is not None


def test_nats_claim_parses_nats_vocabulary():
    text = '{"sub": {"allow": ["a.>"], "deny": ["a.b"]}, "pub": {"deny": ["x"]}}'
    claim = parse_nats_claim(json.loads(text))
    assert claim == NatsClaim(sub_allow=("a.>",), sub_deny=("a.b",), pub_allow=None, pub_deny=("x",))


@pytest.mark.parametrize("value", [[], {"subscribe": {}}, {"sub": []}, {"sub": {"allow": ["a..b"]}},
                                   {"pub": {"allow": [1]}}, {"sub": {"permit": []}}])
def test_nats_claim_that_is_malformed_is_refused(value):
    with pytest.raises(ValueError):
        parse_nats_claim(value)

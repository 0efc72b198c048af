"""Subject policy: NATS wildcard semantics, default deny, allow lists, publish from the browser.

The matching helpers are checked against nats-server itself (which subjects a
real subscription receives) and against a brute-force model over a small
universe of subjects; the policy end to end through a real bridge.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from typing import Any

import nats
import pytest
from conftest import TIMEOUT, nats_synced, publish, unique

from bridge.config import ConfigError, load_config
from bridge.core.frames import BadFrame, publish_payload
from bridge.core.permissions import DEFAULT_DENY, SubjectPolicy
from bridge.core.subjects import pattern_within, patterns_overlap, subject_matches

# ---------------------------------------------------------------------------
# A small universe: every pattern over tokens a, b, *, > (up to 3 tokens) and
# every subject over a, b, c (up to 4 tokens).  'c' stands for "any other
# token", so a witness subject for any pair of patterns exists in here.
# ---------------------------------------------------------------------------


def all_patterns(max_tokens: int = 3) -> list[str]:
    patterns = []
    for n in range(1, max_tokens + 1):
        for head in itertools.product("ab*", repeat=n - 1):
            for last in "ab*>":
                patterns.append(".".join((*head, last)))
    return patterns


def all_subjects(max_tokens: int = 4) -> list[str]:
    return [".".join(t) for n in range(1, max_tokens + 1) for t in itertools.product("abc", repeat=n)]


PATTERNS = all_patterns()
SUBJECTS = all_subjects()


def matched_by(pattern: str) -> set[str]:
    return {s for s in SUBJECTS if subject_matches(pattern, s)}


# ---------------------------------------------------------------------------
# subject_matches
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.b.c", "a.b", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*.*", "a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.*.>", "a.b", False),
        ("a.*.>", "a.b.c", True),
        ("*.>", "_INBOX.x", True),
        ("_INBOX.>", "_INBOX", False),
        ("$SYS.>", "$SYS.ACCOUNT.x.CONNECT", True),
        ("$JS.>", "$JSX.a", False),
    ],
)
def test_subject_matches_follows_nats_wildcards(pattern, subject, expected):
    assert subject_matches(pattern, subject) is expected


async def test_subject_matches_agrees_with_nats_server_on_every_small_case(nc):
    """Subscribe every pattern for real, publish every subject of up to 3 tokens."""
    subjects = [s for s in SUBJECTS if s.count(".") < 3]
    prefix = "oracle" + uuid.uuid4().hex[:8]
    subs = {p: await nc.subscribe(f"{prefix}.{p}") for p in PATTERNS}
    for subject in subjects:
        await nc.publish(f"{prefix}.{subject}", subject.encode())
    # Every MSG nats-server sent before the PONG is in a pending queue after flush.
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    for pattern, sub in subs.items():
        got = set()
        for _ in range(sub.pending_msgs):
            got.add((await sub.next_msg(timeout=TIMEOUT)).data.decode())
        await sub.unsubscribe()
        expected = {s for s in subjects if subject_matches(pattern, s)}
        assert got == expected, pattern


# ---------------------------------------------------------------------------
# pattern_within and patterns_overlap, against the brute-force model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        ("a.b", "a.*", True),
        ("a.b", "a.>", True),
        ("a.*", "a.>", True),
        ("a.*.c", "a.>", True),
        ("a.*.>", "a.>", True),
        ("a.>", "a.>", True),
        ("a.>", "a.*", False),
        ("a.>", "a.*.>", False),
        ("a.*", "a.b", False),
        ("a", "a.>", False),
        ("*", "a", False),
        ("a.b", "*", False),
        (">", "_INBOX.>", False),
        ("*.>", "_INBOX.>", False),
        ("_INBOX.abc", "_INBOX.>", True),
        ("$JS.API.>", "$JS.>", True),
        ("$JS", "$JS.>", False),
    ],
)
def test_pattern_within_edge_cases(inner, outer, expected):
    assert pattern_within(inner, outer) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (">", "_INBOX.>", True),
        ("*.>", "$SYS.>", True),
        ("a.*", "*.b", True),
        ("a.>", "*.*", True),
        ("a.*.>", "a.>", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b.c", False),
        ("a.>", "a", False),
        ("*", "a.b", False),
        ("a.*.>", "a.b", False),
        ("*", ">", True),
        ("_x.*", "_INBOX.>", False),
    ],
)
def test_patterns_overlap_edge_cases(a, b, expected):
    assert patterns_overlap(a, b) is expected
    assert patterns_overlap(b, a) is expected


def test_pattern_within_agrees_with_subset_of_matched_subjects_for_all_small_patterns():
    wrong = [
        (inner, outer)
        for inner in PATTERNS
        for outer in PATTERNS
        if pattern_within(inner, outer) != (matched_by(inner) <= matched_by(outer))
    ]
    assert wrong == []


def test_patterns_overlap_agrees_with_common_matched_subject_for_all_small_patterns():
    wrong = [
        (a, b)
        for a in PATTERNS
        for b in PATTERNS
        if patterns_overlap(a, b) != bool(matched_by(a) & matched_by(b))
    ]
    assert wrong == []


# ---------------------------------------------------------------------------
# SubjectPolicy as a unit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["_INBOX.>", "_INBOX.abc", "$SYS.>", "$JS.API.>", "$KV.b.k", "$O.x"])
def test_default_policy_refuses_patterns_that_only_match_denied_subjects(pattern):
    assert SubjectPolicy().for_user().subscribe_refusal(pattern) is not None


@pytest.mark.parametrize("pattern", [">", "*.>", "*", "a.b", "$JS", "*.API.>", "_x.*"])
def test_default_policy_accepts_patterns_that_can_match_allowed_subjects(pattern):
    assert SubjectPolicy().for_user().subscribe_refusal(pattern) is None


def test_default_deny_list_is_the_documented_one():
    assert set(DEFAULT_DENY) == {"$SYS.>", "$JS.>", "$KV.>", "$O.>", "_INBOX.>"}


@pytest.mark.parametrize(
    ("subject", "permitted"),
    [("a.b", True), ("_INBOX.x", False), ("$SYS.x", False), ("$JS.API.INFO", False), ("$JS", True)],
)
def test_default_policy_permits_only_subjects_outside_deny_list(subject, permitted):
    assert SubjectPolicy().permits(subject) is permitted


@pytest.mark.parametrize(
    ("pattern", "filtered"), [(">", True), ("*.>", True), ("a.b", False), ("a.*", False)]
)
def test_policy_filters_only_patterns_that_can_reach_denied_subjects(pattern, filtered):
    assert SubjectPolicy().needs_filter(pattern) is filtered


def test_allow_list_policy_refuses_pattern_outside_it():
    refusal = SubjectPolicy(allow=("chat.>",)).for_user().subscribe_refusal("other.x")
    assert "not within the subjects" in refusal


@pytest.mark.parametrize("pattern", [">", "*.room", "chat", "*.>"])
def test_allow_list_policy_refuses_broad_pattern_reaching_beyond_it(pattern):
    # As nats-server checks a SUB: a pattern must lie within an allowed one.
    assert SubjectPolicy(allow=("chat.>",)).for_user().subscribe_refusal(pattern) is not None


@pytest.mark.parametrize("pattern", ["chat.>", "chat.*", "chat.room", "chat.*.x"])
def test_allow_list_policy_accepts_patterns_within_it(pattern):
    assert SubjectPolicy(allow=("chat.>",)).for_user().subscribe_refusal(pattern) is None


# The control plane (CONTROL_SUBJECT): the threat is a browser publishing a
# backend command through the bridge's own NATS connection, or reading others'
# connection ids there.  No setting opens it (permissions.control_patterns).

EVERYTHING = SubjectPolicy(allow=(">",), deny=(), publish_allow=(">",))


@pytest.mark.parametrize("pattern", ["bridge.control", "bridge.control.>", "bridge.control.instances",
                                     "bridge.control.each.users.disconnect", "bridge.control.*.request"])
def test_control_plane_cannot_be_subscribed_even_when_everything_is_allowed(pattern):
    assert EVERYTHING.for_user().subscribe_refusal(pattern) is not None


@pytest.mark.parametrize("subject", ["bridge.control", "bridge.control.x", "bridge.control.users.disconnect",
                                     "bridge.control.each.clients.request"])
def test_control_plane_cannot_be_published_to_even_when_everything_is_allowed(subject):
    assert EVERYTHING.for_user().publish_refusal(subject) is not None


def test_control_plane_is_refused_to_a_trusted_backend_acting_for_a_client():
    perms = EVERYTHING.for_user()
    assert perms.subscribe_refusal("bridge.control.>", trusted=True) is not None
    assert perms.publish_refusal("bridge.control.users.disconnect", trusted=True) is not None


@pytest.mark.parametrize("pattern", [">", "bridge.>", "*.control.>", "bridge.*", "*.*.instances"])
def test_wildcards_that_reach_the_control_plane_are_accepted_but_filtered_per_message(pattern):
    assert EVERYTHING.for_user().subscribe_refusal(pattern) is None
    assert EVERYTHING.needs_filter(pattern)


@pytest.mark.parametrize("subject",
                         ["bridge.control", "bridge.control.instances", "bridge.control.replies.a.1"])
def test_control_plane_messages_are_never_permitted_through_a_wildcard(subject):
    assert not EVERYTHING.permits(subject)


def test_neighbours_of_the_control_plane_stay_open():
    assert EVERYTHING.permits("bridge.controls")
    assert EVERYTHING.for_user().publish_refusal("bridge.other") is None


def test_control_plane_deny_follows_control_subject():
    policy = SubjectPolicy(allow=(">",), deny=(), publish_allow=(">",), control_subject="ops.plane")
    assert policy.for_user().publish_refusal("ops.plane.users.disconnect") is not None
    assert policy.for_user().publish_refusal("bridge.control.x") is None


def test_control_subject_setting_rejects_wildcards():
    with pytest.raises(ConfigError):
        load_config([], {"CONTROL_SUBJECT": "bridge.*"})


def test_publish_policy_applies_deny_list_even_when_allowed():
    perms = SubjectPolicy(publish_allow=(">",)).for_user()
    assert perms.publish_refusal("chat.room") is None
    assert perms.publish_refusal("_INBOX.x") is not None


# SUBJECT_DENY adds to the built-in protected subjects (security review, finding 6).
# Threat: an operator sets SUBJECT_DENY='internal.>' to hide their own subjects;
# had that replaced the built-in list, browsers could read every app's reply
# inboxes and drive JetStream's API (delete streams).  Only a setting that says
# it is dangerous, naming each built-in pattern, removes one.

ATTACKED = {"SUBJECT_DENY": "internal.>", "PUBLISH_ALLOW": ">"}


@pytest.mark.parametrize("pattern", DEFAULT_DENY)
def test_subject_deny_adds_to_the_built_in_protected_subjects(pattern):
    perms = load_config([], ATTACKED).policy.for_user()
    assert perms.subscribe_refusal(pattern) is not None
    assert perms.publish_refusal(pattern.replace(">", "x")) is not None


def test_subject_deny_still_denies_what_it_names():
    perms = load_config([], ATTACKED).policy.for_user()
    assert perms.subscribe_refusal("internal.>") is not None
    assert perms.publish_refusal("internal.x") is not None


@pytest.mark.parametrize("pattern", DEFAULT_DENY)
def test_dangerously_unprotect_subjects_opens_exactly_the_named_pattern(pattern):
    env = {"DANGEROUSLY_UNPROTECT_SUBJECTS": pattern, "PUBLISH_ALLOW": ">"}
    perms = load_config([], env).policy.for_user()
    opened = {p for p in DEFAULT_DENY
              if perms.subscribe_refusal(p) is None and perms.publish_refusal(p.replace(">", "x")) is None}
    assert opened == {pattern}


def test_dangerously_unprotect_subjects_never_opens_the_control_plane():
    env = {"DANGEROUSLY_UNPROTECT_SUBJECTS": ",".join(DEFAULT_DENY), "PUBLISH_ALLOW": ">"}
    perms = load_config([], env).policy.for_user()
    assert perms.subscribe_refusal("bridge.control.>") is not None
    assert perms.publish_refusal("bridge.control.users.disconnect") is not None


def test_subject_deny_wins_over_dangerously_unprotect_subjects():
    env = {"DANGEROUSLY_UNPROTECT_SUBJECTS": "$JS.>", "SUBJECT_DENY": "$JS.API.>", "PUBLISH_ALLOW": ">"}
    perms = load_config([], env).policy.for_user()
    assert perms.publish_refusal("$JS.API.STREAM.DELETE.X") is not None
    assert perms.publish_refusal("$JS.ACK.x") is None


@pytest.mark.parametrize("value", ["internal.>", "$JS.API.>", ">", "$js.>", "$JS.>,bridge.control.>"])
def test_dangerously_unprotect_subjects_takes_only_built_in_patterns(value):
    with pytest.raises(ConfigError) as error:
        load_config([], {"DANGEROUSLY_UNPROTECT_SUBJECTS": value})
    message = str(error.value)
    assert "DANGEROUSLY_UNPROTECT_SUBJECTS" in message and "\n" not in message
    assert "$SYS.>" in message  # says what it may name


# ---------------------------------------------------------------------------
# End to end through the bridge
# ---------------------------------------------------------------------------



async def subjects_until(client: Any, marker: str) -> list[str]:
    """Subjects forwarded to ``client`` up to and including ``marker``."""
    seen = []
    while True:
        frame = await client.receive_message()
        seen.append(frame["subject"])
        if frame["subject"] == marker:
            return seen


@pytest.mark.parametrize("pattern", ["_INBOX.>", "$SYS.>", "$JS.API.>", "_INBOX.abc"])
async def test_bridge_refuses_subscription_to_denied_subjects(bridge, ws_factory, pattern):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": [pattern]})
    assert frame["success"] is False
    assert "not allowed" in frame["message"]


async def test_refused_denied_subscription_creates_no_nats_subscription(bridge, ws_factory, nats_server):
    client = await ws_factory(bridge.ws_url)
    await client.request({"action": "subscribe", "subjects": ["_INBOX.>"]})
    await asyncio.wait_for(bridge.app.nats.client.flush(), TIMEOUT)
    assert "_INBOX.>" not in nats_server.subscriptions_of(bridge.name)


@pytest.mark.parametrize("pattern", [">", "*.>"])
async def test_broad_pattern_is_accepted(bridge, ws_factory, pattern):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": [pattern]})
    assert frame["success"] is True


@pytest.mark.parametrize("pattern", [">", "*.>"])
async def test_broad_pattern_never_forwards_denied_subjects(bridge, ws_factory, nc, pattern):
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(pattern)
    await asyncio.wait_for(bridge.app.nats.client.flush(), TIMEOUT)
    tag = uuid.uuid4().hex[:8]
    for denied in (f"_INBOX.{tag}", f"$SYS.{tag}", f"$JS.API.{tag}", f"$KV.b.{tag}"):
        await publish(nc, denied, {"secret": True})
    marker = f"a.{tag}"
    await publish(nc, marker, {"ok": True})
    # Same NATS connection, same subscription: a forwarded denied message would come first.
    assert await subjects_until(client, marker) == [marker]


async def test_bridge_with_allow_list_refuses_subject_outside_it(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, subject_allow=("chat.>",))
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": ["other.x"]})
    assert frame["success"] is False
    assert "not allowed" in frame["message"]


async def test_bridge_with_allow_list_accepts_subject_inside_it(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, subject_allow=("chat.>",))
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": ["chat.room"]})
    assert frame["success"] is True


async def test_bridge_with_allow_list_refuses_broad_pattern_reaching_outside_it(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, subject_allow=("chat.>",))
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": [">"]})
    assert frame["success"] is False
    assert "not within the subjects" in frame["message"]


async def test_publish_is_refused_when_disabled(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "publish", "subject": "chat.room", "data": "hi"})
    assert frame["success"] is False
    assert "Publishing is disabled" in frame["message"]


@pytest.mark.parametrize(
    "frame",
    [
        {"action": "publish"},
        {"action": "publish", "subjects": ["x"]},
        {"action": "publish", "subject": "bad..subject", "data": 1},
        {"action": "publish", "subject": "x", "data": "AA", "encoding": "base64", "id": 7},
    ],
    ids=["nothing-else", "subjects-instead-of-subject", "invalid-subject", "complete"],
)
async def test_publish_disabled_is_said_before_the_rest_of_the_frame_is_checked(bridge, ws_factory, frame):
    client = await ws_factory(bridge.ws_url)
    reply = await client.request(frame)
    assert (reply["success"], reply["message"]) == (False, "Publishing is disabled on this bridge")


async def test_welcome_says_publish_false_when_disabled(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["publish"] is False


async def test_welcome_says_publish_true_when_enabled(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("chat.>",))
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["publish"] is True


async def test_publish_to_allowed_subject_arrives_on_nats(bridge_factory, nats_server, ws_factory, nc):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("chat.>",))
    client = await ws_factory(bridge.ws_url)
    sub = await nc.subscribe("chat.room")
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    frame = await client.request({"action": "publish", "subject": "chat.room", "data": {"text": "hé"}})
    assert frame["success"] is True, frame
    msg = await sub.next_msg(timeout=TIMEOUT)
    assert json.loads(msg.data) == {"text": "hé"}


async def test_publish_to_subject_outside_publish_allow_is_refused(
    bridge_factory, nats_server, ws_factory, nc
):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("chat.>",))
    client = await ws_factory(bridge.ws_url)
    sub = await nc.subscribe("other.x")
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    frame = await client.request({"action": "publish", "subject": "other.x", "data": "hi"})
    assert frame["success"] is False
    assert "not allowed" in frame["message"]
    await asyncio.wait_for(bridge.app.nats.client.flush(), TIMEOUT)
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    assert sub.pending_msgs == 0


async def test_publish_to_denied_subject_is_refused_even_when_publish_allows_all(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=(">",))
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "publish", "subject": "_INBOX.x", "data": "hi"})
    assert frame["success"] is False


async def test_publish_payload_at_max_publish_bytes_is_accepted(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("chat.>",), max_publish_bytes=100)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "publish", "subject": "chat.room", "data": "x" * 100})
    assert frame["success"] is True, frame


async def test_publish_payload_over_max_publish_bytes_is_refused(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("chat.>",), max_publish_bytes=100)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "publish", "subject": "chat.room", "data": "x" * 101})
    assert frame["success"] is False
    assert "too large" in frame["message"]


async def test_subject_deny_setting_leaves_jetstream_and_inboxes_closed_to_a_browser(
    js_server, bridge_factory, ws_factory
):
    # The attack of finding 6, end to end: SUBJECT_DENY='internal.>' PUBLISH_ALLOW='>'.
    config = load_config([], ATTACKED)
    bridge = await bridge_factory(nats_url=js_server.url, subject_deny=config.subject_deny,
                                  publish_allow=config.publish_allow)
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        js = nc.jetstream()
        name = f"VICTIM_{uuid.uuid4().hex[:8]}"
        await asyncio.wait_for(js.add_stream(name=name, subjects=[f"{name.lower()}.>"]), TIMEOUT)
        attacker = await ws_factory(bridge.ws_url)
        for pattern in ("_INBOX.>", "$JS.>"):
            frame = await attacker.request({"action": "subscribe", "subjects": [pattern]})
            assert frame["success"] is False and "not allowed" in frame["message"], frame
        frame = await attacker.request({"action": "publish", "subject": f"$JS.API.STREAM.DELETE.{name}",
                                        "data": ""})
        assert frame["success"] is False and "not allowed" in frame["message"], frame
        await nats_synced(bridge)
        info = await asyncio.wait_for(js.stream_info(name), TIMEOUT)
        assert info.config.name == name
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)


async def test_dangerously_unprotect_subjects_lets_a_browser_follow_the_named_pattern(
    nats_server, bridge_factory, ws_factory, nc
):
    bridge = await bridge_factory(nats_url=nats_server.url, dangerously_unprotect_subjects=("_INBOX.>",))
    client = await ws_factory(bridge.ws_url)
    tag = uuid.uuid4().hex[:8]
    await client.subscribe(f"_INBOX.{tag}")
    assert (await client.request({"action": "subscribe", "subjects": ["$JS.>"]}))["success"] is False
    await nats_synced(bridge)
    await publish(nc, f"_INBOX.{tag}", {"opened": True})
    assert (await client.receive_message())["data"] == {"opened": True}


async def test_dangerously_unprotect_subjects_is_logged_as_a_warning_at_start(nats_server, bridge_factory,
                                                                             caplog):
    caplog.set_level("WARNING")
    await bridge_factory(nats_url=nats_server.url, dangerously_unprotect_subjects=("$JS.>", "_INBOX.>"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("DANGEROUSLY_UNPROTECT_SUBJECTS" in w and "$JS.>" in w and "_INBOX.>" in w
               for w in warnings), warnings


# Non-finite numbers (security review, finding 11).  Threat: a browser publishes
# 1e999, NaN or Infinity and NATS subscribers get `Infinity`/`NaN`, which is not
# JSON: their parsers fail (or, worse, some accept it), on a subject the bridge
# was trusted to feed only JSON.  Each is refused and nothing reaches NATS.

NON_FINITE = {
    "1e999": ("1e999", "too large for JSON"),
    "-1e999": ("-1e999", "too large for JSON"),
    "NaN": ("NaN", "NaN is not a JSON value"),
    "Infinity": ("Infinity", "Infinity is not a JSON value"),
    "-Infinity": ("-Infinity", "-Infinity is not a JSON value"),
    "in-an-array": ("[1, 2, 1e999]", "too large for JSON"),
    "nan-in-an-object": ('{"a": {"b": [NaN]}}', "NaN is not a JSON value"),
    "in-an-object": ('{"t": -1e999}', "too large for JSON"),
}


@pytest.fixture
async def publishing(bridge_factory, nats_server, ws_factory, nc) -> Any:
    """A bridge that lets browsers publish under ``pub.``, a browser, and NATS listening there."""
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("pub.>",))
    subject = unique("pub")
    sub = await nc.subscribe(subject)
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    return {"client": await ws_factory(bridge.ws_url), "subject": subject, "sub": sub}


@pytest.mark.parametrize("case", NON_FINITE)
async def test_publish_of_a_non_finite_number_is_refused_and_nothing_reaches_nats(publishing, case):
    data, words = NON_FINITE[case]
    client, subject, sub = publishing["client"], publishing["subject"], publishing["sub"]
    frame = await client.request(f'{{"action": "publish", "subject": "{subject}", "data": {data}}}')
    assert frame["success"] is False and words in frame["message"], frame
    # A good publish after it is the first thing NATS delivers: the refused one never went out.
    assert (await client.request({"action": "publish", "subject": subject, "data": "next"}))["success"]
    assert (await sub.next_msg(TIMEOUT)).data == b"next"


async def test_publish_of_a_big_finite_integer_reaches_nats_exactly(publishing):
    client, subject, sub = publishing["client"], publishing["subject"], publishing["sub"]
    big = "123456789012345678901234567890123456789"
    frame = await client.request(f'{{"action": "publish", "subject": "{subject}", "data": {big}}}')
    assert frame["success"] is True, frame
    assert (await sub.next_msg(TIMEOUT)).data == big.encode()


async def test_publish_of_the_largest_finite_double_reaches_nats(publishing):
    client, subject, sub = publishing["client"], publishing["subject"], publishing["sub"]
    largest = "1.7976931348623157e308"
    frame = await client.request(f'{{"action": "publish", "subject": "{subject}", "data": [{largest}]}}')
    assert frame["success"] is True, frame
    assert json.loads((await sub.next_msg(TIMEOUT)).data) == [float(largest)]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), [1, {"x": float("inf")}]])
def test_publish_payload_refuses_non_finite_numbers_however_they_arrive(value):
    # The HTTP and NATS control paths parse with parse_object too; this guards any other caller.
    with pytest.raises(BadFrame) as refused:
        publish_payload({"data": value})
    assert refused.value.kind == "publish" and "too large for JSON" in refused.value.message

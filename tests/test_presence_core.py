"""Presence's pure part (bridge/core/presence.py), directly: the table, where presence is kept,
the stored form and its names; and the token's info claim."""

from __future__ import annotations

import pytest
from minting import SECRET, claims, hs256

from bridge.core.presence import (
    Change,
    Entry,
    PresenceNames,
    PresenceSpace,
    PresenceTable,
    decode_entry,
    is_deletion,
)
from bridge.core.tokens import MAX_INFO_BYTES, TokenError, Verifier
from bridge.presence.feed import pending_of


def entry(client: str, subject: str = "room.1", user: str | None = None, since: int = 100) -> Entry:
    return Entry(subject, user, client, since)


def kinds(changes: list[Change]) -> list[tuple[str, str]]:
    return [(c.kind, c.entry.client) for c in changes]


# -- the table ----------------------------------------------------------------------


def test_an_entry_is_visible_only_while_its_incarnations_lease_is_alive():
    table = PresenceTable()
    assert table.put("i1", entry("c1")) == []  # no lease seen yet: held, not shown
    assert table.visible("room.1") == {}
    assert kinds(table.lease("i1")) == [("join", "c1")]
    assert set(table.visible("room.1")) == {"c1"}
    assert kinds(table.end("i1")) == [("leave", "c1")]
    assert table.visible("room.1") == {} and table.orphans() == set()


def test_a_lease_renewed_changes_nothing():
    table = PresenceTable()
    table.lease("i1")
    table.put("i1", entry("c1"))
    assert table.lease("i1") == [] and table.put("i1", entry("c1")) == []


def test_an_entry_written_again_under_a_new_incarnation_moves_without_a_leave_or_join():
    table = PresenceTable()
    table.lease("old")
    assert kinds(table.put("old", entry("c1"))) == [("join", "c1")]
    table.lease("new")
    assert table.put("new", entry("c1")) == []
    assert table.end("old") == []
    assert set(table.visible("room.1")) == {"c1"}
    assert kinds(table.drop("new", "c1")) == [("leave", "c1")]


def test_a_removed_entry_leaves_once_and_a_second_removal_is_nothing():
    table = PresenceTable()
    table.lease("i1")
    table.put("i1", entry("c1"))
    assert kinds(table.drop("i1", "c1")) == [("leave", "c1")]
    assert table.drop("i1", "c1") == []


def test_entries_of_an_incarnation_never_seen_alive_are_orphans_and_end_silently():
    table = PresenceTable()
    table.put("ghost", entry("c1"))
    assert table.orphans() == {"ghost"}
    assert table.end("ghost") == [] and table.orphans() == set()


def test_an_answer_is_cut_at_the_limit_oldest_first_with_exact_count_and_users():
    table = PresenceTable()
    table.lease("i1")
    for n, user in enumerate(["a", "b", None, "a", "c", None]):
        table.put("i1", entry(f"c{n}", user=user, since=100 + n))
    table.put("i1", entry("elsewhere", subject="room.2", user="z"))
    answer = table.answer("room.1", 2)
    assert [e["client"] for e in answer["presence"]] == ["c0", "c1"]
    assert (answer["count"], answer["users"]) == (6, 3)
    assert table.answer("room.3", 2) == {"presence": [], "count": 0, "users": 0}


def test_changes_to_a_fresh_read_are_the_difference_only():
    old, new = PresenceTable(), PresenceTable()
    for table in (old, new):
        table.lease("i1")
        table.put("i1", entry("stays"))
    old.put("i1", entry("went"))
    new.put("i1", entry("came"))
    assert sorted(kinds(old.changes_to(new))) == [("join", "came"), ("leave", "went")]


def test_join_and_leave_frames_say_what_the_protocol_says():
    e = Entry("room.1", "alice", "c1", 100, {"name": "A"})
    assert Change("join", e).frame() == {"type": "join", "subject": "room.1", "user": "alice", "client": "c1",
                                         "since": 100, "info": {"name": "A"}}
    assert Change("leave", e).frame() == {"type": "leave", "subject": "room.1", "user": "alice",
                                          "client": "c1"}


# -- where presence is kept --------------------------------------------------------------


def test_presence_is_kept_on_exact_subjects_within_the_patterns_with_sub_resolved():
    space = PresenceSpace(("room.*", "desk.{sub}"))
    assert space.keeps("room.1", None) and not space.keeps("room.1.x", None)
    assert not space.keeps("room.*", None) and not space.keeps("room.>", None)
    assert space.keeps("desk.alice", "alice") and not space.keeps("desk.alice", "bob")
    assert not space.keeps("desk.alice", None)  # anonymous: {sub} matches nothing
    assert "exact subject" in space.refusal("room.*", None)
    assert "PRESENCE_SUBJECTS" in space.refusal("lobby", None)
    assert "empty" in PresenceSpace().refusal("room.1", None)


# -- the stored form ---------------------------------------------------------------------


def test_an_entry_survives_its_stored_form_and_anything_else_is_no_entry():
    e = Entry("room.1", None, "c1", 100, {"big": 12345678901234567890})
    assert decode_entry(e.encode()) == e
    for bad in (b"", b"[]", b"not json", b'{"subject": "a", "client": "c", "since": true, "user": null}',
                b'{"subject": "a", "client": 1, "since": 1, "user": null}', b"\xff"):
        assert decode_entry(bad) is None, bad


def test_names_live_under_the_control_subject_and_parse_back():
    names = PresenceNames("bridge.control")
    assert names.pattern == "bridge.control.presence.>"
    assert names.parse(names.lease("i1")) == ("lease", "i1", None)
    assert names.parse(names.entry("i1", "c1")) == ("entry", "i1", "c1")
    assert names.parse("bridge.control.instances") is None
    assert names.stream == "PRESENCE_bridge_control"
    assert len(PresenceNames("x" * 200).stream) <= 64


def test_only_markers_are_deletions():
    assert is_deletion({"Nats-Marker-Reason": "MaxAge"}) and is_deletion({"KV-Operation": "DEL"})
    assert not is_deletion(None) and not is_deletion({"Nats-TTL": "5s"})


def test_pending_is_read_from_both_forms_of_the_ack_subject():
    assert pending_of("$JS.ACK.S.C.1.10.3.1700000000000000000.7") == 7
    assert pending_of("$JS.ACK.dom.hash.S.C.1.10.3.1700000000000000000.0.rnd") == 0
    assert pending_of("_INBOX.x") is None


# -- the token's info claim ------------------------------------------------------------------


def test_a_tokens_info_object_is_kept_as_it_is():
    info = {"name": "Alice", "colour": "#c0ffee", "n": 12345678901234567890}
    assert Verifier(SECRET.encode()).verify(hs256(claims("alice", info=info))).info == info


@pytest.mark.parametrize("info", ["Alice", ["a"], {"blob": "x" * MAX_INFO_BYTES}],
                         ids=["string", "list", "large"])
def test_an_info_claim_that_is_not_a_small_object_is_refused(info):
    with pytest.raises(TokenError) as caught:
        Verifier(SECRET.encode()).verify(hs256(claims("alice", info=info)))
    assert caught.value.reason == "claims" and "info" in caught.value.message

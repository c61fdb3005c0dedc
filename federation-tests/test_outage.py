"""Outages between Convo and Synapse: a Synapse that was down gets every message a Convo
server sent meanwhile (from Convo's persisted queue); a Convo server that was down gets
every message Synapse sent meanwhile (Synapse sends only its latest event when it catches
up, so Convo fills the gap with get_missing_events); and state changed on both sides while
they could not talk (power levels and a membership) ends the same on both after state
resolution."""

import time
from urllib.parse import quote

import pytest

from clients import User, unique
from test_rooms import is_member, is_text


def state_ids(user: User, room: str) -> dict[tuple[str, str], str]:
    r = user.get(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/state")
    assert r.status_code == 200, f"state on {user.server}: {r.status_code} {r.text}"
    return {(e["type"], e["state_key"]): e["event_id"] for e in r.json()}


def event_of(user: User, room: str, event_id: str) -> dict | None:
    r = user.get(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/event/{quote(event_id, safe='')}")
    return r.json() if r.status_code == 200 else None


def put_state(user: User, room: str, event_type: str, state_key: str, content: dict) -> str:
    r = user.put(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/state/{event_type}/{quote(state_key, safe='')}",
                 content)
    assert r.status_code == 200, f"state on {user.server}: {r.status_code} {r.text}"
    return r.json()["event_id"]


def power_levels(user: User, room: str) -> dict:
    r = user.get(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/state/m.room.power_levels/")
    assert r.status_code == 200, r.text
    return r.json()


def require_convo(fed):
    if fed.convo_a.kind != "convo":
        pytest.skip("reads convo_a's queue in its SQLite database")


def test_synapse_that_was_down_gets_every_message_from_convo(fed):
    require_convo(fed)
    owner = fed.convo_a.register(unique("owner"))
    guest = fed.synapse.register(unique("guest"))
    room = owner.create_room(preset="public_chat")
    guest.join(room, via=[fed.convo_a.name])
    owner.wait_for_event(room, is_member(guest.user_id, "join"))

    fed.synapse.stop()
    try:
        bodies = [f"while synapse was down {i}" for i in range(5)]
        sent = [owner.send_text(room, body) for body in bodies]
    finally:
        fed.synapse.start()
    for body, event_id in zip(bodies, sent):
        assert guest.wait_for_event(room, is_text(body))["event_id"] == event_id
    order = [e["event_id"] for e in guest.messages(room) if e["type"] == "m.room.message"]
    assert order[-5:] == sent
    fed.convo_a.wait_outbox_drained(fed.synapse.name)


def test_convo_that_was_down_gets_every_message_from_synapse(fed):
    owner = fed.synapse.register(unique("owner"))
    guest = fed.convo_a.register(unique("guest"))
    room = owner.create_room(preset="public_chat")
    guest.join(room, via=[fed.synapse.name])
    owner.wait_for_event(room, is_member(guest.user_id, "join"))

    fed.convo_a.stop()
    try:
        bodies = [f"while convo was down {i}" for i in range(5)]
        sent = [owner.send_text(room, body) for body in bodies]
    finally:
        fed.convo_a.start()
    # Synapse backs off from convo_a for minutes; a request from convo_a tells it that
    # convo_a is back, and it sends its latest event, whose gap convo_a fills.
    back = guest.send_text(room, "back")
    assert owner.wait_for_event(room, is_text("back"))["event_id"] == back
    for body, event_id in zip(bodies, sent):
        assert guest.wait_for_event(room, is_text(body))["event_id"] == event_id
    order = [e["event_id"] for e in guest.messages(room) if e["type"] == "m.room.message"]
    assert [i for i in order if i in sent] == sent


def test_state_changed_on_both_sides_while_apart_resolves_alike(fed):
    """A room on convo_a with one admin on each server. While convo_a is down, the Synapse
    admin changes the power levels and a Synapse member changes their member event; once
    convo_a is back (before it hears of those), its admin changes the power levels another
    way and bans that member. Both servers then hold both branches and agree on the state."""
    convo_admin = fed.convo_a.register(unique("cadmin"))
    synapse_admin = fed.synapse.register(unique("sadmin"))
    member = fed.synapse.register(unique("member"))
    # Room version 11: two admins of equal power (since v12 the creator outranks all).
    room = convo_admin.create_room(preset="public_chat", room_version="11")
    for user in (synapse_admin, member):
        user.join(room, via=[fed.convo_a.name])
        convo_admin.wait_for_event(room, is_member(user.user_id, "join"))
    levels = power_levels(convo_admin, room)
    levels["users"][synapse_admin.user_id] = 100
    put_state(convo_admin, room, "m.room.power_levels", "", levels)
    synapse_admin.wait_for_event(room, lambda e: e.get("type") == "m.room.power_levels"
                                 and e["content"].get("users", {}).get(synapse_admin.user_id) == 100)

    fed.convo_a.stop()
    try:
        theirs = power_levels(synapse_admin, room)
        theirs.setdefault("events", {})["m.room.name"] = 100
        their_levels = put_state(synapse_admin, room, "m.room.power_levels", "", theirs)
        their_member = put_state(member, room, "m.room.member", member.user_id,
                                 {"membership": "join", "displayname": "Renamed while apart"})
    finally:
        fed.convo_a.start()
    # Synapse backs off from convo_a for minutes, so convo_a hears of those only once it
    # has sent something itself: these two are built on convo_a's older state.
    ours = power_levels(convo_admin, room)
    ours.setdefault("events", {})["m.room.topic"] = 100
    our_levels = put_state(convo_admin, room, "m.room.power_levels", "", ours)
    r = convo_admin.post(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/ban",
                         {"user_id": member.user_id, "reason": "while apart"})
    assert r.status_code == 200, r.text

    # Each server gets the other's branch.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # (Not the rename: convo_a may soft-fail it, as it arrives after the ban.)
        have = [event_of(convo_admin, room, their_levels), event_of(synapse_admin, room, our_levels)]
        if all(have):
            break
        time.sleep(0.2)
    assert all(have), f"branches not exchanged: {[bool(h) for h in have]}\n{fed.convo_a.log_tail()}"
    # The two branches were concurrent: convo_a built its levels on its older view.
    assert have[1]["content"]["events"].get("m.room.name") != 100
    assert have[0]["content"]["events"].get("m.room.topic") != 100

    # Both servers settle on the same state (compared once both are quiet).
    deadline = time.monotonic() + 30
    while True:
        ours_state, theirs_state = state_ids(convo_admin, room), state_ids(synapse_admin, room)
        if ours_state == theirs_state or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    differing = {k: (ours_state.get(k), theirs_state.get(k)) for k in ours_state.keys() | theirs_state.keys()
                 if ours_state.get(k) != theirs_state.get(k)}
    assert not differing, f"convo_a and Synapse disagree on {differing} (levels: ours {our_levels}, theirs {their_levels})"
    # State resolution v2: the power events (both levels, the ban) are ordered by their
    # senders' power (equal) and then time: Synapse's levels first, then convo_a's, which
    # pass auth and so stand. The rename (not a power event) then fails against the ban.
    assert ours_state[("m.room.power_levels", "")] == our_levels
    r = convo_admin.get(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/state/m.room.member/"
                        f"{quote(member.user_id, safe='')}")
    assert r.status_code == 200 and r.json()["membership"] == "ban", r.text

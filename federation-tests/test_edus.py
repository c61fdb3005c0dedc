"""Ephemeral data across servers: typing notices, read receipts and presence of a user
of one server, seen by a user of another, between Convo and Synapse both ways and
between the two Convo servers."""

import time
from urllib.parse import quote

import pytest

from clients import unique

PAIRS = [("convo_a", "synapse"), ("synapse", "convo_a"), ("convo_a", "convo_b")]


def shared_room(fed, home, away):
    """A public room on `home` with a user of each server in it."""
    owner = fed.by_label(home).register(unique("owner"))
    guest = fed.by_label(away).register(unique("guest"))
    room = owner.create_room(preset="public_chat")
    guest.join(room, via=[fed.by_label(home).name])
    owner.wait_for_event(room, lambda e: e.get("type") == "m.room.member" and e.get("state_key") == guest.user_id
                         and e["content"].get("membership") == "join")
    return owner, guest, room


def wait_for_ephemeral(user, room, predicate, deadline_s=30):
    """Long-polls /sync until an ephemeral event of `room` satisfies `predicate`."""
    since = None
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        body = user.sync(since, timeout_ms=1000 if since else 0)
        since = body["next_batch"]
        events = body.get("rooms", {}).get("join", {}).get(room, {}).get("ephemeral", {}).get("events", [])
        for event in events:
            if predicate(event):
                return event
    raise TimeoutError(f"{user.user_id} on {user.server}: no matching ephemeral event in {room}\n"
                       f"{user.server.log_tail()}")


@pytest.mark.parametrize("home,away", PAIRS)
def test_typing_crosses_servers(fed, home, away):
    owner, guest, room = shared_room(fed, home, away)
    r = guest.put(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/typing/{quote(guest.user_id)}",
                  {"typing": True, "timeout": 30000})
    assert r.status_code == 200, r.text
    wait_for_ephemeral(owner, room, lambda e: e["type"] == "m.typing" and guest.user_id in e["content"]["user_ids"])


@pytest.mark.parametrize("home,away", PAIRS)
def test_read_receipts_cross_servers(fed, home, away):
    owner, guest, room = shared_room(fed, home, away)
    event_id = owner.send_text(room, "read me")
    guest.wait_for_event(room, lambda e: e.get("event_id") == event_id)
    r = guest.post(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/receipt/m.read/{quote(event_id, safe='')}", {})
    assert r.status_code == 200, r.text
    wait_for_ephemeral(
        owner, room,
        lambda e: e["type"] == "m.receipt" and guest.user_id in e["content"].get(event_id, {}).get("m.read", {}))


@pytest.mark.parametrize("home,away", PAIRS)
def test_presence_crosses_servers(fed, home, away):
    owner, guest, room = shared_room(fed, home, away)
    status = unique("busy ")
    r = guest.put(f"/_matrix/client/v3/presence/{quote(guest.user_id)}/status",
                  {"presence": "online", "status_msg": status})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    seen = None
    while time.monotonic() < deadline:
        r = owner.get(f"/_matrix/client/v3/presence/{quote(guest.user_id)}/status")
        if r.status_code == 200 and r.json().get("status_msg") == status:
            seen = r.json()
            break
        time.sleep(0.2)
    assert seen is not None, f"{owner.server} never saw {guest.user_id}'s status: {r.status_code} {r.text}"
    assert seen["presence"] == "online"

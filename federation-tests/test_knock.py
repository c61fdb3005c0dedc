"""Knocking across servers: a user of one server knocks on a room of another (make_knock,
send_knock), sees the room's stripped state, and a member lets them in (an invite, then
a join), or refuses (a kick); or the knocker retracts (a leave through the room's
server): a Synapse user on a Convo room, a Convo user on a Synapse room, and between
the two Convo servers."""

import time
from urllib.parse import quote

import pytest

from clients import unique
from test_rooms import is_member, is_text

KNOCK_RULE = {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}

# (the server of the room, the knocker's server)
PAIRS = [("convo_a", "synapse"), ("synapse", "convo_a"), ("convo_a", "convo_b")]


@pytest.mark.parametrize("home,knocker_server", PAIRS)
def test_a_knock_from_another_server_is_let_in(fed, home, knocker_server):
    owner = fed.by_label(home).register(unique("owner"))
    knocker = fed.by_label(knocker_server).register(unique("knocker"))
    room = owner.create_room(name="Knock here", initial_state=[KNOCK_RULE])

    r = knocker.post(f"/_matrix/client/v3/knock/{quote(room, safe='')}", {"reason": "let me in"},
                     params=[("via", fed.by_label(home).name)])
    assert r.status_code == 200, r.text
    assert r.json()["room_id"] == room

    # The knocker's client shows the room under `knock`, with what the room's server sent.
    own = knocker.wait_for_event(room, is_member(knocker.user_id, "knock"), section="knock")
    assert own["content"].get("reason") == "let me in"
    state = knocker.sync()["rooms"]["knock"][room]["knock_state"]["events"]
    assert any(e["type"] == "m.room.create" for e in state), state
    assert any(e["type"] == "m.room.name" and e["content"].get("name") == "Knock here" for e in state), state

    # The room's member sees the knock and lets the knocker in.
    seen = owner.wait_for_event(room, is_member(knocker.user_id, "knock"))
    assert seen["content"].get("reason") == "let me in"
    owner.invite(room, knocker.user_id)
    invite = knocker.wait_for_event(room, is_member(knocker.user_id, "invite"), section="invite")
    assert invite["sender"] == owner.user_id
    knocker.join(room)
    owner.wait_for_event(room, is_member(knocker.user_id, "join"))

    sent = knocker.send_text(room, "thanks for letting me in")
    assert owner.wait_for_event(room, is_text("thanks for letting me in"))["event_id"] == sent
    assert owner.joined_members(room) == knocker.joined_members(room) == {owner.user_id, knocker.user_id}


def wait_for_left_room(user, room: str, since: str, deadline_s: float = 30) -> dict:
    """Long-polls /sync from `since` until `room` is in the user's `leave` section."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        body = user.sync(since, timeout_ms=1000)
        since = body["next_batch"]
        left = body.get("rooms", {}).get("leave", {}).get(room)
        if left is not None:
            return left
    raise TimeoutError(f"{user.user_id} on {user.server}: {room} not left within {deadline_s} s\n"
                       f"{user.server.log_tail()}")


# A refusal (a kick) reaches the knocker's server, which is not in the room, as an
# out-of-band membership: Convo sends the kick there and takes one in. Synapse 1.163
# does neither (it sends a kick only to the servers in the room, and ignores PDUs of
# rooms it is not in, "as we're not in the room"), so only Convo to Convo here.
@pytest.mark.parametrize("home,knocker_server", [("convo_a", "convo_b")])
def test_a_refused_knock_reaches_the_knocker(fed, home, knocker_server):
    owner = fed.by_label(home).register(unique("owner"))
    knocker = fed.by_label(knocker_server).register(unique("knocker"))
    room = owner.create_room(initial_state=[KNOCK_RULE])
    r = knocker.post(f"/_matrix/client/v3/knock/{quote(room, safe='')}", {}, params=[("via", fed.by_label(home).name)])
    assert r.status_code == 200, r.text
    owner.wait_for_event(room, is_member(knocker.user_id, "knock"))
    since = knocker.sync()["next_batch"]

    r = owner.post(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/kick",
                   {"user_id": knocker.user_id, "reason": "not now"})
    assert r.status_code == 200, r.text
    left = wait_for_left_room(knocker, room, since)
    assert room not in knocker.sync().get("rooms", {}).get("knock", {}), "the knock is gone"
    kicks = [e for e in left.get("timeline", {}).get("events", []) if is_member(knocker.user_id, "leave")(e)]
    assert kicks and kicks[-1]["sender"] == owner.user_id, left
    assert kicks[-1]["content"].get("reason") == "not now"


# A retraction (a leave) reaches the room through its server (make_leave, send_leave)
# when the knocker is on Convo. Synapse 1.163 rescinds a knock on a remote room only
# locally (it does not keep the server it knocked through), so not from Synapse.
@pytest.mark.parametrize("home,knocker_server", [("synapse", "convo_a"), ("convo_a", "convo_b")])
def test_a_retracted_knock_reaches_the_room(fed, home, knocker_server):
    owner = fed.by_label(home).register(unique("owner"))
    knocker = fed.by_label(knocker_server).register(unique("knocker"))
    room = owner.create_room(initial_state=[KNOCK_RULE])
    r = knocker.post(f"/_matrix/client/v3/knock/{quote(room, safe='')}", {}, params=[("via", fed.by_label(home).name)])
    assert r.status_code == 200, r.text
    owner.wait_for_event(room, is_member(knocker.user_id, "knock"))
    since = knocker.sync()["next_batch"]

    # The knocker's server is not in the room: it leaves through the room's server.
    r = knocker.post(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/leave", {})
    assert r.status_code == 200, r.text
    seen = owner.wait_for_event(room, is_member(knocker.user_id, "leave"))
    assert seen["sender"] == knocker.user_id
    wait_for_left_room(knocker, room, since)
    assert room not in knocker.sync().get("rooms", {}).get("knock", {}), "the knock is gone"

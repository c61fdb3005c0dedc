"""Rooms across servers, through each server's client API: direct chats between a Convo
user and a Synapse user (created on either side), between the two Convo servers, and
group rooms with users of all three servers, created on Convo and on Synapse. Every
server ends with the same event ids and the same members."""

from urllib.parse import quote

import pytest

from clients import unique

# (the server of the user who creates the room and invites, the invitee's server)
DM_PAIRS = [
    ("convo_a", "synapse"),
    ("synapse", "convo_a"),
    ("convo_a", "convo_b"),
    ("convo_b", "synapse"),
]


def is_text(body: str):
    return lambda e: e.get("type") == "m.room.message" and e.get("content", {}).get("body") == body


def is_member(user_id: str, membership: str):
    return lambda e: (e.get("type") == "m.room.member" and e.get("state_key") == user_id
                      and e.get("content", {}).get("membership") == membership)


@pytest.mark.parametrize("creator_server,invitee_server", DM_PAIRS)
def test_a_direct_chat_across_servers(fed, creator_server, invitee_server):
    alice = fed.by_label(creator_server).register(unique("alice"), displayname="Alice")
    bob = fed.by_label(invitee_server).register(unique("bob"), displayname="Bob")
    room = alice.create_room(preset="trusted_private_chat", is_direct=True, invite=[bob.user_id])

    invite = bob.wait_for_event(room, is_member(bob.user_id, "invite"), section="invite")
    assert invite["sender"] == alice.user_id
    assert invite["content"].get("is_direct") is True
    bob.join(room)

    alice.wait_for_event(room, is_member(bob.user_id, "join"))
    sent_by_alice = alice.send_text(room, "hello from " + creator_server)
    seen = bob.wait_for_event(room, is_text("hello from " + creator_server))
    assert seen["event_id"] == sent_by_alice
    sent_by_bob = bob.send_text(room, "hello from " + invitee_server)
    seen = alice.wait_for_event(room, is_text("hello from " + invitee_server))
    assert seen["event_id"] == sent_by_bob
    assert seen["sender"] == bob.user_id

    assert alice.joined_members(room) == bob.joined_members(room) == {alice.user_id, bob.user_id}


@pytest.mark.parametrize("home", ["convo_a", "synapse"])
def test_a_group_room_with_users_of_three_servers(fed, home):
    others = [label for label in ("convo_a", "convo_b", "synapse") if label != home]
    owner = fed.by_label(home).register(unique("owner"))
    guests = [fed.by_label(label).register(unique("guest")) for label in others]
    alias_local = unique("group")
    room = owner.create_room(preset="public_chat", name="Three servers", room_alias_name=alias_local)
    alias = f"#{alias_local}:{fed.by_label(home).name}"
    for guest in guests:
        assert guest.join(alias) == room
    for guest in guests:
        owner.wait_for_event(room, is_member(guest.user_id, "join"))

    everyone = [owner, *guests]
    sent = {}
    # One after the other: each message is sent once every server has the one before,
    # so they form a chain (concurrent messages have no order the servers must share).
    for user in everyone:
        body = f"from {user.server.label}"
        sent[body] = user.send_text(room, body)
        for reader in everyone:
            seen = reader.wait_for_event(room, is_text(body))
            assert seen["event_id"] == sent[body], f"{reader.server.label} has another id for {body!r}"

    members = {u.user_id for u in everyone}
    for user in everyone:
        assert user.joined_members(room) == members, f"members as {user.server.label} sees them"
        # The same order of these messages everywhere (each server's own history).
        order = [e["event_id"] for e in user.messages(room) if e["type"] == "m.room.message"]
        assert [i for i in order if i in sent.values()] == list(sent.values()), user.server.label


@pytest.mark.parametrize("home,late", [("synapse", "convo_a"), ("convo_a", "synapse"), ("convo_a", "convo_b")])
def test_a_server_that_joins_late_pages_back_through_history(fed, home, late):
    owner = fed.by_label(home).register(unique("owner"))
    latecomer = fed.by_label(late).register(unique("late"))
    room = owner.create_room(preset="public_chat")
    sent = [owner.send_text(room, f"early {i}") for i in range(15)]
    latecomer.join(room, via=[fed.by_label(home).name])

    seen = []
    params = {"dir": "b", "limit": "10"}
    for _ in range(10):
        r = latecomer.get(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/messages", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [e["event_id"] for e in page["chunk"] if e["type"] == "m.room.message"]
        if "end" not in page or not page["chunk"]:
            break
        params = {**params, "from": page["end"]}
    assert list(reversed(seen)) == sent, f"{late} paging back through {home}'s history"


def test_a_server_that_was_down_gets_every_message(fed):
    """convo_b is stopped while convo_a keeps sending into a room they share; once it is
    back, its user has every message, in order, and convo_a's queue for it is empty."""
    if fed.convo_a.kind != "convo":
        pytest.skip("reads convo_a's queue in its SQLite database")
    owner = fed.convo_a.register(unique("owner"))
    guest = fed.convo_b.register(unique("guest"))
    room = owner.create_room(preset="public_chat")
    guest.join(room, via=[fed.convo_a.name])
    owner.wait_for_event(room, is_member(guest.user_id, "join"))

    fed.convo_b.stop()
    try:
        sent = [owner.send_text(room, f"while down {i}") for i in range(5)]
    finally:
        fed.convo_b.start()
    for body, event_id in zip([f"while down {i}" for i in range(5)], sent):
        assert guest.wait_for_event(room, is_text(body))["event_id"] == event_id
    order = [e["event_id"] for e in guest.messages(room) if e["type"] == "m.room.message"]
    assert order[-5:] == sent

    # convo_a runs on SQLite: its queue for convo_b drains.
    fed.convo_a.wait_outbox_drained(fed.convo_b.name)


@pytest.mark.parametrize("inviter_server,invitee_server", [("synapse", "convo_a"), ("convo_a", "synapse")])
def test_a_declined_invite_reaches_the_inviting_server(fed, inviter_server, invitee_server):
    alice = fed.by_label(inviter_server).register(unique("alice"))
    bob = fed.by_label(invitee_server).register(unique("bob"))
    room = alice.create_room(preset="private_chat", invite=[bob.user_id])
    bob.wait_for_event(room, is_member(bob.user_id, "invite"), section="invite")
    r = bob.post(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/leave", {})
    assert r.status_code == 200, r.text
    alice.wait_for_event(room, is_member(bob.user_id, "leave"))


@pytest.mark.parametrize("inviter_server,invitee_server", [("synapse", "convo_a"), ("convo_a", "synapse")])
def test_an_invite_to_a_version_12_room_shows_its_create_event(fed, inviter_server, invitee_server):
    """Since Matrix 1.16 the state sent with an invite is the room's signed PDUs, which a
    receiver checks in version 12 rooms (Convo refuses the invite when a check fails):
    the invite is taken, shown with the room's create event, and can be joined."""
    alice = fed.by_label(inviter_server).register(unique("alice"))
    bob = fed.by_label(invitee_server).register(unique("bob"))
    room = alice.create_room(preset="private_chat", room_version="12", name="v12 invite", invite=[bob.user_id])
    bob.wait_for_event(room, is_member(bob.user_id, "invite"), section="invite")
    sync = bob.get("/_matrix/client/v3/sync").json()
    shown = sync["rooms"]["invite"][room]["invite_state"]["events"]
    assert any(e["type"] == "m.room.create" and e.get("content", {}).get("room_version") == "12" for e in shown), shown
    assert any(e["type"] == "m.room.name" and e["content"].get("name") == "v12 invite" for e in shown), shown
    bob.join(room)
    alice.wait_for_event(room, is_member(bob.user_id, "join"))


@pytest.mark.parametrize("version", ["6", "7", "8", "9", "10", "11", "12"])
@pytest.mark.parametrize("home,guest_server", [("convo_a", "synapse"), ("synapse", "convo_a")])
def test_every_room_version_federates(fed, version, home, guest_server):
    """A room of each version from 6 to 12, created on one server and joined from the
    other: the join, a message each way, and a state change are seen alike."""
    owner = fed.by_label(home).register(unique("owner"))
    guest = fed.by_label(guest_server).register(unique("guest"))
    room = owner.create_room(preset="public_chat", room_version=version)
    assert guest.join(room, via=[fed.by_label(home).name]) == room
    owner.wait_for_event(room, is_member(guest.user_id, "join"))
    to_guest = owner.send_text(room, f"v{version} to the guest")
    assert guest.wait_for_event(room, is_text(f"v{version} to the guest"))["event_id"] == to_guest
    to_owner = guest.send_text(room, f"v{version} to the owner")
    assert owner.wait_for_event(room, is_text(f"v{version} to the owner"))["event_id"] == to_owner
    r = owner.put(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/state/m.room.topic/", {"topic": f"v{version}"})
    assert r.status_code == 200, r.text
    topic = guest.wait_for_event(room, lambda e: e.get("type") == "m.room.topic")
    assert topic["event_id"] == r.json()["event_id"] and topic["content"]["topic"] == f"v{version}"
    r = guest.get(f"/_matrix/client/v3/rooms/{quote(room, safe='')}/state/m.room.create/")
    assert r.status_code == 200 and r.json().get("room_version", "1") == version, r.text

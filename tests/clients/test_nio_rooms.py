"""matrix-nio (from PyPI) against a real Convo: a direct chat and a group chat between
users of one server, driven through nio's own API and its /sync state tracking:
create, invite, join, send, receive through long-polling /sync, typing, read receipts
and markers, redaction, power checks, and paging back through history."""

import asyncio
import json
import time
import urllib.error
import urllib.request

from nio import (
    AsyncClient,
    JoinResponse,
    LoginResponse,
    MessageDirection,
    RedactedEvent,
    RedactionEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomGetEventResponse,
    RoomKickError,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPreset,
    RoomReadMarkersResponse,
    RoomRedactResponse,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
    UpdateReceiptMarkerResponse,
)

PASSWORD = "Correct-Horse-42"
WAIT_S = 10.0  # every single wait in this file fails after this long


def run(coro):
    return asyncio.run(coro)


async def raw_put(convo, user, path: str, body: dict):
    """A request nio would refuse to make locally (e.g. sending to a room it has left)."""

    def put():
        req = urllib.request.Request(
            convo.url + path,
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Authorization": f"Bearer {user.client.access_token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return await asyncio.to_thread(put)


class User:
    """A nio client plus every timeline event its syncs delivered, by room."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.timeline: dict[str, list] = {}
        self.last_sync: SyncResponse | None = None
        client.add_event_callback(self._on_event, (RoomMessageText, RedactionEvent, RoomMemberEvent))

    async def _on_event(self, room, event):
        self.timeline.setdefault(room.room_id, []).append(event)

    @property
    def id(self) -> str:
        return self.client.user_id

    def room(self, room_id):
        return self.client.rooms.get(room_id)

    async def sync_until(self, cond, label: str, limit: float = WAIT_S):
        """Long-polls /sync (nio updates its rooms) until `cond()` is true."""
        deadline = time.monotonic() + limit
        while True:
            value = cond()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.id}: timed out after {limit} s waiting for: {label}")
            resp = await self.client.sync(timeout=int(min(remaining, 2.0) * 1000))
            assert isinstance(resp, SyncResponse), resp
            self.last_sync = resp

    def message(self, room_id: str, body: str):
        for ev in self.timeline.get(room_id, []):
            if isinstance(ev, RoomMessageText) and ev.body == body:
                return ev
        return None


async def make_users(convo, *names: str) -> list[User]:
    token = convo.admin("registration-token", "create", "--uses", str(len(names)))
    users = []
    for name in names:
        client = AsyncClient(convo.url, name)
        resp = await client.register_with_token(name, PASSWORD, token, device_name=f"nio {name}")
        assert isinstance(resp, RegisterResponse), resp
        client.access_token, client.user_id, client.device_id = resp.access_token, resp.user_id, resp.device_id
        user = User(client)
        first = await client.sync(timeout=0)
        assert isinstance(first, SyncResponse), first
        users.append(user)
    return users


async def close_all(users):
    for u in users:
        await u.client.close()


async def invite_and_join(inviter: User, invitees: list[User], room_id: str):
    for u in invitees:
        await u.sync_until(lambda u=u: room_id in u.client.invited_rooms, f"the invite to {room_id}")
        joined = await u.client.join(room_id)
        assert isinstance(joined, JoinResponse), joined
        assert joined.room_id == room_id
    want = {inviter.id, *(u.id for u in invitees)}
    for u in [inviter, *invitees]:
        await u.sync_until(
            lambda u=u: u.room(room_id) and set(u.room(room_id).users) == want and u.room(room_id).joined_count == len(want),
            f"{len(want)} joined members in {room_id}",
        )


async def send_and_receive(sender: User, receivers: list[User], room_id: str, body: str) -> str:
    """Sends while every receiver is already long-polling; each must get it promptly."""

    async def receive(u: User):
        await u.sync_until(lambda: u.message(room_id, body), f'"{body}" from {sender.id}')
        return time.monotonic()

    waiting = [asyncio.create_task(receive(u)) for u in receivers]
    await asyncio.sleep(0.1)  # the receivers' /sync requests are now waiting
    sent_at = time.monotonic()
    resp = await sender.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    assert isinstance(resp, RoomSendResponse), resp
    for u, received_at in zip(receivers, await asyncio.gather(*waiting)):
        got = u.message(room_id, body)
        assert got.event_id == resp.event_id
        assert got.sender == sender.id
        assert received_at - sent_at < 2.0, f"{u.id} got the message {received_at - sent_at:.2f} s after the send"
    return resp.event_id


async def typing(typist: User, watchers: list[User], room_id: str):
    resp = await typist.client.room_typing(room_id, True, timeout=30_000)
    assert isinstance(resp, RoomTypingResponse), resp
    for w in watchers:
        await w.sync_until(lambda w=w: typist.id in w.room(room_id).typing_users, f"{typist.id} typing")
    resp = await typist.client.room_typing(room_id, False)
    assert isinstance(resp, RoomTypingResponse), resp
    for w in watchers:
        await w.sync_until(lambda w=w: typist.id not in w.room(room_id).typing_users, f"{typist.id} stops typing")


async def read_up_to(reader: User, watchers: list[User], room_id: str, event_id: str):
    # A threaded receipt for the main timeline (nio's default), then the read markers.
    resp = await reader.client.update_receipt_marker(room_id, event_id)
    assert isinstance(resp, UpdateReceiptMarkerResponse), resp
    resp = await reader.client.room_read_markers(room_id, fully_read_event=event_id, read_event=event_id)
    assert isinstance(resp, RoomReadMarkersResponse), resp
    for w in watchers:

        def seen(w=w):
            room = w.room(room_id)
            plain = room.read_receipts.get(reader.id)
            main = room.threaded_read_receipts.get(reader.id, {}).get("main")
            return plain and plain.event_id == event_id and main and main.event_id == event_id

        await w.sync_until(seen, f"{reader.id}'s receipts at {event_id}")
    await reader.sync_until(lambda: reader.room(room_id).fully_read_marker == event_id, "own m.fully_read marker")


async def redact(redactor: User, watchers: list[User], room_id: str, event_id: str, reason: str):
    resp = await redactor.client.room_redact(room_id, event_id, reason=reason)
    assert isinstance(resp, RoomRedactResponse), resp
    for w in watchers:
        await w.sync_until(
            lambda w=w: any(
                isinstance(e, RedactionEvent) and e.redacts == event_id for e in w.timeline.get(room_id, [])
            ),
            f"the redaction of {event_id}",
        )
        got = await w.client.room_get_event(room_id, event_id)
        assert isinstance(got, RoomGetEventResponse), got
        assert isinstance(got.event, RedactedEvent), got.event
        assert got.event.reason == reason
        assert "body" not in got.event.source["content"]


async def history(convo, user_id: str, room_id: str, expected: list[str]):
    """A fresh login pages back from a small initial sync to the room's start."""
    client = AsyncClient(convo.url, user_id)
    try:
        login = await client.login(PASSWORD, device_name="history")
        assert isinstance(login, LoginResponse), login
        first = await client.sync(timeout=0, sync_filter={"room": {"timeline": {"limit": 3}}})
        assert isinstance(first, SyncResponse), first
        timeline = first.rooms.join[room_id].timeline
        assert timeline.limited, "3 of many events: the timeline is limited"

        def body(ev):
            if isinstance(ev, RoomMessageText):
                return ev.body
            if isinstance(ev, RedactedEvent) and ev.source["type"] == "m.room.message":
                return "<redacted>"
            return None

        newest_first = [b for b in map(body, reversed(timeline.events)) if b]
        token, pages = timeline.prev_batch, 0
        while pages < 50:
            page = await client.room_messages(room_id, start=token, direction=MessageDirection.back, limit=4)
            assert isinstance(page, RoomMessagesResponse), page
            pages += 1
            assert len(page.chunk) <= 4
            newest_first += [b for b in map(body, page.chunk) if b]
            if not page.chunk or not page.end:
                break
            token = page.end
        assert pages > 3, "the history needed several pages"
        assert list(reversed(newest_first)) == expected

        # Forwards from the start of the room gives the same order.
        fwd = await client.room_messages(room_id, start=token, direction=MessageDirection.front, limit=100)
        assert isinstance(fwd, RoomMessagesResponse), fwd
        assert [b for b in map(body, fwd.chunk) if b] == expected
    finally:
        await client.close()


def test_direct_chat(convo):
    async def scenario():
        alice, bob = users = await make_users(convo, "alice", "bob")
        try:
            created = await alice.client.room_create(
                is_direct=True, invite=[bob.id], preset=RoomPreset.trusted_private_chat
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id

            # The invite reaches bob as stripped state, with is_direct on his member event.
            def dm_invite():
                resp = bob.last_sync
                if not resp or room_id not in resp.rooms.invite:
                    return None
                state = resp.rooms.invite[room_id].invite_state
                return next((e for e in state if getattr(e, "state_key", None) == bob.id), None)

            invite = await bob.sync_until(dm_invite, "the DM invite")
            assert invite.content.get("membership") == "invite"
            assert invite.content.get("is_direct") is True
            await invite_and_join(alice, [bob], room_id)

            hello = await send_and_receive(alice, [bob], room_id, "Hello Bob")
            await send_and_receive(bob, [alice], room_id, "Hi Alice")
            await typing(alice, [bob], room_id)
            await read_up_to(bob, [alice], room_id, hello)

            oops = await send_and_receive(alice, [bob], room_id, "oops, wrong window")
            await redact(alice, [bob], room_id, oops, "typo")

            numbered = []
            for i in range(1, 13):
                body = f"dm message {i}"
                numbered.append(body)
                sender, receiver = (alice, bob) if i % 2 else (bob, alice)
                await send_and_receive(sender, [receiver], room_id, body)
            await history(convo, bob.id, room_id, ["Hello Bob", "Hi Alice", "<redacted>", *numbered])
        finally:
            await close_all(users)

    run(scenario())


def test_group_chat(convo):
    async def scenario():
        alice, bob, carol = users = await make_users(convo, "alice", "bob", "carol")
        try:
            created = await alice.client.room_create(
                name="Convo group", topic="Testing rooms with matrix-nio", invite=[bob.id, carol.id]
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            await invite_and_join(alice, [bob, carol], room_id)
            for u in users:
                room = u.room(room_id)
                await u.sync_until(lambda room=room: room.name == "Convo group", "the room name")
                assert room.topic == "Testing rooms with matrix-nio"

            sent = []
            for i, u in enumerate([alice, bob, carol, alice, carol, bob]):
                body = f"group message {i + 1} from {u.id}"
                others = [x for x in users if x is not u]
                sent.append((body, await send_and_receive(u, others, room_id, body)))

            await typing(bob, [alice, carol], room_id)
            await read_up_to(carol, [alice, bob], room_id, sent[-1][1])

            # Bob may redact his own message; alice, the room's admin, may redact carol's.
            await redact(bob, [alice, carol], room_id, sent[1][1], "never mind")
            await redact(alice, [bob, carol], room_id, sent[2][1], "moderation")

            # Bob has no power to kick carol; alice has.
            kick = await bob.client.room_kick(room_id, carol.id, reason="no power")
            assert isinstance(kick, RoomKickError), kick
            assert kick.status_code == "M_FORBIDDEN"
            kicked = await alice.client.room_kick(room_id, carol.id, reason="bye")
            assert not isinstance(kicked, RoomKickError), kicked
            await carol.sync_until(
                lambda: carol.last_sync and room_id in carol.last_sync.rooms.leave, "the kick, under rooms.leave"
            )
            await bob.sync_until(lambda: carol.id not in bob.room(room_id).users, "carol is gone for bob")
            assert bob.room(room_id).joined_count == 2

            # Carol no longer receives the room's messages and cannot send.
            after = await send_and_receive(alice, [bob], room_id, "after the kick")
            status, body = await raw_put(
                convo,
                carol,
                f"/_matrix/client/v3/rooms/{room_id}/send/m.room.message/let-me-in",
                {"msgtype": "m.text", "body": "let me in"},
            )
            assert (status, body.get("errcode")) == (403, "M_FORBIDDEN"), body
            assert carol.message(room_id, "after the kick") is None
            assert after

            expected = [b if i not in (1, 2) else "<redacted>" for i, (b, _) in enumerate(sent)] + ["after the kick"]
            await history(convo, bob.id, room_id, expected)
        finally:
            await close_all(users)

    run(scenario())

"""Federation queries through the client API: a user on one server reads a remote
user's profile (matrix-nio), resolves a remote room alias, and lists a remote server's
public rooms; between Convo and Synapse both ways, and between the two Convo servers."""

import asyncio
import random
from urllib.parse import quote

import pytest
from nio import AsyncClient, AsyncClientConfig, ProfileGetError, ProfileGetResponse

from clients import unique

# (reader's server, target's server)
PAIRS = [
    ("synapse", "convo_a"),
    ("convo_a", "synapse"),
    ("synapse", "convo_b"),
    ("convo_b", "synapse"),
    ("convo_a", "convo_b"),
    ("convo_b", "convo_a"),
]


def nio_profile(user, target_user_id: str):
    async def go():
        client = AsyncClient(user.server.client_url, user.user_id, config=AsyncClientConfig(request_timeout=20))
        client.access_token = user.access_token
        try:
            return await asyncio.wait_for(client.get_profile(target_user_id), 30)
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.mark.parametrize("reader_label,target_label", PAIRS)
def test_remote_profile(fed, reader_label, target_label):
    reader_server, target_server = fed.by_label(reader_label), fed.by_label(target_label)
    name = unique(f"Remote {target_label} ")
    target = target_server.register(displayname=name)
    reader = reader_server.register()

    resp = nio_profile(reader, target.user_id)
    assert isinstance(resp, ProfileGetResponse), resp
    assert resp.displayname == name

    r = reader.get(f"/_matrix/client/v3/profile/{quote(target.user_id, safe='')}/displayname")
    assert r.status_code == 200, r.text
    assert r.json() == {"displayname": name}

    # A user the remote server does not have.
    ghost = f"@{unique('ghost')}:{target_server.name}"
    resp = nio_profile(reader, ghost)
    assert isinstance(resp, ProfileGetError), resp
    assert resp.status_code == "M_NOT_FOUND", resp


@pytest.mark.parametrize("reader_label,target_label", PAIRS)
def test_remote_alias(fed, reader_label, target_label):
    reader_server, target_server = fed.by_label(reader_label), fed.by_label(target_label)
    creator = target_server.register()
    localpart = unique("alias")
    room_id = creator.create_room(room_alias_name=localpart, preset="public_chat")
    alias = f"#{localpart}:{target_server.name}"
    reader = reader_server.register()

    r = reader.get(f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["room_id"] == room_id
    assert target_server.name in body["servers"], body

    missing = f"#{unique('nosuch')}:{target_server.name}"
    r = reader.get(f"/_matrix/client/v3/directory/room/{quote(missing, safe='')}")
    assert r.status_code == 404, r.text
    assert r.json()["errcode"] == "M_NOT_FOUND"


@pytest.mark.parametrize("reader_label,target_label", PAIRS)
def test_remote_public_rooms(fed, reader_label, target_label):
    reader_server, target_server = fed.by_label(reader_label), fed.by_label(target_label)
    creator = target_server.register()
    room_name = unique(f"Public on {target_label} ")
    room_id = creator.create_room(visibility="public", preset="public_chat", name=room_name)
    private_id = creator.create_room(visibility="private", preset="public_chat", name=unique("Unlisted "))
    reader = reader_server.register()

    # GET: the whole list. Synapse caches a remote list for 30 s by (server, limit, since):
    # a limit no other request of the run uses keeps this answer fresh.
    r = reader.get("/_matrix/client/v3/publicRooms",
                   params={"server": target_server.name, "limit": str(random.randint(500, 900))})
    assert r.status_code == 200, r.text
    chunk = r.json()["chunk"]
    entries = [e for e in chunk if e["room_id"] == room_id]
    assert len(entries) == 1, chunk
    assert entries[0]["name"] == room_name
    assert entries[0]["num_joined_members"] == 1
    assert entries[0]["world_readable"] is False
    assert entries[0]["guest_can_join"] is False
    assert private_id not in {e["room_id"] for e in chunk}

    # POST with a search filter: only the matching room.
    r = reader.post("/_matrix/client/v3/publicRooms", {"filter": {"generic_search_term": room_name}},
                    params={"server": target_server.name})
    assert r.status_code == 200, r.text
    assert [e["room_id"] for e in r.json()["chunk"]] == [room_id]


@pytest.mark.parametrize("reader_label,target_label", PAIRS)
def test_remote_public_rooms_pages(fed, reader_label, target_label):
    """Paging a remote server's list with `since`: the remote's own tokens go back to it
    through the reader's server; every room comes once."""
    reader_server, target_server = fed.by_label(reader_label), fed.by_label(target_label)
    creator = target_server.register()
    ours = {creator.create_room(visibility="public", preset="public_chat", name=unique("Paged ")) for _ in range(3)}
    reader = reader_server.register()
    seen: list[str] = []
    since = None
    for _ in range(100):  # bounded: the run makes far fewer public rooms
        params = {"server": target_server.name, "limit": "2"}
        if since:
            params["since"] = since
        r = reader.get("/_matrix/client/v3/publicRooms", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["chunk"]) <= 2, body
        seen += [e["room_id"] for e in body["chunk"]]
        since = body.get("next_batch")
        if not since:
            break
    else:
        pytest.fail(f"more than 100 pages: {seen}")
    assert len(seen) == len(set(seen)), seen
    assert ours <= set(seen), (ours, seen)

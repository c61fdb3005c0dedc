"""What the tests do as clients and as a federating server: a registered user's client
API calls (and the room helpers the tests to come will need), X-Matrix signatures of
raw federation requests, and checks of signed JSON."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import signedjson.key
import signedjson.sign

if TYPE_CHECKING:
    from harness import Server

HTTP_TIMEOUT_S = 20.0


@dataclass
class User:
    server: Server
    user_id: str
    access_token: str

    def request(self, method: str, path: str, json_body: Any = None, params: dict | None = None) -> httpx.Response:
        with self.server.client(self.access_token) as c:
            return c.request(method, path, json=json_body, params=params)

    def get(self, path: str, params: dict | None = None) -> httpx.Response:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, params: dict | None = None) -> httpx.Response:
        return self.request("POST", path, body if body is not None else {}, params)

    def put(self, path: str, body: Any) -> httpx.Response:
        return self.request("PUT", path, body)

    def create_room(self, **body) -> str:
        r = self.post("/_matrix/client/v3/createRoom", body)
        assert r.status_code == 200, f"createRoom on {self.server}: {r.status_code} {r.text}"
        return r.json()["room_id"]

    # -- Helpers for the cross-server room tests to come (DMs, group rooms, restarts):
    # written and checked against Synapse (FEDTEST_STAND_IN=synapse), used by no test yet.

    def invite(self, room_id: str, user_id: str):
        r = self.post(f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/invite", {"user_id": user_id})
        assert r.status_code == 200, f"invite on {self.server}: {r.status_code} {r.text}"

    def join(self, room_id_or_alias: str, via: list[str] = ()) -> str:
        r = self.post(f"/_matrix/client/v3/join/{quote(room_id_or_alias, safe='')}", {},
                      params=[("server_name", s) for s in via] or None)
        assert r.status_code == 200, f"join on {self.server}: {r.status_code} {r.text}"
        return r.json()["room_id"]

    def send_text(self, room_id: str, body: str) -> str:
        txn = secrets.token_hex(8)
        r = self.put(f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/{txn}",
                     {"msgtype": "m.text", "body": body})
        assert r.status_code == 200, f"send on {self.server}: {r.status_code} {r.text}"
        return r.json()["event_id"]

    def messages(self, room_id: str, limit: int = 100) -> list[dict]:
        """The room's timeline as this user's server has it, oldest first (one page)."""
        r = self.get(f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages",
                     params={"dir": "b", "limit": str(limit)})
        assert r.status_code == 200, f"messages on {self.server}: {r.status_code} {r.text}"
        return list(reversed(r.json()["chunk"]))

    def joined_members(self, room_id: str) -> set[str]:
        r = self.get(f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/joined_members")
        assert r.status_code == 200, f"joined_members on {self.server}: {r.status_code} {r.text}"
        return set(r.json()["joined"])

    def sync(self, since: str | None = None, timeout_ms: int = 0) -> dict:
        params = {"timeout": str(timeout_ms)}
        if since:
            params["since"] = since
        with self.server.client(self.access_token) as c:
            r = c.get("/_matrix/client/v3/sync", params=params, timeout=HTTP_TIMEOUT_S + timeout_ms / 1000)
        assert r.status_code == 200, f"sync on {self.server}: {r.status_code} {r.text}"
        return r.json()

    def wait_for_event(self, room_id: str, predicate, deadline_s: float = 30, section: str = "join") -> dict:
        """Long-polls /sync (from the start) until an event of `room_id` in `section`
        ("join", "leave": timeline and state; "invite", "knock": stripped state)
        satisfies `predicate`."""
        since = None
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            body = self.sync(since, timeout_ms=1000 if since else 0)
            since = body["next_batch"]
            room = body.get("rooms", {}).get(section, {}).get(room_id, {})
            if section in ("invite", "knock"):
                events = room.get(f"{section}_state", {}).get("events", [])
            else:
                events = room.get("state", {}).get("events", []) + room.get("timeline", {}).get("events", [])
            for event in events:
                if predicate(event):
                    return event
        raise TimeoutError(f"{self.user_id} on {self.server}: no matching event in {room_id} ({section}) "
                           f"within {deadline_s} s\n{self.server.log_tail()}")


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


class Signer:
    """Makes X-Matrix Authorization headers for a server name with an ed25519 key."""

    def __init__(self, origin: str, key):
        self.origin = origin
        self.key = key

    @classmethod
    def fresh(cls, origin: str) -> "Signer":
        return cls(origin, signedjson.key.generate_signing_key(f"a_{secrets.token_hex(2)}"))

    @property
    def key_id(self) -> str:
        return f"{self.key.alg}:{self.key.version}"

    def signature(self, method: str, uri: str, destination: str, content: Any = None) -> str:
        request = {"method": method, "uri": uri, "origin": self.origin, "destination": destination}
        if content is not None:
            request["content"] = content
        signed = signedjson.sign.sign_json(request, self.origin, self.key)
        return signed["signatures"][self.origin][self.key_id]

    def header(self, method: str, uri: str, destination: str, content: Any = None, *, sig: str | None = None) -> str:
        sig = sig if sig is not None else self.signature(method, uri, destination, content)
        return f'X-Matrix origin="{self.origin}",destination="{destination}",key="{self.key_id}",sig="{sig}"'


def verify_signed_by(obj: dict, server_name: str, verify_keys: dict) -> None:
    """Asserts that `obj` carries a valid signature of `server_name` by one of
    `verify_keys` ({key_id: {"key": base64}})."""
    sigs = obj.get("signatures", {}).get(server_name)
    assert sigs, f"no signature of {server_name} in {json.dumps(obj)[:500]}"
    checked = 0
    for key_id in sigs:
        if key_id in verify_keys:
            alg, version = key_id.split(":", 1)
            vk = signedjson.key.decode_verify_key_base64(alg, version, verify_keys[key_id]["key"])
            signedjson.sign.verify_signed_json(obj, server_name, vk)  # raises when wrong
            checked += 1
    assert checked, f"{server_name}'s signatures {list(sigs)} use none of its keys {list(verify_keys)}"

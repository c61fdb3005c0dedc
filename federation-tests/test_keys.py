"""Server signing keys: each server publishes a self-signed key, and each notary
(Synapse's and Convo's `/_matrix/key/v2/query`) fetches another server's key from it
and answers with it, signed by that server and by the notary."""

import time
from urllib.parse import quote

import pytest

from clients import verify_signed_by
from harness import free_port

LABELS = ["convo_a", "convo_b", "synapse"]


@pytest.mark.parametrize("label", LABELS)
def test_server_key_is_self_signed(fed, label):
    server = fed.by_label(label)
    keys = server.server_keys()
    assert keys["server_name"] == server.name
    assert keys["verify_keys"], keys
    assert all(k.startswith("ed25519:") for k in keys["verify_keys"]), keys
    assert keys["valid_until_ts"] > time.time() * 1000, keys
    verify_signed_by(keys, server.name, keys["verify_keys"])


def entry_for(response: dict, server_name: str) -> dict:
    entries = [e for e in response.get("server_keys", []) if e.get("server_name") == server_name]
    assert len(entries) == 1, f"expected one entry for {server_name}: {response}"
    return entries[0]


def assert_notarised(entry: dict, target, notary):
    """The notary's answer holds the target's current key, with the target's own valid
    signature and the notary's."""
    own = target.server_keys()
    for key_id, key in own["verify_keys"].items():
        assert entry["verify_keys"].get(key_id) == key, f"{key_id} of {target} missing: {entry}"
    assert entry["valid_until_ts"] > time.time() * 1000
    verify_signed_by(entry, target.name, own["verify_keys"])
    verify_signed_by(entry, notary.name, notary.server_keys()["verify_keys"])


# (notary, target): Synapse notarises each Convo; Convo notarises Synapse and the other Convo.
PAIRS = [("synapse", "convo_a"), ("synapse", "convo_b"), ("convo_a", "synapse"), ("convo_b", "convo_a")]


@pytest.mark.parametrize("notary_label,target_label", PAIRS)
def test_notary(fed, notary_label, target_label):
    notary, target = fed.by_label(notary_label), fed.by_label(target_label)
    key_ids = list(target.server_keys()["verify_keys"])
    now_ms = int(time.time() * 1000)
    get_all = ("GET", f"/_matrix/key/v2/query/{quote(target.name, safe='')}", None)
    post_ids = ("POST", "/_matrix/key/v2/query",
                {"server_keys": {target.name: {k: {"minimum_valid_until_ts": now_ms} for k in key_ids}}})
    post_ids_bare = ("POST", "/_matrix/key/v2/query", {"server_keys": {target.name: {k: {} for k in key_ids}}})
    post_all = ("POST", "/_matrix/key/v2/query", {"server_keys": {target.name: {}}})
    if notary.kind == "synapse":
        # Synapse's notary fetches a key it has not cached only when the query names the
        # key id, and wants `minimum_valid_until_ts` in each criterion (the spec makes it
        # optional); a query for "all keys" answers from its cache.
        order = [post_ids, get_all, post_all]
    else:
        # Convo's is asked "all keys" first, on a cold cache, then the other forms.
        order = [get_all, post_all, post_ids, post_ids_bare]
    with notary.fed() as f:
        for method, path, body in order:
            r = f.request(method, path, json=body)
            assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
            assert_notarised(entry_for(r.json(), target.name), target, notary)


@pytest.mark.parametrize("label", LABELS)
def test_federation_version(fed, label):
    server = fed.by_label(label)
    with server.fed() as f:
        r = f.get("/_matrix/federation/v1/version")
    assert r.status_code == 200, r.text
    info = r.json()["server"]
    assert isinstance(info.get("name"), str) and info["name"], info
    assert isinstance(info.get("version"), str) and info["version"], info
    if server.kind == "synapse":
        assert info["name"] == "Synapse"


@pytest.mark.parametrize("notary_label", ["convo_a", "convo_b"])
def test_notary_for_an_unreachable_server(fed, notary_label):
    """A server that cannot be reached and has no cached keys: an empty list (the
    spec's answer), quickly, not an error."""
    notary = fed.by_label(notary_label)
    nobody = f"127.0.0.1:{free_port()}"
    with notary.fed() as f:
        r = f.get(f"/_matrix/key/v2/query/{quote(nobody, safe='')}")
        assert r.status_code == 200, r.text
        assert r.json() == {"server_keys": []}
        r = f.post("/_matrix/key/v2/query", json={"server_keys": {nobody: {}}})
        assert r.status_code == 200, r.text
        assert r.json() == {"server_keys": []}
        # No server named at all: an empty list too.
        r = f.post("/_matrix/key/v2/query", json={"server_keys": {}})
        assert r.status_code == 200, r.text
        assert r.json() == {"server_keys": []}

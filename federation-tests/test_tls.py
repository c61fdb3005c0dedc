"""Outbound TLS is verified: a server whose certificate comes from the test CA is
trusted (its key is fetched through each notary), one whose certificate comes from
another CA is not (no key), though it serves the very same kind of answer."""

from urllib.parse import quote

import pytest

from clients import verify_signed_by
from harness import StubKeyServer, ThrowawayCA


@pytest.fixture(scope="module")
def rogue_ca(fed):
    return ThrowawayCA.make(fed.ca.dir.parent / "rogue-ca", cn="Untrusted CA")


def notary_query(notary, stub) -> list:
    """The notary's answer for the stub's key. Synapse's notary fetches only when the
    key id is named (see test_keys.py); Convo's is asked the plain GET."""
    with notary.fed() as f:
        if notary.kind == "synapse":
            key_id = next(iter(stub.verify_keys))
            r = f.post("/_matrix/key/v2/query", json={"server_keys": {stub.name: {key_id: {
                "minimum_valid_until_ts": 0}}}})
        else:
            r = f.get(f"/_matrix/key/v2/query/{quote(stub.name, safe='')}")
    assert r.status_code == 200, r.text
    return r.json()["server_keys"]


@pytest.mark.parametrize("notary_label", ["convo_a", "convo_b", "synapse"])
def test_certificate_from_the_test_ca_is_trusted(fed, notary_label):
    notary = fed.by_label(notary_label)
    with StubKeyServer(fed.ca.leaf_cert, fed.ca.leaf_key) as stub:
        entries = notary_query(notary, stub)
    assert [e["server_name"] for e in entries] == [stub.name], entries
    assert entries[0]["verify_keys"] == stub.verify_keys
    verify_signed_by(entries[0], stub.name, stub.verify_keys)


@pytest.mark.parametrize("notary_label", ["convo_a", "convo_b", "synapse"])
def test_certificate_from_another_ca_is_refused(fed, rogue_ca, notary_label):
    notary = fed.by_label(notary_label)
    with StubKeyServer(rogue_ca.leaf_cert, rogue_ca.leaf_key) as stub:
        entries = notary_query(notary, stub)
        # The notary did try: it connected, and the TLS handshake failed (no HTTP
        # request came through).
        assert stub.connections >= 1
        assert stub.requests == 0
    assert entries == [], entries

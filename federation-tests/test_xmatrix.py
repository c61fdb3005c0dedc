"""X-Matrix request authentication on Convo's federation listener, with raw HTTPS and
hand-made Authorization headers. The positive control signs as the Synapse peer with
its real key (which Convo can fetch from Synapse); every wrong header gets
401 M_UNAUTHORIZED."""

from urllib.parse import quote

import pytest

from clients import Signer, unique
from harness import free_port

TARGETS = ["convo_a", "convo_b"]


def profile_uri(user_id: str, field: str = "displayname") -> str:
    return f"/_matrix/federation/v1/query/profile?user_id={quote(user_id, safe='')}&field={field}"


def call(server, uri: str, authorization: str | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    with server.fed() as f:
        return f.get(uri, headers=headers)


def assert_unauthorized(r, server=None):
    if server is not None and server.kind == "synapse" and r.status_code == 400:
        # Synapse (standing in for Convo: FEDTEST_STAND_IN) answers an unparsable header
        # with 400 M_UNAUTHORIZED; the spec and Convo say 401.
        assert r.json()["errcode"] == "M_UNAUTHORIZED", r.text
        return
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert r.json()["errcode"] == "M_UNAUTHORIZED", r.text


@pytest.fixture
def target_user(fed, request):
    server = fed.by_label(request.param)
    name = unique("X-Matrix target ")
    return server, server.register(displayname=name), name


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
@pytest.mark.parametrize("origin", ["synapse", "other_convo"])
def test_signed_request_is_answered(fed, target_user, origin):
    """The control for the refusals below: the same request, rightly signed (by the
    Synapse peer, or by the other Convo server), works."""
    server, user, name = target_user
    if origin == "synapse":
        signer = fed.synapse.signer()
    else:
        signer = (fed.convo_b if server is fed.convo_a else fed.convo_a).signer()
    uri = profile_uri(user.user_id)
    r = call(server, uri, signer.header("GET", uri, server.name))
    assert r.status_code == 200, r.text
    assert r.json() == {"displayname": name}


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "X-Matrix",
        "X-Matrix nonsense",
        "Bearer abc",
        'X-Matrix origin="127.0.0.1:1",key="ed25519:a_1"',  # no sig
        'X-Matrix origin=,destination=,key=,sig=',
    ],
    ids=["none", "empty", "scheme-only", "garbage", "bearer", "no-sig", "empty-params"],
)
def test_missing_or_malformed_header(fed, target_user, authorization):
    server, user, _ = target_user
    assert_unauthorized(call(server, profile_uri(user.user_id), authorization), server)


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
def test_wrong_destination(fed, target_user):
    """Rightly signed by Synapse, but for the other Convo server."""
    server, user, _ = target_user
    other = fed.convo_b if server is fed.convo_a else fed.convo_a
    uri = profile_uri(user.user_id)
    assert_unauthorized(call(server, uri, fed.synapse.signer().header("GET", uri, other.name)))


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
def test_bad_signature(fed, target_user):
    server, user, _ = target_user
    signer = fed.synapse.signer()
    uri = profile_uri(user.user_id)
    # A real signature of Synapse's, over another request (another field).
    other_sig = signer.signature("GET", profile_uri(user.user_id, "avatar_url"), server.name)
    assert_unauthorized(call(server, uri, signer.header("GET", uri, server.name, sig=other_sig)))
    # The right signature with one byte changed.
    good = signer.signature("GET", uri, server.name)
    flipped = ("B" if good[0] != "B" else "C") + good[1:]
    assert_unauthorized(call(server, uri, signer.header("GET", uri, server.name, sig=flipped)))
    # Not base64 at all.
    assert_unauthorized(call(server, uri, signer.header("GET", uri, server.name, sig="!!not-base64!!")))
    # Signed by the right server for a POST, sent as a GET.
    post_sig = signer.signature("POST", uri, server.name, {})
    assert_unauthorized(call(server, uri, signer.header("GET", uri, server.name, sig=post_sig)))


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
def test_key_the_origin_does_not_have(fed, target_user):
    """Signed as Synapse with a key Synapse never published."""
    server, user, _ = target_user
    impostor = Signer.fresh(fed.synapse.name)
    uri = profile_uri(user.user_id)
    assert_unauthorized(call(server, uri, impostor.header("GET", uri, server.name)))


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
def test_origin_is_the_server_itself(fed, target_user):
    """Claims to come from the server it is sent to, with a key made up for it."""
    server, user, _ = target_user
    impostor = Signer.fresh(server.name)
    uri = profile_uri(user.user_id)
    assert_unauthorized(call(server, uri, impostor.header("GET", uri, server.name)))


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
def test_origin_whose_key_cannot_be_fetched(fed, target_user):
    """A real ed25519 signature, by a server on a loopback port where nothing listens."""
    server, user, _ = target_user
    nobody = Signer.fresh(f"127.0.0.1:{free_port()}")
    uri = profile_uri(user.user_id)
    assert_unauthorized(call(server, uri, nobody.header("GET", uri, server.name)))


@pytest.mark.parametrize("target_user", TARGETS, indirect=True)
def test_signed_body_is_checked(fed, target_user):
    """The signature covers the request body: a POST answered when its body is the one
    signed, refused when the body differs (or was signed as absent)."""
    server, _, _ = target_user
    signer = fed.synapse.signer()
    uri = "/_matrix/federation/v1/publicRooms"
    body = {"limit": 5, "filter": {"generic_search_term": unique("nothing ")}}
    with server.fed() as f:
        r = f.post(uri, json=body, headers={"Authorization": signer.header("POST", uri, server.name, body)})
        assert r.status_code == 200, r.text
        assert r.json()["chunk"] == []
        tampered = {**body, "limit": 6}
        r = f.post(uri, json=tampered, headers={"Authorization": signer.header("POST", uri, server.name, body)})
        assert_unauthorized(r)
        r = f.post(uri, json=body, headers={"Authorization": signer.header("POST", uri, server.name)})
        assert_unauthorized(r)

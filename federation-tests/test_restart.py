"""A Convo server stopped and started again (same name, ports, data and database) keeps
its signing key, so the others' cached copy stays good, and it federates again at once
both ways: its keys of the others were kept too."""

import pytest
from nio import ProfileGetResponse

from clients import unique
from test_queries import nio_profile


@pytest.mark.parametrize("label", ["convo_a", "convo_b"])
def test_restart_keeps_the_key_and_federates(fed, label):
    server = fed.by_label(label)
    name = unique(f"Before restart on {label} ")
    local = server.register(displayname=name)
    remote = fed.synapse.register(displayname=unique("Synapse "))
    # Synapse fetches the key now (if it had not yet), before the restart.
    assert nio_profile(remote, local.user_id).displayname == name
    before = server.server_keys()

    server.restart()

    after = server.server_keys()
    assert after["verify_keys"] == before["verify_keys"]
    # The user, the token and the profile survived; Synapse reads it with the key it
    # cached before the restart, and the restarted server queries Synapse.
    r = local.get("/_matrix/client/v3/account/whoami")
    assert r.status_code == 200 and r.json()["user_id"] == local.user_id, r.text
    resp = nio_profile(remote, local.user_id)
    assert isinstance(resp, ProfileGetResponse) and resp.displayname == name, resp
    resp = nio_profile(local, remote.user_id)
    assert isinstance(resp, ProfileGetResponse), resp
    assert resp.displayname.startswith("Synapse ")

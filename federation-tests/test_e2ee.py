"""An encrypted direct chat across servers with matrix-js-sdk's real (Rust) crypto
(`js/e2ee.mjs`): Convo to Synapse, Synapse to Convo, and between the two Convo servers.
Both clients decrypt what the other sends. Needs the SDK that tests/clients/js installs
(`npm ci --prefix tests/clients/js`, which scripts/test runs before this)."""

import json
import os
import shutil
import subprocess

import pytest

from harness import HERE

SDK = HERE.parent / "tests/clients/js/node_modules/matrix-js-sdk"


@pytest.mark.parametrize("inviter,invitee", [("convo_a", "synapse"), ("synapse", "convo_b"), ("convo_a", "convo_b")])
def test_an_encrypted_dm_across_servers(fed, tmp_path, inviter, invitee):
    node = shutil.which("node")
    assert node, "node is needed (Debian: apt-get install nodejs)"
    assert SDK.is_dir(), f"matrix-js-sdk is not installed: run npm ci --prefix tests/clients/js ({SDK})"
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps(fed.describe()))
    env = {**os.environ, "FEDTEST_SERVERS": str(servers), "FEDTEST_FROM": inviter, "FEDTEST_TO": invitee}
    run = subprocess.run(
        [node, "--test", "--test-force-exit", str(HERE / "js" / "e2ee.mjs")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    # node's test runner ran the one test, and it passed (not skipped, not zero tests).
    assert "# pass 1" in run.stdout and "# fail 0" in run.stdout, run.stdout[-3000:]

"""Fixtures for the client-compatibility suite: a real `convo` binary on a loopback
port with a fresh SQLite database, in registration-token mode."""

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

CONVO_BIN = os.environ.get("TEST_CONVO_BIN", str(Path(__file__).resolve().parents[2] / "target/debug/convo"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Convo:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CONVO_LISTENERS__CLIENT": f"127.0.0.1:{self.port}",
            "CONVO_DATA_DIR": str(workdir / "data"),
            "CONVO_RATE_LIMITS__ENABLED": "false",
            # Tests reach only loopback: no DNS lookups for other servers.
            "CONVO_FEDERATION__RESOLVE_NAMES": "false",
            "CONVO_PASSWORD_HASHING__MEMORY_KIB": "1024",
            "CONVO_PASSWORD_HASHING__ITERATIONS": "1",
        }
        self.env.pop("RUST_LOG", None)
        self.proc = None

    def admin(self, *args: str) -> str:
        out = subprocess.run(
            [CONVO_BIN, "admin", *args], env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def start(self):
        self.log = open(self.workdir / "convo.log", "w")
        self.proc = subprocess.Popen([CONVO_BIN], env=self.env, cwd=self.workdir, stdout=self.log, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("convo did not start: " + (self.workdir / "convo.log").read_text())

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture
def convo():
    with tempfile.TemporaryDirectory() as d:
        server = Convo(Path(d))
        server.start()
        try:
            yield server
        finally:
            server.stop()

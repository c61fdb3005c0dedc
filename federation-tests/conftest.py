"""Fixtures: one federation per test session (a throwaway CA, Convo "a" on SQLite, Convo
"b" on PostgreSQL when TEST_POSTGRES_URL is set, one Synapse), stopped at the end even
on failure. A failing test gets the tail of every server's log in its report.

Everything lives under FEDTEST_WORKDIR (default federation-tests/.run/), emptied at the
start of each session and kept afterwards for debugging.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import HERE, Convo, Server, Synapse, ThrowawayCA, rm_tree, stop_all

WORKDIR = Path(os.environ.get("FEDTEST_WORKDIR", HERE / ".run"))
# FEDTEST_STAND_IN=synapse runs Synapse servers in the two Convo places (checks the tests).
STAND_IN = os.environ.get("FEDTEST_STAND_IN", "")


@dataclass
class Federation:
    ca: ThrowawayCA
    convo_a: Convo
    convo_b: Convo
    synapse: Synapse

    @property
    def servers(self) -> list[Server]:
        return [self.convo_a, self.convo_b, self.synapse]

    @property
    def convos(self) -> list[Convo]:
        return [self.convo_a, self.convo_b]

    def by_label(self, label: str) -> Server:
        return {s.label: s for s in self.servers}[label]

    def describe(self) -> dict:
        """Names and addresses, as written to servers.json (for poking at a paused run,
        and for scripts in other languages, such as a matrix-js-sdk client, to come)."""
        return {
            "ca_certificate": str(self.ca.ca_cert),
            "servers": {s.label: {"kind": s.kind, "server_name": s.name, "client_url": s.client_url,
                                  "federation_url": s.fed_url, "log": str(s.log_path)} for s in self.servers},
        }


class PostgresDatabase:
    """A fresh database in the cluster of TEST_POSTGRES_URL (as the Rust tests make
    one), dropped at the end. Made with the psql CLI."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.name = f"convo_fedtest_{secrets.token_hex(6)}"
        base, _, _ = admin_url.rpartition("/")
        self.url = f"{base}/{self.name}"

    def _psql(self, sql: str):
        subprocess.run(["psql", self.admin_url, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
                       check=True, capture_output=True, text=True, timeout=60)

    def create(self):
        if shutil.which("psql") is None:
            raise RuntimeError("TEST_POSTGRES_URL is set but psql is missing (Debian: postgresql-client)")
        self._psql(f"CREATE DATABASE {self.name}")

    def drop(self):
        try:
            self._psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
        except subprocess.SubprocessError as e:
            print(f"dropping {self.name}: {e!r}")


def postgres_url() -> str | None:
    url = os.environ.get("TEST_POSTGRES_URL", "")
    if url:
        return url
    if os.environ.get("REQUIRE_POSTGRES") == "1":
        raise RuntimeError("REQUIRE_POSTGRES=1 but TEST_POSTGRES_URL is not set")
    print("TEST_POSTGRES_URL is not set: both Convo servers run on SQLite")
    return None


# Start-up timings, printed at the end of the run.
_timings: list[str] = []


@pytest.fixture(scope="session")
def fed():
    rm_tree(WORKDIR)
    WORKDIR.mkdir(parents=True)
    t0 = time.monotonic()
    ca = ThrowawayCA.make(WORKDIR / "ca")
    _timings.append(f"CA {time.monotonic() - t0:.1f} s")
    pg = None
    if STAND_IN not in ("", "synapse"):
        raise RuntimeError(f"FEDTEST_STAND_IN={STAND_IN!r}: only 'synapse' is known")
    if STAND_IN != "synapse" and (admin_url := postgres_url()) is not None:
        pg = PostgresDatabase(admin_url)
        pg.create()
    servers: list[Server] = []
    try:
        synapse = Synapse("synapse", WORKDIR / "synapse", ca)
        if STAND_IN == "synapse":
            # A check of the harness and the tests themselves: Synapse where Convo would be.
            convo_a = Synapse("convo_a", WORKDIR / "convo_a", ca)
            convo_b = Synapse("convo_b", WORKDIR / "convo_b", ca)
        else:
            convo_a = Convo("convo_a", WORKDIR / "convo_a", ca)
            convo_b = Convo("convo_b", WORKDIR / "convo_b", ca, database_url=pg.url if pg else "")
        servers = [synapse, convo_a, convo_b]
        started = time.monotonic()
        for s in servers:  # Synapse first: it is the slowest to start
            s.spawn()
        for s in servers:
            s.wait_ready()
            _timings.append(f"{s.label} ready {time.monotonic() - started:.1f} s after the spawns")
        print(f"\nfederation up in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{s.label}={s.name} (client {s.client_url})" for s in servers)
              + f"; logs under {WORKDIR}")
        federation = Federation(ca, convo_a, convo_b, synapse)
        (WORKDIR / "servers.json").write_text(json.dumps(federation.describe(), indent=2))
        yield federation
    finally:
        stop_all(servers)
        if pg:
            pg.drop()


# Each test keeps the federation in its stash, so that a failing report carries the
# servers' log tails.
_FED_KEY = pytest.StashKey[Federation]()


@pytest.fixture(autouse=True)
def _remember_fed(request, fed):
    request.node.stash[_FED_KEY] = fed
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and (fed := item.stash.get(_FED_KEY, None)) is not None:
        for s in fed.servers:
            report.sections.append((f"log tail of {s.label} ({s.name}, {s.log_path})", s.log_tail(40)))
    return report


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.write_line("federation start-up: " + "; ".join(_timings) + f" (logs in {WORKDIR})")

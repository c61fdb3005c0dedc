"""The federation test harness: a throwaway CA, and the servers (the real Convo binary,
Synapse from PyPI in this folder's venv) as processes on loopback that the tests start,
stop and restart, with their client and federation APIs (users and signatures are in
clients.py).

Every server gets IP-literal names `127.0.0.1:PORT` (PORT: its federation listener), so
that server discovery connects straight there: no well-known, no SRV. Ports are picked
at run time; every wait polls with a deadline; every request has a timeout.
"""

from __future__ import annotations

import atexit
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import signedjson.key
import signedjson.sign

from clients import HTTP_TIMEOUT_S, Signer, User

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONVO_BIN = os.environ.get("TEST_CONVO_BIN", str(REPO / "target/debug/convo"))
PASSWORD = "Correct-Horse-42"
START_DEADLINE_S = float(os.environ.get("FEDTEST_START_DEADLINE_S", "60"))


_ports_given: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before in this run (the OS may give
    a closed port again; two servers must not get the same one)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError("no fresh free port in 100 tries")


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 60) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(what: str, check, deadline_s: float, on_timeout=lambda: "") -> Any:
    """Calls `check()` until it returns something truthy, up to `deadline_s` seconds."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError) as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {deadline_s:.0f} s (last error: {last!r})\n{on_timeout()}")


# Servers started and not stopped yet: killed at exit whatever happens (the fixture's
# teardown stops them in order; this is the last resort).
_running: set["Server"] = set()


@atexit.register
def _kill_leftovers():
    for server in list(_running):
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()


def _sigterm_as_interrupt(signum, frame):
    # `timeout` and CI send SIGTERM: turn it into KeyboardInterrupt so that pytest runs
    # the fixtures' teardown (stopping the servers, dropping the database).
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


# ---------------------------------------------------------------------------------------
# The throwaway CA


@dataclass
class ThrowawayCA:
    """A CA made at run time with the openssl CLI, and one leaf certificate for
    `IP:127.0.0.1, DNS:localhost` that every server presents."""

    dir: Path
    ca_cert: Path
    leaf_cert: Path
    leaf_key: Path

    @classmethod
    def make(cls, dir: Path, cn: str = "Convo federation tests CA") -> "ThrowawayCA":
        dir.mkdir(parents=True, exist_ok=True)
        (dir / "ca.cnf").write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n"
            f"[dn]\nCN = {cn}\n"
            "[v3_ca]\nbasicConstraints = critical, CA:TRUE\n"
            "keyUsage = critical, keyCertSign, cRLSign\n"
            "subjectKeyIdentifier = hash\n"
        )
        (dir / "leaf.ext").write_text(
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth, clientAuth\n"
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid\n"
        )
        # openssl must not read the machine's config for these commands.
        env = {**os.environ, "OPENSSL_CONF": str(dir / "ca.cnf")}
        ossl = ["openssl"]
        run(ossl + ["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
                    "-config", "ca.cnf", "-keyout", "ca.key", "-out", "ca.pem"], cwd=dir, env=env)
        run(ossl + ["req", "-new", "-nodes", "-newkey", "rsa:2048", "-config", "ca.cnf",
                    "-subj", "/CN=127.0.0.1", "-keyout", "leaf.key", "-out", "leaf.csr"], cwd=dir, env=env)
        run(ossl + ["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext", "-out", "leaf.pem"], cwd=dir, env=env)
        return cls(dir, dir / "ca.pem", dir / "leaf.pem", dir / "leaf.key")


# ---------------------------------------------------------------------------------------
# Servers


class StubKeyServer:
    """The least of a homeserver, in a thread of the test process: HTTPS on a loopback
    port with the given certificate, answering only `GET /_matrix/key/v2/server` with a
    fresh, self-signed key. For TLS trust tests: whether another server fetches its key
    depends on the certificate alone."""

    def __init__(self, cert: Path, key: Path):
        self.port = free_port()
        self.name = f"127.0.0.1:{self.port}"
        self.signing_key = signedjson.key.generate_signing_key(f"a_{secrets.token_hex(2)}")
        self.connections = 0  # TCP connections accepted (before the TLS handshake)
        self.requests = 0  # HTTP requests read (after it)
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                stub.requests += 1
                if self.path != "/_matrix/key/v2/server":
                    self.send_error(404)
                    return
                body = json.dumps(stub.key_json()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self):
                stub.connections += 1
                return super().get_request()  # accepts, then the TLS handshake

        self.httpd = Server(("127.0.0.1", self.port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"stub {self.name}", daemon=True)

    @property
    def verify_keys(self) -> dict:
        vk = signedjson.key.get_verify_key(self.signing_key)
        return {f"ed25519:{self.signing_key.version}": {"key": signedjson.key.encode_verify_key_base64(vk)}}

    def key_json(self) -> dict:
        keys = {"server_name": self.name, "verify_keys": self.verify_keys, "old_verify_keys": {},
                "valid_until_ts": int(time.time() * 1000) + 3600_000}
        return signedjson.sign.sign_json(keys, self.name, self.signing_key)

    def __enter__(self) -> "StubKeyServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class Server:
    """What the tests need of any homeserver: its name, its client API (plain HTTP) and
    its federation API (TLS, checked against the test CA)."""

    kind = "server"

    def __init__(self, label: str, workdir: Path, ca: ThrowawayCA):
        self.label = label
        self.workdir = workdir
        self.ca = ca
        self.fed_port = free_port()
        self.client_port = free_port()
        self.name = f"127.0.0.1:{self.fed_port}"
        self.client_url = f"http://127.0.0.1:{self.client_port}"
        self.fed_url = f"https://127.0.0.1:{self.fed_port}"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        workdir.mkdir(parents=True, exist_ok=True)

    def __repr__(self):
        return f"<{self.kind} {self.label} {self.name}>"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.ca_cert))

    # -- process

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def spawn(self):
        """Starts the process without waiting for it (see `wait_ready`)."""
        assert self.proc is None or self.proc.poll() is not None, f"{self} is already running"
        self._log = open(self.log_path, "a")
        self._log.write(f"\n===== harness: starting {self} at {time.strftime('%H:%M:%S')}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT,
        )
        _running.add(self)

    def wait_ready(self, deadline_s: float = START_DEADLINE_S):
        """Polls the client API, then the federation listener (TLS verified against the
        test CA), until both answer or the deadline passes."""
        deadline = time.monotonic() + deadline_s

        def alive():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self} exited with {self.proc.returncode} while starting:\n{self.log_head_tail()}")

        def client_ready():
            alive()
            return httpx.get(f"{self.client_url}/_matrix/client/versions", timeout=1).status_code == 200

        def federation_ready():
            alive()
            with self.fed() as f:
                return f.get("/_matrix/federation/v1/version", timeout=1).status_code == 200

        wait_until(f"{self}: the client API at {self.client_url} answering", client_ready,
                   deadline - time.monotonic(), self.log_head_tail)
        wait_until(f"{self}: the federation listener at {self.fed_url} answering over TLS", federation_ready,
                   max(deadline - time.monotonic(), 1), self.log_head_tail)

    def log_head_tail(self) -> str:
        """For start-up failures: the first lines of the log (configuration, listeners)
        and the last."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        if len(lines) <= 50:
            return "\n".join(lines)
        return "\n".join(lines[:25] + ["[...]"] + lines[-25:])

    def start(self):
        self.spawn()
        self.wait_ready()

    def stop(self, timeout: float = 15):
        """SIGTERM, then SIGKILL past `timeout` seconds. The data stays: `start` again
        brings the server back with the same name, ports, keys and database."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _running.discard(self)
        if self._log:
            self._log.write(f"===== harness: stopped {self} at {time.strftime('%H:%M:%S')}\n")
            self._log.close()
            self._log = None

    def kill(self):
        """SIGKILL: a crash, for tests of what survives one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self):
        self.stop()
        self.start()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    # -- HTTP

    def client(self, access_token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
        return httpx.Client(base_url=self.client_url, headers=headers, timeout=HTTP_TIMEOUT_S)

    def fed(self) -> httpx.Client:
        """Unauthenticated HTTPS to the federation listener (keys, version, raw requests
        with a hand-made Authorization header)."""
        return httpx.Client(base_url=self.fed_url, verify=self.ssl_context(), timeout=HTTP_TIMEOUT_S)

    def server_keys(self) -> dict:
        with self.fed() as f:
            r = f.get("/_matrix/key/v2/server")
        r.raise_for_status()
        return r.json()

    def signer(self) -> "Signer":
        """Signs requests as this server, with its real key (`ed25519 KEY_ID SEED` in
        `signing_key_path`, the format of both Synapse and Convo)."""
        with open(self.signing_key_path) as f:
            (key,) = signedjson.key.read_signing_keys(f)
        return Signer(self.name, key)

    def signed_request(self, signer: "Signer", method: str, uri: str, content: Any = None) -> httpx.Response:
        """A raw federation request to this server, signed by `signer` (for the bad-event
        and bad-transaction tests to come, and the X-Matrix tests)."""
        auth = signer.header(method, uri, self.name, content)
        with self.fed() as f:
            return f.request(method, uri, json=content, headers={"Authorization": auth})

    def register(self, localpart: str | None = None, displayname: str | None = None) -> "User":
        """Registers a user with open registration (the m.login.dummy flow, in two steps
        as a client does) and sets its display name when given."""
        localpart = localpart or f"u{secrets.token_hex(4)}"
        body = {"username": localpart, "password": PASSWORD, "inhibit_login": False,
                "initial_device_display_name": "federation-tests"}
        with self.client() as c:
            r = c.post("/_matrix/client/v3/register", json=body)
            if r.status_code == 401:
                session = r.json().get("session")
                r = c.post("/_matrix/client/v3/register",
                           json={**body, "auth": {"type": "m.login.dummy", "session": session}})
            assert r.status_code == 200, f"register on {self}: {r.status_code} {r.text}"
        data = r.json()
        user = User(self, data["user_id"], data["access_token"])
        if displayname is not None:
            r = user.put(f"/_matrix/client/v3/profile/{quote(user.user_id)}/displayname", {"displayname": displayname})
            assert r.status_code == 200, r.text
        return user


class Convo(Server):
    kind = "convo"

    def __init__(self, label: str, workdir: Path, ca: ThrowawayCA, database_url: str = ""):
        super().__init__(label, workdir, ca)
        self.database_url = database_url
        # Made by Convo at its first start.
        self.signing_key_path = workdir / "data" / "signing.key"

    def command(self):
        return [CONVO_BIN]

    def env(self):
        env = {
            **os.environ,
            "CONVO_SERVER_NAME": self.name,
            "CONVO_DATA_DIR": str(self.workdir / "data"),
            "CONVO_LISTENERS__CLIENT": f"127.0.0.1:{self.client_port}",
            "CONVO_LISTENERS__FEDERATION": f"127.0.0.1:{self.fed_port}",
            "CONVO_LISTENERS__FEDERATION_TLS_CERTIFICATE": str(self.ca.leaf_cert),
            "CONVO_LISTENERS__FEDERATION_TLS_KEY": str(self.ca.leaf_key),
            "CONVO_FEDERATION__EXTRA_CA_FILE": str(self.ca.ca_cert),
            "CONVO_FEDERATION__SKIP_TLS_VERIFY": "false",
            "CONVO_FEDERATION__ALLOW_PRIVATE_DESTINATIONS": "true",
            # IP-literal server names only: no DNS lookup leaves the machine.
            "CONVO_FEDERATION__RESOLVE_NAMES": "false",
            # A server that was down is retried within a second of coming back.
            "CONVO_FEDERATION__MAX_RETRY_INTERVAL_MS": "1000",
            "CONVO_REGISTRATION__MODE": "open",
            "CONVO_RATE_LIMITS__ENABLED": "false",
            "CONVO_PASSWORD_HASHING__MEMORY_KIB": "1024",
            "CONVO_PASSWORD_HASHING__ITERATIONS": "1",
            "CONVO_LOGGING__LEVEL": os.environ.get("FEDTEST_CONVO_LOG", "convo=debug,info"),
            "CONVO_DATABASE__URL": self.database_url,
            "NO_COLOR": "1",
        }
        env.pop("RUST_LOG", None)
        return env

    def wait_outbox_drained(self, destination: str, deadline_s: float = 20):
        """Waits until this server (on SQLite) has nothing queued for `destination`."""
        db = self.workdir / "data" / "convo.db"
        deadline = time.monotonic() + deadline_s
        while True:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                (left,) = conn.execute("SELECT COUNT(*) FROM federation_outbox WHERE destination = ?",
                                       (destination,)).fetchone()
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert left == 0, f"{left} items still queued on {self.label} for {destination}"


SYNAPSE_LOG_CONFIG = """\
version: 1
formatters:
  plain:
    format: '%(asctime)s %(levelname)s %(name)s: %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: plain
    filename: {log}
root:
  level: {level}
  handlers: [file]
disable_existing_loggers: false
"""

# Every rc_* limit raised far past what a test run does.
_MANY = {"per_second": 10000, "burst_count": 100000}
SYNAPSE_RATE_LIMITS = {
    "rc_message": _MANY,
    "rc_registration": _MANY,
    "rc_registration_token_validity": _MANY,
    "rc_login": {"address": _MANY, "account": _MANY, "failed_attempts": _MANY},
    "rc_admin_redaction": _MANY,
    "rc_joins": {"local": _MANY, "remote": _MANY},
    "rc_joins_per_room": _MANY,
    "rc_3pid_validation": _MANY,
    "rc_invites": {"per_room": _MANY, "per_user": _MANY, "per_issuer": _MANY},
    "rc_third_party_invite": _MANY,
    "rc_media_create": _MANY,
    "rc_federation": {"window_size": 1000, "sleep_limit": 10000, "sleep_delay": 1,
                      "reject_limit": 100000, "concurrent": 1000},
    "rc_presence": {"per_user": _MANY},
    "rc_delayed_event_mgmt": _MANY,
    "rc_room_creation": _MANY,
    "rc_reports": _MANY,
}


class Synapse(Server):
    kind = "synapse"

    def __init__(self, label: str, workdir: Path, ca: ThrowawayCA):
        super().__init__(label, workdir, ca)
        self.signing_key_path = workdir / "signing.key"
        self.config_path = workdir / "homeserver.yaml"
        self.synapse_log = workdir / "homeserver.log"
        self.write_config()

    def write_config(self):
        key = signedjson.key.generate_signing_key(f"a_{secrets.token_hex(2)}")
        with open(self.signing_key_path, "w") as f:
            signedjson.key.write_signing_keys(f, [key])
        (self.workdir / "log.yaml").write_text(
            SYNAPSE_LOG_CONFIG.format(log=self.synapse_log, level=os.environ.get("FEDTEST_SYNAPSE_LOG", "WARNING"))
        )
        allow_all = [{"user_id": "*", "alias": "*", "room_id": "*", "action": "allow"}]
        config = {
            "server_name": self.name,
            "pid_file": str(self.workdir / "homeserver.pid"),
            "report_stats": False,
            "signing_key_path": str(self.signing_key_path),
            "log_config": str(self.workdir / "log.yaml"),
            "media_store_path": str(self.workdir / "media"),
            "database": {"name": "sqlite3", "args": {"database": str(self.workdir / "homeserver.db")}},
            "macaroon_secret_key": secrets.token_hex(32),
            "form_secret": secrets.token_hex(32),
            "registration_shared_secret": secrets.token_hex(32),
            "listeners": [
                {"port": self.fed_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                 "x_forwarded": False, "resources": [{"names": ["federation"], "compress": False}]},
                {"port": self.client_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                 "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]},
            ],
            "tls_certificate_path": str(self.ca.leaf_cert),
            "tls_private_key_path": str(self.ca.leaf_key),
            # Outbound federation: verify the peers' certificates against the test CA.
            "federation_verify_certificates": True,
            "federation_custom_ca_list": [str(self.ca.ca_cert)],
            # 127.0.0.0/8 is in the default blacklist, which IP-literal server names are
            # checked against (the whitelist alone is not enough).
            "ip_range_blacklist": [],
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "bcrypt_rounds": 4,  # cheap password hashing: tests register many users
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "allow_public_rooms_over_federation": True,
            "allow_public_rooms_without_auth": True,
            "alias_creation_rules": allow_all,
            "room_list_publication_rules": allow_all,
            "presence": {"enabled": True},
            "url_preview_enabled": False,
            "enable_metrics": False,
            **SYNAPSE_RATE_LIMITS,
        }
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    def command(self):
        return [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)]

    def env(self):
        env = dict(os.environ)
        env.pop("SYNAPSE_CONFIG_PATH", None)
        return env

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines // 2) + "\n----- homeserver.log\n" + tail(self.synapse_log, lines)

    def log_head_tail(self) -> str:
        return self.log_tail()



def stop_all(servers: list[Server]):
    for s in servers:
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            print(f"stopping {s}: {e!r}", file=sys.stderr)


def rm_tree(path: Path):
    shutil.rmtree(path, ignore_errors=True)

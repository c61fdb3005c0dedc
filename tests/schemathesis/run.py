"""A bounded schemathesis run over the Matrix client-server OpenAPI against the real
`convo` binary (issue 10, "Bad input").

Starts `target/debug/convo` on a loopback port with a fresh data dir (open registration,
cheap password hashing, no rate limits), registers two users, and runs `st run` with
schemathesis.toml (fixed seed, bounded examples per operation) and hooks.py (the token,
the `matrix_error_body` check). Fails on any failed check, on an excluded operation that
Convo now implements, and on a panic in the server's log.

The spec is read from $MATRIX_SPEC_DIR (default: ../shared/matrix-spec beside the
repository); without it the run prints SKIP and succeeds, unless REQUIRE_SCHEMATHESIS=1.

    python3 tests/schemathesis/run.py        (makes tests/schemathesis/.venv on first use)

Extra arguments go to `st run` (e.g. `--max-examples 5` for a quick look, `--seed N`
to explore, `--output-sanitize false` to see tokens and passwords in reproductions).
`CONVO_*` variables reach the server: `CONVO_DATABASE__URL=postgres://...` (an empty
database) runs it against PostgreSQL.
"""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONVO_BIN = Path(os.environ.get("TEST_CONVO_BIN", ROOT / "target/debug/convo"))
# The whole schemathesis run is stopped (and fails) past this many seconds: about
# 3 minutes alone on 2 cores, more when the machine is busy.
TIME_LIMIT = int(os.environ.get("SCHEMATHESIS_TIME_LIMIT", "600"))
PASSWORD = "Correct-Horse-4242"
VENV = HERE / ".venv"
# Failures known and reported, each with who fixes it; see baseline.json.
BASELINE = Path(os.environ.get("SCHEMATHESIS_BASELINE", HERE / "baseline.json")).resolve()


def fail(message: str) -> None:
    print(f"schemathesis: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def spec_file() -> Path | None:
    spec_dir = Path(os.environ.get("MATRIX_SPEC_DIR", ROOT.parent / "shared/matrix-spec"))
    path = spec_dir / "openapi/client-server.json"
    if path.is_file():
        return path
    why = f"{path} not found"
    if os.environ.get("REQUIRE_SCHEMATHESIS") == "1":
        fail(f"{why} (REQUIRE_SCHEMATHESIS=1)")
    print(
        f"SKIP schemathesis: {why}. Set MATRIX_SPEC_DIR to a copy of the Matrix spec with the bundled "
        "openapi/client-server.json (default ../shared/matrix-spec beside the repository) to run it; "
        "REQUIRE_SCHEMATHESIS=1 makes a missing spec an error."
    )
    return None


def ensure_venv() -> Path:
    """tests/schemathesis/.venv with requirements.txt installed (git-ignored)."""
    python = VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
    return VENV / "bin/st"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str, path: str, body=None, token: str | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, {"raw": raw.decode(errors="replace")}


class Convo:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "convo.log"
        self.env = {
            **os.environ,
            "CONVO_LISTENERS__CLIENT": f"127.0.0.1:{self.port}",
            "CONVO_DATA_DIR": str(workdir / "data"),
            "CONVO_REGISTRATION__MODE": "open",
            "CONVO_RATE_LIMITS__ENABLED": "false",
            # Tests reach only loopback: no DNS lookups for other servers.
            "CONVO_FEDERATION__RESOLVE_NAMES": "false",
            "CONVO_PASSWORD_HASHING__MEMORY_KIB": "1024",
            "CONVO_PASSWORD_HASHING__ITERATIONS": "1",
            # A TURN secret, so that `/voip/turnServer` gives credentials (only computed:
            # nothing talks to this address).
            "CONVO_VOIP__TURN_URIS": '["turn:turn.invalid:3478?transport=udp"]',
            "CONVO_VOIP__TURN_SHARED_SECRET": "schemathesis",
        }
        self.env.pop("RUST_LOG", None)

    def start(self) -> None:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([CONVO_BIN], env=self.env, cwd=self.workdir, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        fail("convo did not start:\n" + self.log_path.read_text())

    def stop(self) -> None:
        self.died = self.proc.poll()
        if self.died is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def register(self, username: str) -> dict:
        body = {"username": username, "password": PASSWORD, "inhibit_login": False}
        status, answer = call(self.url, "POST", "/_matrix/client/v3/register", body)
        if status == 401:
            body["auth"] = {"type": "m.login.dummy", "session": answer["session"]}
            status, answer = call(self.url, "POST", "/_matrix/client/v3/register", body)
        if status != 200:
            fail(f"registering {username}: {status} {answer}")
        return answer

    def must(self, method: str, path: str, body, token: str) -> dict:
        status, answer = call(self.url, method, path, body, token)
        if status != 200:
            fail(f"setting up: {method} {path}: {status} {answer}")
        return answer

    def login_without_type_panics(self) -> bool:
        """Whether `POST /login` with a body without `type` still drops the connection (the
        ruma panic of issue 10). The run then sends `type` in such bodies and tolerates
        exactly this panic in the log."""
        request = urllib.request.Request(
            f"{self.url}/_matrix/client/v3/login", data=b'{"password":"x"}', method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                return False
        except urllib.error.HTTPError:
            return False
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
            return True


def excluded_operations(spec: dict) -> list[tuple[str, str, str]]:
    """The operations schemathesis.toml disables: (method, path, operationId)."""
    config = tomllib.loads((HERE / "schemathesis.toml").read_text())
    blocks = [block for block in config.get("operations", []) if block.get("enabled") is False]
    out = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete"):
                continue
            for block in blocks:
                regex = block.get("include-path-regex")
                if (regex and re.search(regex, path)) or operation["operationId"] in block.get(
                    "include-operation-id", []
                ):
                    out.append((method.upper(), path, operation["operationId"]))
                    break
    return out


def check_still_unimplemented(convo: Convo, token: str, spec: dict) -> list[str]:
    """Every excluded operation must still be unknown to Convo (`M_UNRECOGNIZED`)."""
    implemented = []
    for method, path, operation_id in excluded_operations(spec):
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        body = {} if method in ("PUT", "POST") else None
        status, answer = call(convo.url, method, concrete, body, token)
        if answer.get("errcode") != "M_UNRECOGNIZED":
            implemented.append(f"{operation_id} ({method} {path}) answers {status} {answer}"[:300])
    return implemented


def set_up(convo: Convo) -> dict:
    """Accounts and rooms for the run: the fuzzing user `fuzz` in a room with an alias and
    a message, a spare room for `leave`/`forget`, and `fuzz-logout` for the logout cases."""
    fuzz = convo.register("fuzz")
    other = convo.register("fuzz-logout")
    token = fuzz["access_token"]
    room = convo.must(
        "POST", "/_matrix/client/v3/createRoom",
        {"name": "fuzz", "room_alias_name": "fuzz", "invite": [other["user_id"]]}, token,
    )["room_id"]
    convo.must("POST", f"/_matrix/client/v3/join/{quote(room)}", {}, other["access_token"])
    event = convo.must(
        "PUT", f"/_matrix/client/v3/rooms/{quote(room)}/send/m.room.message/setup",
        {"msgtype": "m.text", "body": "hello"}, token,
    )["event_id"]
    spare = convo.must("POST", "/_matrix/client/v3/createRoom", {"name": "spare"}, token)["room_id"]
    return {
        "token": token,
        "user_id": fuzz["user_id"],
        "device_id": fuzz["device_id"],
        "other_user_id": other["user_id"],
        "room_id": room,
        "alias": f"#fuzz:{fuzz['user_id'].split(':', 1)[1]}",
        "event_id": event,
        "spare_room_id": spare,
    }


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def write_config(workdir: Path, data: dict) -> Path:
    """schemathesis.toml plus the ids of this run: path parameters take a real id (of the
    fuzzing user, its room, ...) with the given probability, otherwise a generated one, so
    that cases get past "not your room" to the handlers' own checks."""
    bindings = {
        # parameter: (values, probability)
        "userId": ([data["user_id"]], 0.7),
        "roomId": ([data["room_id"]], 0.7),
        "roomIdOrAlias": ([data["room_id"], data["alias"]], 0.5),
        "roomAlias": ([data["alias"]], 0.5),
        "eventId": ([data["event_id"]], 0.6),
        "deviceId": ([data["device_id"]], 0.5),
    }
    lines = [(HERE / "schemathesis.toml").read_text(), "", "# Generated by run.py for this run."]
    for name, (values, _) in bindings.items():
        lines += [f"[dictionaries.{name}]", f"values = {toml_list(values)}"]
    lines += ["[dictionaries.spareRoomId]", f"values = {toml_list([data['spare_room_id']])}"]
    lines.append("[parameters]")
    for name, (_, probability) in bindings.items():
        lines.append(f'"path.{name}" = {{ dictionary = "{name}", probability = {probability} }}')
    # Leaving the main room would end most room cases: leave and forget use the spare one.
    lines += [
        "[[operations]]",
        'include-operation-id = ["leaveRoom", "forgetRoom"]',
        '[operations.parameters]',
        '"path.roomId" = { dictionary = "spareRoomId", probability = 0.7 }',
    ]
    path = workdir / "schemathesis.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_schemathesis(
    st: Path, convo: Convo, config: Path, spec_path: Path, workdir: Path, env: dict, extra_args: list[str]
) -> tuple[int, float]:
    command = [
        str(st), "--config-file", str(config), "run", str(spec_path),
        "--url", convo.url, "--no-color",
        "--report", "junit,json", "--report-dir", str(workdir / "report"),
        "--baseline", str(BASELINE), *extra_args,
    ]
    print("+ " + " ".join(command), flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, cwd=workdir)
    try:
        code = proc.wait(timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fail(f"schemathesis ran past its {TIME_LIMIT} s limit (SCHEMATHESIS_TIME_LIMIT)")
    return code, time.monotonic() - started


def read_report(report_dir: Path) -> dict:
    paths = sorted(report_dir.glob("json-*.json"))
    return json.loads(paths[-1].read_text()) if paths else {}


def baseline_notes(report: dict) -> None:
    """Say which known failures (baseline.json) were seen, and which were not: an entry
    that no longer reproduces is probably fixed and should be removed."""
    summary = report.get("baseline") or {}
    entries = {}
    if BASELINE.is_file():
        entries = {entry["id"]: entry for entry in json.loads(BASELINE.read_text()).get("entries", [])}
    labels = {
        "known_ids": "known failure seen",
        "unobserved_ids": "known failure not seen in this run (once fixed, remove it from baseline.json)",
    }
    for key, label in labels.items():
        for entry_id in summary.get(key) or []:
            entry = entries.get(entry_id, {})
            print(f"schemathesis: baseline {entry_id}: {label}: {entry.get('operation')} {entry.get('check')}")


def panics(log: str, tolerate_login: bool) -> list[str]:
    lines = [line for line in log.splitlines() if "panicked" in line]
    if tolerate_login:
        lines = [line for line in lines if not re.search(r"ruma-client-api-[^/]*/src/session/login\.rs", line)]
    return lines


def main() -> None:
    spec_path = spec_file()
    if spec_path is None:
        return
    if not CONVO_BIN.is_file():
        fail(f"{CONVO_BIN} not found: run `cargo build` first")
    if not BASELINE.is_file():
        # schemathesis would make one from this run's failures, accepting them all.
        fail(f"{BASELINE} not found (an empty one is {{\"format_version\": 1, \"entries\": []}})")
    spec = json.loads(spec_path.read_text())
    st = ensure_venv()
    workdir = Path(tempfile.mkdtemp(prefix="convo-schemathesis-"))
    convo = Convo(workdir)
    convo.start()
    try:
        data = set_up(convo)
        config = write_config(workdir, data)
        login_panics = convo.login_without_type_panics()
        if login_panics:
            print(
                "schemathesis: NOTE: POST /login with a body without `type` still drops the connection "
                "(ruma panic, issue 10): such bodies get a `type` in this run, and that one panic is tolerated."
            )
        implemented = check_still_unimplemented(convo, data["token"], spec)
        if implemented:
            fail(
                "operations excluded in tests/schemathesis/schemathesis.toml as unimplemented now answer "
                "(take them off the list so that they get fuzzed):\n  " + "\n  ".join(implemented)
            )
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "hooks",
            "PYTHONPATH": str(HERE),
            "CONVO_FUZZ_URL": convo.url,
            "CONVO_FUZZ_TOKEN": data["token"],
            "CONVO_FUZZ_LOGOUT_USER": data["other_user_id"],
            "CONVO_FUZZ_PASSWORD": PASSWORD,
            "CONVO_FUZZ_LOGIN_WITHOUT_TYPE_PANICS": "1" if login_panics else "0",
        }
        code, elapsed = run_schemathesis(st, convo, config, spec_path, workdir, env, sys.argv[1:])
        report = read_report(workdir / "report")
    finally:
        convo.stop()
    found = panics(convo.log_path.read_text(), login_panics)
    generated = (report.get("test_cases") or {}).get("generated")
    print(f"schemathesis: {elapsed:.0f} s, {generated} test cases, exit code {code}; server log {convo.log_path}")
    baseline_notes(report)
    if convo.died is not None:
        fail(f"the server exited during the run (status {convo.died}); log {convo.log_path}")
    if found:
        fail("the server panicked:\n  " + "\n  ".join(found[:20]))
    if code != 0:
        fail(f"schemathesis found failures (exit code {code}); report in {workdir / 'report'}")
    shutil.rmtree(workdir, ignore_errors=True)
    print("schemathesis: passed")


if __name__ == "__main__":
    main()

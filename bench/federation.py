"""Federation figures: Convo and Synapse servers on loopback with real TLS (a throwaway
CA, the federation-tests harness), and the load tool's federation scenarios between
them, for each pair of (server A, server B): Convo→Convo, Convo→Synapse, Synapse→Convo,
Synapse→Synapse.

- federation-fanout: senders on A, long-polling receivers on B, 20 messages/s for 30 s
  (by default), send-to-remote-sync latency and losses;
- federation-join: a room on A with 1,000 members and 10,000 events (built once per A),
  joined by a user of a fresh B (a new server each run, so that it has never seen the
  room): until the join returns, until the room is in B's /sync, until /messages on B
  has the 50 latest events.

Each figure is measured `--runs` times (3), the runs of the pairs interleaved; the
table gives the median and [min–max], and the load average before each run. Everything
(servers' logs, each run's JSON and table, results.md) is kept in the output folder.
Run through bench/federation.sh, which builds the release binaries and the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "federation-tests"))
# Quiet servers: debug logging would be measured too. Convo logs how long each step of
# a remote join took (joiner, info), a send_join answer (resident) and a backfill.
os.environ.setdefault("FEDTEST_CONVO_LOG", "warn,convo::service::federation::membership=debug,"
                      "convo::service::federation::backfill=debug")
os.environ.setdefault("FEDTEST_SYNAPSE_LOG", "WARNING")

import harness  # noqa: E402  (after the environment above: the harness reads it)
from harness import Convo, Server, Synapse, ThrowawayCA, stop_all  # noqa: E402

PAIRS = [("convo", "convo"), ("convo", "synapse"), ("synapse", "convo"), ("synapse", "synapse")]
NAME = {"convo": "Convo", "synapse": "Synapse"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src", "Cargo.toml", "Cargo.lock",
                            "migrations"]).returncode != 0
    # (its version string carries the git state of the folder it is installed in: dropped)
    synapse = subprocess.run([sys.executable, "-c", "import synapse; print(synapse.__version__.split()[0])"],
                             capture_output=True, text=True, cwd="/").stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": os.cpu_count(), "cpu": cpu,
            "memory_gib": round(mem_kb / 1048576, 1), "kernel": platform.release(),
            "convo_commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "convo_bin": harness.CONVO_BIN, "synapse": synapse, "python": platform.python_version(),
            "load_average_at_start": loadavg()}


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ca = ThrowawayCA.make(self.out / "ca")
        self.servers: list[Server] = []
        self.results: list[dict] = []  # every run: pair, scenario, figures, load average

    def server(self, kind: str, label: str) -> Server:
        cls = Convo if kind == "convo" else Synapse
        s = cls(label, self.out / label, self.ca)
        self.servers.append(s)
        return s

    def a_servers(self) -> dict:
        """The A servers of the pairs, not started."""
        return {k: self.server(k, f"{k}_a") for k in sorted({a for a, _ in self.args.pairs})}

    def load(self, a: Server, b: Server, scenario: str, tag: str, extra: list[str], timeout: int = 0) -> dict:
        """One convo-load run from A to B; its JSON results (and the table in a file)."""
        json_path = self.out / f"{tag}.json"
        cmd = [self.args.load_bin, "--base-url", a.client_url, "--remote-url", b.client_url,
               "--server-pid", str(a.proc.pid), "--remote-server-pid", str(b.proc.pid),
               "--label", tag, "--scenarios", scenario, "--json", str(json_path), *extra]
        load = loadavg()
        t = time.monotonic()
        with open(self.out / f"{tag}.txt", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout or self.args.run_timeout).returncode
        doc = json.loads(json_path.read_text()) if json_path.exists() else {"results": []}
        print(f"  {tag}: exit {rc} in {time.monotonic() - t:.0f} s (load average before: {load})", flush=True)
        for r in doc["results"]:
            if "error" in r:
                print(f"    ERROR in {r['scenario']}: {r['error']}", flush=True)
        return {"rc": rc, "load": load, "results": doc["results"]}

    # -- federation-fanout

    def fanout(self):
        a_of = self.a_servers()
        b_of = {k: self.server(k, f"{k}_b") for k in sorted({b for _, b in self.args.pairs})}
        started = list(a_of.values()) + list(b_of.values())
        for s in started:
            s.spawn()
        for s in started:
            s.wait_ready()
        print(f"fan-out servers up: {', '.join(f'{s.label}={s.name}' for s in started)}", flush=True)
        extra = ["--fed-fanout-rates", str(self.args.rate), "--fed-fanout-seconds", str(self.args.seconds)]
        for run in range(1, self.args.runs + 1):
            for ka, kb in self.args.pairs:
                r = self.load(a_of[ka], b_of[kb], "federation-fanout", f"fanout-{ka}-{kb}-{run}", extra)
                for res in r["results"]:
                    self.results.append({**res, "tool_scenario": res["scenario"], "pair": (ka, kb), "scenario": "fanout",
                                         "run": run, "load": r["load"]})
        # The join runs reuse the A servers; the fan-out B servers are done.
        for s in b_of.values():
            s.stop()
        return a_of

    # -- federation-join

    def join(self, a_of: dict):
        size = ["--join-members", str(self.args.members), "--join-events", str(self.args.events)]
        rooms = {}
        for ka, a in a_of.items():
            # Any running server serves as "B" for the build (the tool checks it answers).
            r = self.load(a, a, "federation-join", f"build-{ka}",
                          size + ["--join-build-only", "--scenario-timeout", str(self.args.build_timeout)],
                          timeout=self.args.build_timeout + 120)
            built = next((x for x in r["results"] if "room_id" in x), None)
            if built is None:
                raise RuntimeError(f"building the room on {ka} failed: see {self.out}/build-{ka}.txt")
            self.results.append({**built, "pair": (ka, ka), "scenario": "build", "run": 1, "load": r["load"]})
            rooms[ka] = built
        # Each join is from a fresh B (it has never seen the room). B's user leaves
        # afterwards, and B keeps running until the end: the room's state now holds its
        # leave event, which the next joiners check with its key.
        for run in range(1, self.args.runs + 1):
            for ka, kb in self.args.pairs:
                b = self.server(kb, f"join_{kb}_b_{ka}_{run}")
                # BENCH_JOINER_CONVO_LOG: another log filter for the joining Convo servers
                # only (e.g. "warn,sqlx::query=debug" to see each statement of the join).
                saved = os.environ.get("FEDTEST_CONVO_LOG")
                os.environ["FEDTEST_CONVO_LOG"] = os.environ.get("BENCH_JOINER_CONVO_LOG", saved or "warn")
                try:
                    b.start()
                finally:
                    os.environ["FEDTEST_CONVO_LOG"] = saved or "warn"
                built = rooms[ka]
                extra = ["--join-room", built["room_id"], "--join-room-member", built["creator"],
                         "--join-via", built["via"], "--join-last-message", built["last_message"]]
                r = self.load(a_of[ka], b, "federation-join", f"join-{ka}-{kb}-{run}", extra)
                for res in r["results"]:
                    self.results.append({**res, "tool_scenario": res["scenario"], "pair": (ka, kb), "scenario": "join",
                                     "run": run, "load": r["load"]})

    def stop(self):
        stop_all(self.servers)


# -------------------------------------------------------------------------- the table

def spread(values: list[float], unit: str = "ms") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    med = statistics.median(values)
    fmt = (lambda v: f"{v:,.0f}") if unit == "ms" and med >= 100 else (lambda v: f"{v:,.1f}")
    return f"{fmt(med)} [{fmt(min(values))}–{fmt(max(values))}]"


def table(results: list[dict], info: dict, args) -> str:
    lines = [f"Federation figures: {info['date']}, Convo {info['convo_commit']}, Synapse {info['synapse']}, "
             f"{info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB; "
             f"median of {args.runs} runs [min–max]. Load averages are the 1/5/15-minute ones before each run.", ""]
    lines += [f"### Send to remote sync, {args.rate:g} messages/s for {args.seconds} s "
              "(10 rooms, 1 sender on A and 4 long-polling receivers on B each)", "",
              "| A → B | delivered | lost | p50 ms | p90 ms | p99 ms | max ms | send p99 ms (on A) | CPU s A / B | load averages |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for ka, kb in args.pairs:
        rs = [r for r in results if r["scenario"] == "fanout" and r["pair"] == (ka, kb) and "error" not in r]
        errs = [r for r in results if r["scenario"] == "fanout" and r["pair"] == (ka, kb) and "error" in r]
        if not rs:
            lines.append(f"| {NAME[ka]} → {NAME[kb]} | failed: {errs[0]['error'][:80] if errs else 'no run'} |||||||||")
            continue
        delivered = f"{sum(r['delivered'] for r in rs)}/{sum(r['expected'] for r in rs)}"
        lost = sum(r["lost"] for r in rs)
        cpu = f"{spread([r.get('server_cpu_s') for r in rs], 's')} / {spread([r.get('remote_server_cpu_s') for r in rs], 's')}"
        lines.append(
            f"| {NAME[ka]} → {NAME[kb]} | {delivered} | {lost} | {spread([r['delivery_p50_ms'] for r in rs])} | "
            f"{spread([r['delivery_p90_ms'] for r in rs])} | {spread([r['delivery_p99_ms'] for r in rs])} | "
            f"{spread([r['delivery_max_ms'] for r in rs])} | {spread([r['send_p99_ms'] for r in rs])} | {cpu} | "
            f"{'; '.join(r['load'] for r in rs)} |" + (f" ({len(errs)} failed)" if errs else ""))
    builds = {r["pair"][0]: r for r in results if r["scenario"] == "build"}
    lines += ["", f"### Joining a room of {args.members:,} members and {args.events:,} events over federation", "",
              "| A → B (room on A, joined from a fresh B) | join returns ms | room in B's /sync ms | "
              "50 latest events on B ms | state events in that sync | members seen on B | newest message on B "
              "| CPU s A / B | load averages |",
              "|---|---|---|---|---|---|---|---|---|"]
    for ka, kb in args.pairs:
        rs = [r for r in results if r["scenario"] == "join" and r["pair"] == (ka, kb) and "error" not in r]
        errs = [r for r in results if r["scenario"] == "join" and r["pair"] == (ka, kb) and "error" in r]
        if not rs:
            lines.append(f"| {NAME[ka]} → {NAME[kb]} | failed: {errs[0]['error'][:80] if errs else 'no run'} ||||||||")
            continue
        cpu = f"{spread([r.get('server_cpu_s') for r in rs], 's')} / {spread([r.get('remote_server_cpu_s') for r in rs], 's')}"
        members = "/".join(str(r["joined_members_on_b"]) for r in rs)
        state = "/".join(str(r["sync_state_events"]) for r in rs)
        newest = f"{sum(1 for r in rs if r.get('last_message_seen'))}/{len(rs)} runs"
        lines.append(
            f"| {NAME[ka]} → {NAME[kb]} | {spread([r['join_ms'] for r in rs])} | {spread([r['sync_seen_ms'] for r in rs])} | "
            f"{spread([r['messages_50_ms'] for r in rs])} | {state} | {members} | {newest} | {cpu} | "
            f"{'; '.join(r['load'] for r in rs)} |"
            + (f" ({len(errs)} failed)" if errs else ""))
    lines += ["", "Building the room on A (once per A, before the joins):", ""]
    for ka, r in builds.items():
        lines.append(f"- {NAME[ka]}: {r['build_members']} members and {r['build_events']} events in {r['build_s']:.0f} s "
                     f"(registrations {r['build_registrations_s']:.0f} s, joins {r['build_joins_s']:.0f} s, "
                     f"events {r['build_events_s']:.0f} s); load average before: {r['load']}")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-bin", default=str(REPO / "target/release/convo-load"))
    p.add_argument("--out", default=str(REPO / "bench/results/federation"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scenarios", default="fanout,join")
    p.add_argument("--pairs", default=",".join(f"{a}-{b}" for a, b in PAIRS),
                   help="A-B pairs to measure, e.g. convo-convo,convo-synapse")
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--events", type=int, default=10000)
    p.add_argument("--run-timeout", type=int, default=1200, help="seconds allowed for one convo-load run")
    p.add_argument("--build-timeout", type=int, default=2400, help="seconds allowed for building a room")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of the results already in --out (results.json, machine.json)")
    args = p.parse_args()
    args.pairs = [tuple(x.split("-")) for x in args.pairs.split(",")]
    if not all(len(x) == 2 and set(x) <= set(NAME) for x in args.pairs):
        p.error("--pairs: A-B pairs of convo and synapse, e.g. convo-synapse")
    if args.table_only:
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        for r in results:
            r["pair"] = tuple(r["pair"])
        print(table(results, json.loads((out / "machine.json").read_text()), args))
        return 0
    info = machine()
    print(json.dumps(info, indent=2), flush=True)
    bench = Bench(args)
    (bench.out / "machine.json").write_text(json.dumps(info, indent=2))
    scenarios = args.scenarios.split(",")
    try:
        if "fanout" in scenarios:
            a_of = bench.fanout()
        else:
            a_of = bench.a_servers()
            for s in a_of.values():
                s.start()
        if "join" in scenarios:
            bench.join(a_of)
    finally:
        bench.stop()
        (bench.out / "results.json").write_text(json.dumps(bench.results, indent=2, default=list))
    md = table(bench.results, info, args)
    (bench.out / "results.md").write_text(md)
    print()
    print(md)
    failed = [r for r in bench.results if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fleet benchmarks (issue 12), run by bench/compare.sh after its workloads, or alone:

    bench/fleet.py --cutover target/release/cutover --load target/release/cutover-load \
                   --backend 127.0.0.2:10143 --out fleet.md [--trials 200] [--login-s 10]

1. Control propagation: three cutover instances sharing one redis-server (started here on
   127.0.0.1, its own directory, stopped at the end). A hold is sent to one instance (in
   turn), and the time until the two others enforce it is measured (their admin endpoint's
   `GET /holds?scope=local`, the mirror a login checks, polled every 0.2 ms); then a kick:
   the user's IDLE sessions on the two other instances, and the time until both got their
   `* BYE`. p50 and p99 over `--trials` of each.
2. Login rate with `state.redis` against the in-memory default, same machine, same
   settings otherwise: `cutover-load login` at 200 concurrent against one instance of
   each, interleaved twice, the better run of each reported; Redis commands per login
   counted from `INFO commandstats`.

Writes a Markdown section (`## Fleet`) to --out. Every address is on 127.0.0.0/8; every
process started here is stopped on exit.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

IPS = ["127.0.0.31", "127.0.0.32", "127.0.0.33"]
SOLO_IP = "127.0.0.34"
IMAP_PORT = 10143
ADMIN_PORT = 19899


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{host}:{port} never opened")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, argv, log, env=None):
        p = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def config(ip, backend, redis_url, name):
    state = (f'state:\n  redis: {{ url: "{redis_url}", key_prefix: "bench:", timeout: 50ms }}\n'
             if redis_url else "")
    return f"""instance_name: {name}
listeners:
  - {{ name: plain, protocol: imap, listen: "{ip}:{IMAP_PORT}", allow_plaintext_auth: true }}
pools:
  fake:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{backend}"] }}
routes:
  - {{ pool: fake }}
limits: {{ max_connections: 100000, max_connections_per_ip: 100000 }}
admin: {{ listen: "{ip}:{ADMIN_PORT}" }}
{state}"""


def admin(ip, method, path):
    req = urllib.request.Request(f"http://{ip}:{ADMIN_PORT}{path}", method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def imap_idle(ip, user):
    s = socket.create_connection((ip, IMAP_PORT), timeout=5)
    f = s.makefile("rb")
    f.readline()
    s.sendall(f"a LOGIN {user} secret\r\n".encode())
    line = f.readline()
    assert line.startswith(b"a OK"), line
    s.sendall(b"i IDLE\r\n")
    f.readline()
    return s, f


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def propagation(trials):
    holds, kicks = [], []
    for t in range(trials):
        src = IPS[t % 3]
        others = [ip for ip in IPS if ip != src]
        user = f"u{t}"
        t0 = time.perf_counter()
        admin(src, "POST", f"/hold?user={user}")
        waiting = set(others)
        while waiting:
            for ip in list(waiting):
                if user in admin(ip, "GET", "/holds?scope=local")["held"]:
                    waiting.discard(ip)
            if time.perf_counter() - t0 > 5:
                raise RuntimeError(f"hold {user} never reached {waiting}")
            time.sleep(0.0002)
        holds.append(time.perf_counter() - t0)
        admin(src, "POST", f"/release?user={user}")
        sessions = [imap_idle(ip, f"k{t}") for ip in others]
        t0 = time.perf_counter()
        admin(src, "POST", f"/kick?user=k{t}")
        for s, f in sessions:
            while not f.readline().startswith(b"* BYE"):
                pass
        kicks.append(time.perf_counter() - t0)
        for s, _ in sessions:
            s.close()
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    return {
        "hold_p50_ms": ms(pct(holds, 50)), "hold_p99_ms": ms(pct(holds, 99)),
        "kick_p50_ms": ms(pct(kicks, 50)), "kick_p99_ms": ms(pct(kicks, 99)),
    }


def login_rate(load, ip, seconds):
    out = subprocess.run([load, "login", "--addr", f"{ip}:{IMAP_PORT}", "--user", "bench",
                          "--pass", "secret", "--concurrency", "200", "--duration", str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 60)
    line = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not line:
        raise RuntimeError(f"cutover-load failed: {out.stderr[-500:]}")
    return json.loads(line[-1])


def redis_calls(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"],
                         capture_output=True, text=True, timeout=10).stdout
    calls = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line.split(":", 1)
            fields = dict(kv.split("=") for kv in rest.split(","))
            calls[name[len("cmdstat_"):]] = int(fields["calls"])
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cutover", required=True)
    ap.add_argument("--load", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--login-s", type=float, default=10)
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        with open(args.out, "w") as f:
            f.write("## Fleet\n\nn/a: redis-server is not installed.\n")
        return 0
    work = tempfile.mkdtemp(prefix="cutover-fleet-")
    procs = Procs()
    try:
        port = free_port()
        procs.start(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                     "--appendonly", "no", "--dir", work], f"{work}/redis.log")
        wait_port("127.0.0.1", port)
        url = f"redis://127.0.0.1:{port}/0"
        env = dict(os.environ, CUTOVER_LOG="warn")
        for i, ip in enumerate(IPS + [SOLO_IP]):
            shared = ip != SOLO_IP
            path = f"{work}/{ip}.yaml"
            with open(path, "w") as f:
                f.write(config(ip, args.backend, url if shared else None, f"bench-{i}"))
            procs.start([args.cutover, "run", "--config", path], f"{work}/{ip}.log", env=env)
        for ip in IPS + [SOLO_IP]:
            wait_port(ip, IMAP_PORT)
            wait_port(ip, ADMIN_PORT)
        time.sleep(1.0)  # subscriptions up
        prop = propagation(args.trials)
        rates = {"redis": [], "memory": []}
        calls_per_login = None
        for _ in range(2):
            before = redis_calls(port)
            r = login_rate(args.load, IPS[0], args.login_s)
            after = redis_calls(port)
            rates["redis"].append(r)
            total = sum(after.values()) - sum(before.values())
            per_cmd = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
            calls_per_login = (total / max(r["ok"], 1), per_cmd, r["ok"])
            rates["memory"].append(login_rate(args.load, SOLO_IP, args.login_s))
        best = {k: max(v, key=lambda r: r["rate"]) for k, v in rates.items()}
        ratio = best["redis"]["rate"] / max(best["memory"]["rate"], 1)
        per_login, per_cmd, ok = calls_per_login
        cmds = ", ".join(f"{k} {v / max(ok, 1):.2f}" for k, v in sorted(per_cmd.items()))
        with open(args.out, "w") as f:
            f.write(f"""## Fleet

Three cutover instances sharing one `redis-server` on this machine (`state.redis`,
timeout 50 ms), the fake backend behind; written by `bench/fleet.py`.

| measure | value | target |
|---|---:|---|
| hold propagation p50 / p99 ({args.trials} trials; until both other instances enforce it) | {prop['hold_p50_ms']} / {prop['hold_p99_ms']} ms | p99 under 100 ms |
| kick propagation p50 / p99 ({args.trials} trials; until the IDLE sessions on both others got `* BYE`) | {prop['kick_p50_ms']} / {prop['kick_p99_ms']} ms | p99 under 100 ms |
| logins/s, plain, 200 concurrent, `state.redis` | {best['redis']['rate']:,.0f} (p99 {best['redis']['p99_ms']} ms) | |
| logins/s, plain, 200 concurrent, in memory | {best['memory']['rate']:,.0f} (p99 {best['memory']['p99_ms']} ms) | |
| ratio Redis / in memory | {ratio:.2f}x | at least 0.8x |
| Redis commands per successful login | {per_login:.2f} ({cmds}) | |

Where the round trips are: a successful login waits on none. Holds and throttle blocks
are mirrored in each proxy (pub/sub), so checking them is local; the writes a login
causes (the pop-before-smtp window, the stragglers row, clearing the user's failure
counter, the session listing's entry and its removal) go through a queue after the reply.
A failed login waits on one pipeline per counter (`SET NX` + `INCR`); an SMTP connection
to a bridge listener waits on one `GET`.
""")
        print(json.dumps({"propagation": prop, "ratio": ratio, "per_login": per_login}))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

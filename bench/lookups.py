#!/usr/bin/env python3
"""Route lookup benchmarks (issue 14), run by bench/compare.sh after its workloads, or alone:

    bench/lookups.py --cutover target/release/cutover --load target/release/cutover-load \\
                     --backend 127.0.0.2:10143 --out lookups.md [--quick] [--login-s 10]
    bench/lookups.py --cutover target/release/cutover --load target/release/cutover-load \\
                     --fake target/release/cutover-fake-imap --into BENCHMARKS.md [--quick]

A throw-away PostgreSQL cluster (initdb in a temporary directory, 127.0.0.41, fsync off;
run as the `postgres` user when this runs as root), a table `mailbox_routes` of 10 million
users (1 million with --quick) filled with `INSERT ... SELECT generate_series`, and cutover
instances on 127.0.0.43-45 (the fake backend behind, `--backend`, or one started here on
127.0.0.42 with `--fake`), then:

1. Warm cache: a `{ lookup: mailboxes }` route with every user of the load already cached
   (a warm-up pass logs each in once, TTL 1 h) against a cohort-file route
   (`{ users_file: ..., pool: new }` listing the same users) in another cutover instance:
   `cutover-load login` at 200 concurrent, a different user per login, interleaved runs,
   medians; the ratio (issue 14: at least 0.95x).
2. Cold cache: the same load where every login is a user the instance never saw (distinct
   users spread over the table): logins/s, queries/s (`cutover_lookup_queries_total`),
   the p99 login latency added over the cohort-file route, CPU per login of cutover and of
   PostgreSQL.
3. Cache memory: a fresh instance, its RSS after a warm-up, then one million distinct users
   logged in (100,000 with --quick), its RSS again; the difference over the entries added
   (`cutover_lookup_cache_entries`).

Writes a Markdown section (`## Route lookups (PostgreSQL)`) to --out, and/or splices it into
--into (before `## Findings`). Every address is on 127.0.0.0/8; every process started here
is stopped on exit, and the cluster's directory removed (unless --keep).
"""

import argparse
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

PG_IP = "127.0.0.41"
FAKE_IP = "127.0.0.42"
LOOKUP_IP = "127.0.0.43"
COHORT_IP = "127.0.0.44"
MEMORY_IP = "127.0.0.45"
IMAP_PORT = 10143
METRICS_PORT = 19898
CONCURRENCY = 200
LOOKUP = "mailboxes"
QUERY = "SELECT pool, server FROM mailbox_routes WHERE username = $1"
SECTION = "## Route lookups (PostgreSQL)"


def log(msg):
    print(f"\n== lookups: {msg}", file=sys.stderr, flush=True)


def free_port(ip):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=15.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for {host}:{port} exited ({proc.returncode})")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} never opened")


class Procs:
    """Processes started here, each in a session of its own; stopped in reverse order."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path, env=None, user=None):
        kw = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        p = subprocess.Popen(argv, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                             env=env, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            # PostgreSQL: SIGINT is its fast shutdown (SIGTERM waits for clients).
            self.stop(p, getattr(p, "stop_signal", signal.SIGTERM))


# --- /proc --------------------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def children(pid):
    out = []
    for d in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(d) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.split("/")[2]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def vm_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def sys_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], v[3] + v[4]


class Quiet:
    """Waits (bounded: 20 s per measurement, `budget` s in all) until processes other than
    ours use at most 15% of the machine, as compare.sh does."""

    def __init__(self, budget, ours):
        self.budget, self.ours, self.busy = budget, ours, 0

    def wait(self):
        for tries in range(11):
            b0, i0 = sys_ticks()
            o0 = proc_ticks(self.ours())
            time.sleep(0.5)
            b1, i1 = sys_ticks()
            o1 = proc_ticks(self.ours())
            busy = 100 * ((b1 - b0) - (o1 - o0)) // ((b1 - b0) + (i1 - i0) + 1)
            if busy <= 15:
                return
            if tries == 10 or self.budget <= 0:
                print(f"warning: machine busy ({busy}% CPU used by other processes); "
                      "measuring anyway", file=sys.stderr)
                self.busy += 1
                return
            if tries == 0:
                print(f"warning: machine busy ({busy}% CPU used by other processes); waiting",
                      file=sys.stderr)
            self.budget -= 2
            time.sleep(1.5)


# --- PostgreSQL ---------------------------------------------------------------------------

def pg_bindir(given):
    if given:
        return given
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))
    return os.path.dirname(found[-1]) if found else None


class Postgres:
    def __init__(self, procs, bindir, work, shared_buffers):
        self.procs, self.bindir = procs, bindir
        self.port = free_port(PG_IP)
        self.user = "postgres" if os.geteuid() == 0 else None
        # Its own directory (not under the 0700 work directory, which the postgres user
        # could not enter).
        self.dir = tempfile.mkdtemp(prefix="cutover-lookups-pg-")
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(work, "postgres.log")
        self.shared_buffers = shared_buffers
        self.url = f"postgres://postgres@{PG_IP}:{self.port}/postgres?sslmode=disable"
        self.proc = None

    def run_as(self, argv):
        kw = {}
        if self.user:
            pw = pwd.getpwnam(self.user)
            kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=self.dir, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {r.stderr[-800:]}")
        return r.stdout

    def start(self):
        self.run_as([f"{self.bindir}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                     "--encoding=UTF8", "--locale=C", "--no-sync"])
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("host all all 127.0.0.0/8 trust\n")
        settings = {
            "listen_addresses": PG_IP, "port": self.port, "unix_socket_directories": "",
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "wal_level": "minimal", "max_wal_senders": 0, "max_wal_size": "8GB",
            "checkpoint_timeout": "1h", "shared_buffers": self.shared_buffers,
            "maintenance_work_mem": "1GB", "work_mem": "64MB", "autovacuum": "off",
            "max_connections": 100, "logging_collector": "off",
        }
        argv = [f"{self.bindir}/postgres", "-D", self.data]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        self.proc = self.procs.start(argv, self.log, user=self.user)
        self.proc.stop_signal = signal.SIGINT
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run([f"{self.bindir}/pg_isready", "-h", PG_IP, "-p", str(self.port),
                                "-U", "postgres", "-t", "1"], capture_output=True)
            if r.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; see {self.log}")
            time.sleep(0.2)

    def psql(self, sql, timeout=1800):
        r = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", PG_IP,
                            "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr[-800:]}")
        return r.stdout.strip()

    def pids(self):
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid] + children(self.proc.pid)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def fill(pg, users):
    """The table: `users` rows user0..user<users-1>, all in pool `new`, no server."""
    t = {}
    t0 = time.monotonic()
    # In one transaction with the CREATE (and wal_level minimal) the rows skip the WAL; the
    # primary key is built afterwards by one sort, much faster than row by row.
    pg.psql(f"""SET maintenance_work_mem = '1GB';
BEGIN;
CREATE TABLE mailbox_routes (username text NOT NULL, pool text NOT NULL, server text);
INSERT INTO mailbox_routes SELECT 'user' || i, 'new', NULL FROM generate_series(0, {users - 1}) AS i;
ALTER TABLE mailbox_routes ADD PRIMARY KEY (username);
COMMIT;""")
    t["fill_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    # Hint bits and statistics now, not during the measurements; then table and index
    # read into shared_buffers, so that cold lookups measure the proxy and the queries,
    # not the disk.
    pg.psql("VACUUM (ANALYZE) mailbox_routes")
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
    pg.psql("SELECT pg_prewarm('mailbox_routes'), pg_prewarm('mailbox_routes_pkey')")
    t["vacuum_prewarm_s"] = time.monotonic() - t0
    t["rows"] = int(pg.psql("SELECT count(*) FROM mailbox_routes"))
    t["table_mib"] = int(pg.psql("SELECT pg_relation_size('mailbox_routes')")) / 2**20
    t["index_mib"] = int(pg.psql("SELECT pg_relation_size('mailbox_routes_pkey')")) / 2**20
    t["version"] = pg.psql("SHOW server_version")
    plan = pg.psql("EXPLAIN SELECT pool, server FROM mailbox_routes WHERE username = 'user12345'")
    t["plan_uses_index"] = "Index Scan" in plan
    return t


# --- cutover ------------------------------------------------------------------------------

def cutover_config(ip, backend, route, lookups="", extra=""):
    return f"""hostname: bench.test
listeners:
  - {{ name: imap, protocol: imap, listen: "{ip}:{IMAP_PORT}", tls: none, allow_plaintext_auth: true }}
pools:
  new:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{backend}"] }}
{lookups}routes:
  - {route}
shutdown:
  drain_timeout: 1s
limits:
  max_connections: 100000
  max_connections_per_ip: 100000
metrics:
  listen: "{ip}:{METRICS_PORT}"
{extra}"""


def lookup_yaml(url, max_entries):
    return f"""lookups:
  {LOOKUP}:
    postgres:
      url: "{url}"
      query: "{QUERY}"
      connections: 2
    timeout: 300ms
    cache: {{ ttl: 1h, negative_ttl: 10s, max_entries: {max_entries}, stale_for: 5m }}
"""


def metrics(ip):
    """Every sample of cutover's /metrics: {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(f"http://{ip}:{METRICS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def msum(sample, name, **labels):
    want = set(labels.items())
    return sum(v for (n, l), v in sample.items() if n == name and want <= set(l))


def delta(before, after, name, **labels):
    return msum(after, name, **labels) - msum(before, name, **labels)


def bucket_quantile(before, after, name, q, **labels):
    """Upper bound (s) of the histogram bucket holding quantile q of the increments."""
    buckets = {}
    for (n, l), v in after.items():
        d = dict(l)
        if n != f"{name}_bucket" or any(d.get(k) != v2 for k, v2 in labels.items()):
            continue
        buckets[float(d["le"])] = v - before.get((n, l), 0.0)
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


class Runner:
    def __init__(self, args, procs, quiet):
        self.args, self.procs, self.quiet = args, procs, quiet
        self.raw = []

    def login(self, ip, seconds, start, count, order="spread", max_count=None, label=""):
        argv = [self.args.load, "login", "--addr", f"{ip}:{IMAP_PORT}", "--pass", "secret",
                "--concurrency", str(CONCURRENCY), "--duration", str(seconds),
                "--users-prefix", "user", "--users-start", str(start),
                "--users-count", str(count), "--users-order", order, "--label", label]
        if max_count:
            argv += ["--max-count", str(max_count)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
        sys.stderr.write(r.stderr)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"cutover-load failed: {r.stderr[-500:]}")
        out = json.loads(lines[-1])
        self.raw.append(out)
        return out


def measured(runner, ip, pid, pg, seconds, start, count, label, order="spread", max_count=None):
    """A login run with the metrics and the CPU of cutover and PostgreSQL around it."""
    runner.quiet.wait()
    m0 = metrics(ip)
    c0, p0 = proc_ticks([pid]), proc_ticks(pg.pids())
    s0, o0 = sys_ticks(), proc_ticks(runner.quiet.ours())
    r = runner.login(ip, seconds, start, count, order=order, max_count=max_count, label=label)
    s1, o1 = sys_ticks(), proc_ticks(runner.quiet.ours())
    c1, p1 = proc_ticks([pid]), proc_ticks(pg.pids())
    m1 = metrics(ip)
    ok = max(r["ok"], 1)
    # CPU other processes (not ours, not the load generator) took meanwhile, as compare.sh
    # reports it.
    busy, idle = s1[0] - s0[0], s1[1] - s0[1]
    r["other_cpu_pct"] = max(0.0, 100 * (busy - (o1 - o0) - r.get("cpu_ticks", 0))
                             / max(busy + idle, 1))
    r["cutover_cpu_us"] = (c1 - c0) * 1e6 / CLK / ok
    r["pg_cpu_us"] = (p1 - p0) * 1e6 / CLK / ok
    r["queries"] = delta(m0, m1, "cutover_lookup_queries_total", lookup=LOOKUP)
    r["query_errors"] = (delta(m0, m1, "cutover_lookup_queries_total", lookup=LOOKUP, result="error")
                         + delta(m0, m1, "cutover_lookup_queries_total", lookup=LOOKUP,
                                 result="timeout"))
    r["not_found"] = delta(m0, m1, "cutover_lookup_queries_total", lookup=LOOKUP,
                           result="not_found")
    r["hits"] = delta(m0, m1, "cutover_lookup_cache_total", lookup=LOOKUP, result="hit")
    r["misses"] = delta(m0, m1, "cutover_lookup_cache_total", lookup=LOOKUP, result="miss")
    r["qps"] = r["queries"] / r["elapsed_s"] if r["elapsed_s"] else 0.0
    n = delta(m0, m1, "cutover_lookup_seconds_count", lookup=LOOKUP)
    s = delta(m0, m1, "cutover_lookup_seconds_sum", lookup=LOOKUP)
    r["query_mean_ms"] = s / n * 1000 if n else None
    for q in (50, 99):
        b = bucket_quantile(m0, m1, "cutover_lookup_seconds", q / 100, lookup=LOOKUP)
        r[f"query_p{q}_le_ms"] = b * 1000 if b is not None else None
    r["entries"] = msum(m1, "cutover_lookup_cache_entries", lookup=LOOKUP)
    print(json.dumps({k: r[k] for k in ("label", "rate", "p50_ms", "p99_ms", "errors", "queries",
                                          "qps", "hits", "misses", "cutover_cpu_us", "pg_cpu_us",
                                          "entries", "other_cpu_pct")}), file=sys.stderr)
    return r


def median_run(runs):
    """The run with the median rate (the lower middle one for an even count)."""
    runs = sorted(runs, key=lambda r: r["rate"])
    return runs[(len(runs) - 1) // 2]


def fmt(v, nd=0):
    if v is None:
        return "n/a"
    return f"{v:,.{nd}f}"


def start_cutover(args, procs, work, name, ip, text):
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(text)
    r = subprocess.run([args.cutover, "check", "--config", path], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"cutover check {name}: {r.stdout[-400:]} {r.stderr[-400:]}")
    env = dict(os.environ, CUTOVER_LOG="warn")
    p = procs.start([args.cutover, "run", "--config", path], os.path.join(work, f"{name}.log"),
                    env=env)
    wait_port(ip, IMAP_PORT, proc=p)
    wait_port(ip, METRICS_PORT, proc=p)
    return p


def splice(path, section):
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    text = re.sub(r"\n" + re.escape(SECTION) + r"\n.*?(?=\n## |\Z)", "\n", text, flags=re.S)
    at = text.find("\n## Findings")
    section = section.rstrip() + "\n\n"
    text = text.rstrip() + "\n\n" + section if at < 0 else text[:at + 1] + section + text[at + 1:]
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cutover", required=True)
    ap.add_argument("--load", required=True)
    ap.add_argument("--backend", help="the fake backend's plaintext ip:port (else --fake)")
    ap.add_argument("--backend-pid", type=int, action="append", default=[],
                    help="the --backend's process (its CPU is not counted as noise)")
    ap.add_argument("--fake", help="cutover-fake-imap binary, started on 127.0.0.42 without --backend")
    ap.add_argument("--out", help="write the Markdown section here")
    ap.add_argument("--into", help="splice the section into this Markdown file (BENCHMARKS.md)")
    ap.add_argument("--quick", action="store_true",
                    help="1M-row table, 20k warm users, 100k entries for memory, 1 run each")
    ap.add_argument("--login-s", type=float, help="seconds per login run (default 10, quick 3)")
    ap.add_argument("--reps", type=int, help="interleaved runs of each (default 3, quick 1)")
    ap.add_argument("--users", type=int, help="rows in the table (default 10M, quick 1M)")
    ap.add_argument("--warm-users", type=int, help="users of the warm runs (default 100k, quick 20k)")
    ap.add_argument("--memory-users", type=int, help="answers cached for the memory figure "
                    "(default 1M, quick 100k)")
    ap.add_argument("--pg-bin", help="PostgreSQL's bin directory (default: newest /usr/lib/postgresql/*/bin)")
    ap.add_argument("--quiet-budget", type=int, default=120,
                    help="seconds in all to wait for other processes to quiet down")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args()
    quick = args.quick
    login_s = args.login_s or (3.0 if quick else 10.0)
    reps = args.reps or (1 if quick else 3)
    n_users = args.users or (1_000_000 if quick else 10_000_000)
    warm_n = args.warm_users or (20_000 if quick else 100_000)
    mem_n = args.memory_users or (100_000 if quick else 1_000_000)
    if warm_n + reps * 10 > n_users or mem_n > n_users - warm_n:
        ap.error("the table is too small for these user counts")
    if not args.out and not args.into:
        ap.error("give --out or --into")
    if not args.backend and not args.fake:
        ap.error("give --backend or --fake")

    def write(section):
        if args.out:
            with open(args.out, "w") as f:
                f.write(section)
        if args.into:
            splice(args.into, section)

    bindir = pg_bindir(args.pg_bin)
    if not bindir or not shutil.which("psql"):
        write(f"{SECTION}\n\nn/a: PostgreSQL (initdb, postgres, psql) is not installed.\n")
        return 0
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            write(f"{SECTION}\n\nn/a: running as root and there is no `postgres` user to run "
                  "PostgreSQL as.\n")
            return 0

    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="cutover-lookups-")
    procs = Procs()
    pg = None
    failed = True
    # SIGTERM/SIGINT from compare.sh's trap: stop what was started here, too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        backend = args.backend
        fake_pids = list(args.backend_pid)
        if not backend:
            backend = f"{FAKE_IP}:{IMAP_PORT}"
            fp = procs.start([args.fake, "--listen", backend], os.path.join(work, "fake.log"))
            wait_port(FAKE_IP, IMAP_PORT, proc=fp)
            fake_pids = [fp.pid]

        shared_buffers = "512MB" if n_users <= 2_000_000 else "2GB"
        log(f"PostgreSQL: initdb, {n_users:,} rows (shared_buffers {shared_buffers}, fsync off)")
        pg = Postgres(procs, bindir, work, shared_buffers)
        pg.start()
        table = fill(pg, n_users)
        log(f"table filled in {table['fill_s']:.1f} s (+ {table['vacuum_prewarm_s']:.1f} s vacuum, "
            f"prewarm): {table['rows']:,} rows, table {table['table_mib']:.0f} MiB, "
            f"index {table['index_mib']:.0f} MiB")
        if table["rows"] != n_users or not table["plan_uses_index"]:
            raise RuntimeError(f"unexpected table: {table}")

        cohort = os.path.join(work, "cohort.txt")
        with open(cohort, "w") as f:
            f.writelines(f"user{i}\n" for i in range(warm_n))
        cutovers = {}
        # max_entries: 2M so that no answer is evicted up to the memory figure's million (a
        # full cache evicts per shard, a little before max_entries in all).
        max_entries = max(2 * mem_n, 2_000_000)
        cutovers["lookup"] = start_cutover(
            args, procs, work, "lookup", LOOKUP_IP,
            cutover_config(LOOKUP_IP, backend, f"{{ lookup: {LOOKUP} }}",
                           lookup_yaml(pg.url, max_entries)))
        cutovers["cohort"] = start_cutover(
            args, procs, work, "cohort", COHORT_IP,
            cutover_config(COHORT_IP, backend, f'{{ users_file: "{cohort}", pool: new }}'))

        def ours():
            return [p.pid for p in cutovers.values() if p.poll() is None] + pg.pids() + fake_pids

        quiet = Quiet(args.quiet_budget, ours)
        runner = Runner(args, procs, quiet)
        lpid, cpid = cutovers["lookup"].pid, cutovers["cohort"].pid

        # 1. Warm cache.
        log(f"warm-up: each of the {warm_n:,} warm users logged in once through the lookup")
        warmup = measured(runner, LOOKUP_IP, lpid, pg, 3600, 0, warm_n, "warm-up",
                          max_count=warm_n)
        if warmup["errors"] or warmup["entries"] < warm_n:
            raise RuntimeError(f"warm-up incomplete: {warmup['errors']} errors, "
                               f"{warmup['entries']:.0f} answers cached for {warm_n} users")
        # The cohort instance once, too (its first connections, allocator).
        runner.login(COHORT_IP, 1, 0, warm_n, label="cohort warm-up")
        warm, coh = [], []
        for rep in range(reps):
            # Interleaved, the order alternating: neither always runs right after the other.
            for kind in (("cohort", "warm") if rep % 2 == 0 else ("warm", "cohort")):
                what = "cohort file" if kind == "cohort" else "lookup, warm cache"
                log(f"login plain, {CONCURRENCY} concurrent, {login_s:g} s, {what} "
                    f"(run {rep + 1}/{reps})")
                if kind == "cohort":
                    coh.append(measured(runner, COHORT_IP, cpid, pg, login_s, 0, warm_n, "cohort"))
                else:
                    warm.append(measured(runner, LOOKUP_IP, lpid, pg, login_s, 0, warm_n, "warm"))

        # 2. Cold cache: run r takes users from its own slice of the table past the warm
        # users, spread over the slice; none was asked before.
        cold = []
        slice_n = (n_users - warm_n) // reps
        for rep in range(reps):
            log(f"login plain, {CONCURRENCY} concurrent, {login_s:g} s, lookup, cold cache "
                f"(every login a new user; run {rep + 1}/{reps})")
            r = measured(runner, LOOKUP_IP, lpid, pg, login_s, warm_n + rep * slice_n, slice_n,
                         "cold")
            if r["users_taken"] > slice_n:
                raise RuntimeError("the cold run went round its slice of users")
            cold.append(r)

        # 3. Memory: a fresh instance; warm-up with the warm users, RSS; mem_n users spread
        # over the rest of the table; RSS again.
        for name in ("lookup", "cohort"):
            procs.stop(cutovers.pop(name))
        log(f"memory: a fresh instance, then {mem_n:,} distinct users looked up")
        cutovers["memory"] = start_cutover(
            args, procs, work, "memory", MEMORY_IP,
            cutover_config(MEMORY_IP, backend, f"{{ lookup: {LOOKUP} }}",
                           lookup_yaml(pg.url, max_entries),
                           # The stragglers history also keeps every user seen (up to a
                           # million by default): kept out of this figure.
                           "stragglers: { max_users: 1 }\n"))
        mpid = cutovers["memory"].pid
        runner.login(MEMORY_IP, 2, 0, warm_n, label="memory warm-up")
        time.sleep(2)
        rss0 = vm_rss(mpid)
        e0 = msum(metrics(MEMORY_IP), "cutover_lookup_cache_entries", lookup=LOOKUP)
        filled = measured(runner, MEMORY_IP, mpid, pg, 3600, warm_n, n_users - warm_n, "memory fill",
                          max_count=mem_n)
        time.sleep(2)
        rss1 = vm_rss(mpid)
        m1 = metrics(MEMORY_IP)
        e1 = msum(m1, "cutover_lookup_cache_entries", lookup=LOOKUP)
        rss1_metric = msum(m1, "process_resident_memory_bytes")
        added = e1 - e0
        mem = {
            "rss0": rss0, "rss1": rss1, "rss1_metric": rss1_metric, "e0": e0, "e1": e1,
            "per_entry": (rss1 - rss0) / added if added > 0 else None,
        }

        # --- the section ---------------------------------------------------------------------
        mc, mw, mk = median_run(coh), median_run(warm), median_run(cold)
        ratio = mw["rate"] / max(mc["rate"], 1)
        cpu_c = statistics.median(r["cutover_cpu_us"] for r in coh)
        cpu_w = statistics.median(r["cutover_cpu_us"] for r in warm)
        cpu_k = statistics.median(r["cutover_cpu_us"] for r in cold)
        cpu_pg = statistics.median(r["pg_cpu_us"] for r in cold)
        others = [r["other_cpu_pct"] for r in coh + warm + cold + [filled]]
        noise = (f"Noise: processes other than these (other users' builds, kernel threads) took "
                 f"median {statistics.median(others):.0f}%, max {max(others):.0f}% of the CPU "
                 f"during the runs (rates on a busy machine vary by tens of percent; CPU per "
                 f"login much less).")
        if quiet.busy:
            noise += (f" {quiet.busy} measurement(s) had to start while other processes used "
                      "over 15% of the CPU.")
        met = ratio >= 0.95
        warm_hits = sum(r["hits"] for r in warm)
        warm_lookups = sum(r["hits"] + r["misses"] for r in warm)
        cold_miss = sum(r["misses"] for r in cold)
        cold_lookups = sum(r["hits"] + r["misses"] for r in cold)
        errors = {k: sum(r["errors"] for r in v) for k, v in
                  (("cohort", coh), ("warm", warm), ("cold", cold), ("fill", [filled]))}
        qerr = sum(r["query_errors"] for r in cold + [filled])
        notfound = sum(r["not_found"] for r in cold + [filled])
        single = " (single run)" if reps == 1 else f" (median of {reps} interleaved runs)"
        cutover_ver = subprocess.run([args.cutover, "--version"], capture_output=True,
                                     text=True).stdout.strip()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        git = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
        mode = "quick run, `--quick`" if quick else "full run"
        elapsed = time.monotonic() - started
        mem_note = (f" ({mem_n:,} with `--quick`, not the million of the full run)"
                    if mem_n < 1_000_000 else "")
        per_entry = mem["per_entry"]
        lines = []
        lines.append(f"""{SECTION}

A `{{ lookup: {LOOKUP} }}` route reading a table of {table['rows']:,} users in a PostgreSQL
started for the run on this machine, against a cohort-file route (`users_file`) listing
the users of the warm runs; the fake backend behind; written by `bench/lookups.py`
({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {mode}, {elapsed:.0f} s, source {git},
{cutover_ver}).

Settings: PostgreSQL {table['version']} (initdb in a temporary directory, {PG_IP}, `--locale=C`,
`fsync=off`, `shared_buffers={shared_buffers}`, autovacuum off), table
`mailbox_routes(username text PRIMARY KEY, pool text, server text)` filled by
`INSERT ... SELECT generate_series` in {table['fill_s']:.0f} s (user0..user{table['rows'] - 1:,}, pool
`new`, server NULL; table {table['table_mib']:,.0f} MiB, index {table['index_mib']:,.0f} MiB, then
`VACUUM ANALYZE` and `pg_prewarm` so the database answers from memory); the query `{QUERY}`
on `connections: 2`, `timeout: 300ms`, `cache: {{ ttl: 1h, negative_ttl: 10s, max_entries:
{max_entries:,}, stale_for: 5m }}`. Each cutover: one plaintext IMAP listener, one pool, `health:
{{ interval: 0s }}`, workers one per CPU, `CUTOVER_LOG=warn`, its own address (lookup
{LOOKUP_IP}, cohort {COHORT_IP}, memory {MEMORY_IP}). Load: `cutover-load login` at
{CONCURRENCY} concurrent, {login_s:g} s per run, a different user name per login
(`--users-count`, spread over the range); logins/s and latency (connect to the tagged OK of
`LOGIN`){single}. Warm runs: the {warm_n:,} users user0..user{warm_n - 1:,}, each logged
in once through the lookup before (the warm-up pass: {warmup['rate']:,.0f} logins/s, cold);
{warm_hits:,.0f} of {warm_lookups:,.0f} answers in the warm runs came from the cache. Cold runs: users
never asked before, spread over the other {n_users - warm_n:,} rows ({cold_miss:,.0f} of
{cold_lookups:,.0f} answers were cache misses). CPU per login: user+system time of the process(es)
over successful logins (medians of the runs). Memory: a fresh instance (`stragglers: {{ max_users: 1 }}`, so that the login history,
which also keeps every user seen, is not counted), warmed up with 2 s of logins of the warm users,
VmRSS read, {mem_n:,} distinct users logged in at {CONCURRENCY} concurrent{mem_note}, VmRSS read 2 s
later; (after - before) / answers added to `cutover_lookup_cache_entries`. Errors: cohort
{errors['cohort']}, warm {errors['warm']}, cold {errors['cold']}, memory fill {errors['fill']};
query errors and timeouts {qerr:.0f}, rows not found {notfound:.0f}. {noise}

| measure | value | target |
|---|---:|---|
| logins/s, plain, {CONCURRENCY} concurrent, cohort file ({warm_n:,} users) | {mc['rate']:,.0f} (p50 {mc['p50_ms']:.2f} / p99 {mc['p99_ms']:.2f} ms) | |
| logins/s, plain, {CONCURRENCY} concurrent, lookup, warm cache (same users, all cached) | {mw['rate']:,.0f} (p50 {mw['p50_ms']:.2f} / p99 {mw['p99_ms']:.2f} ms) | |
| ratio warm lookup / cohort file | {ratio:.2f}x (runs: {', '.join(f"{w['rate'] / max(c['rate'], 1):.2f}x" for w, c in zip(warm, coh))}) | at least 0.95x |
| &nbsp;&nbsp;cutover CPU per login, warm lookup / cohort file | {cpu_w:.0f} / {cpu_c:.0f} µs = {cpu_w / max(cpu_c, 1e-9):.2f}x | |
| logins/s, plain, {CONCURRENCY} concurrent, lookup, cold cache (every login a new user) | {mk['rate']:,.0f} (p50 {mk['p50_ms']:.2f} / p99 {mk['p99_ms']:.2f} ms) | |
| &nbsp;&nbsp;queries/s (`cutover_lookup_queries_total`) | {mk['qps']:,.0f} | |
| &nbsp;&nbsp;p99 login latency added over the cohort file (p50 added) | {mk['p99_ms'] - mc['p99_ms']:+.2f} ms ({mk['p50_ms'] - mc['p50_ms']:+.2f} ms) | |
| &nbsp;&nbsp;query time as cutover sees it, mean; p50, p99 as histogram buckets (`cutover_lookup_seconds`) | {fmt(mk['query_mean_ms'], 2)} ms; ≤ {fmt(mk['query_p50_le_ms'], 1)} ms, ≤ {fmt(mk['query_p99_le_ms'], 1)} ms | |
| &nbsp;&nbsp;CPU per login: cutover / PostgreSQL (cutover's with a warm cache: {cpu_w:.0f} µs) | {cpu_k:.0f} / {cpu_pg:.0f} µs | |
| {mem_n:,} cold logins in a row (the memory fill) | {filled['rate']:,.0f} logins/s, {filled['qps']:,.0f} queries/s (p99 {filled['p99_ms']:.2f} ms) | |
| cache memory: RSS per cached answer at {e1:,.0f} entries | {fmt(per_entry)} bytes ({(rss1 - rss0) / 2**20:,.1f} MiB over {added:,.0f} answers; RSS {rss0 / 2**20:,.1f} → {rss1 / 2**20:,.1f} MiB) | |

Target (issue 14): warm-cache logins/s at least 0.95x the cohort file's: {'**met**' if met else '**not met**'} ({ratio:.2f}x).

How to read it: on two cores the login rate of a single run moves by 10-15% from one
minute to the next with nothing changed (the runs column), more when other processes take
CPU; the CPU per login rows are the steadier comparison. The query time is measured in
the login's own task, so besides PostgreSQL (about {cpu_pg:.0f} µs of its CPU per query) it
includes the wait until the session worker, busy with the other logins, runs the login
again once the answer is in.
""")
        section = "".join(lines)
        write(section)
        print(json.dumps({"table": table, "ratio": ratio, "cohort": mc["rate"], "warm": mw["rate"],
                          "cold": mk["rate"], "cold_qps": mk["qps"],
                          "p99_added_ms": mk["p99_ms"] - mc["p99_ms"], "memory": mem,
                          "fill_rate": filled["rate"], "elapsed_s": elapsed}))
        with open(os.path.join(work, "raw.jsonl"), "w") as f:
            for r in runner.raw:
                f.write(json.dumps(r) + "\n")
        failed = False
        return 0
    finally:
        procs.stop_all()
        if pg is not None:
            pg.remove()
        if args.keep or failed:
            print(f"lookups: logs and configs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Operating cutover as a system service (issue 16 items 1, 2 and 5), end to end: the
real binary in front of the session's real Dovecot backends, real clients.

* upgrade:     `cutover upgrade` under a stream of plaintext and TLS IMAP logins with 20
               open IDLE sessions: nothing refused, no login failed (but for the known
               pre-auth `* BYE` below, by its exact signature), the IDLE sessions
               stay on the old process until its drain timeout and then get `* BYE`, new
               logins land on the new process (proven by who owns the server side of the
               TCP connection in /proc), the old one exits 0, and a second upgrade from
               the new process works (it took the upgrade socket over)
* systemd:     a fake NOTIFY_SOCKET (a Unix datagram socket bound here, SO_PASSCRED tells
               the sender's pid): READY=1 + STATUS= after the listeners are bound,
               WATCHDOG=1 every WatchdogSec/3, RELOADING=1 + MONOTONIC_USEC= then READY=1
               on SIGHUP, STOPPING=1 on SIGTERM
* activation:  `systemd-socket-activate -l ADDR --fdname=imap`: the proxy serves on the
               inherited socket and binds nothing for that listener
* healthcheck: `cutover healthcheck` (metrics endpoint, or the admin endpoint with its
               token) exit 0 / 1, also during a SIGTERM drain (503 from /ready)
* config dump, --version
* edge cases: a failed upgrade (the new process cannot bind a listener added to the file)
               leaves the old one serving; `cutover upgrade` without a proxy fails; a stale
               upgrade socket left by a SIGKILLed proxy is replaced; a listener moved in the
               file is bound anew at the upgrade

Misbehaviour found is written as strict xfails that fail only through ``KnownBug`` (any
other failure in them is a real failure): pre-auth clients of the old process get `* BYE`
at the hand-over; the draining old process still answers /ready (503) on the shared
metrics/admin sockets; `cutover upgrade`'s stdout stays open (held by the new process);
a failed SIGHUP reload sends no RELOADING=1/READY=1; the old process sends STOPPING=1 at an
upgrade; a metrics address moved in the file is not applied by an upgrade.

Every proxy here is a process of its own on an address of its own (see ``OPS_IPS``), never
the session proxy of 127.0.0.1. Processes that `cutover upgrade` starts (in their own
process group) are found by pid, reaped (this process is a child subreaper while an
upgrade test runs) and killed at the end of the test.
"""

import contextlib
import ctypes
import os
import re
import select
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request

import pytest

import clients as c
import harness
from harness import USERS

pytestmark = pytest.mark.proxy

#: one loopback address per test (nothing else in the suite uses them)
OPS_IPS = {
    "upgrade": "127.0.0.80",
    "endpoints": "127.0.0.81",
    "notify": "127.0.0.82",
    "activate": "127.0.0.83",
    "health": "127.0.0.84",
    "pipe": "127.0.0.85",
    "notify-upgrade": "127.0.0.86",
    "dump": "127.0.0.87",
    "preauth": "127.0.0.88",
    "failed": "127.0.0.89",
    "stale": "127.0.0.90",
    "moved": "127.0.0.91",
    "moved-metrics": "127.0.0.92",
    "journal": "127.0.0.93",
}
IMAP, IMAPS, PLAIN = 11143, 11993, 11144
METRICS, ADMIN = 19898, 19899
#: shutdown.drain_timeout of the upgrade test
DRAIN = 4.0
IDLE_SESSIONS = 20
ACTIVATE = "/usr/bin/systemd-socket-activate"
ADMIN_TOKEN = "ops-admin-token-0123456789abcdef"
REDIS_PASSWORD = "secretpw-ops-7f3a"


class KnownBug(AssertionError):
    """Raised only by the check an xfail test documents (``xfail(raises=KnownBug)``): any
    other failure of that test is a plain failure, not an expected one."""


def known_bug(ok, message):
    if not ok:
        raise KnownBug(message)


# --------------------------------------------------------------------------
# helpers: config, processes
# --------------------------------------------------------------------------


def ops_config(env, ip, *, drain=DRAIN, upgrade=None, metrics=True, admin=False):
    """The session proxy's pools and routes with IMAP listeners of our own on ``ip``:
    imap (STARTTLS), imaps (implicit TLS), imap-plain (no TLS, plaintext logins allowed)."""
    cfg = harness.proxy_config(env)
    cfg["listeners"] = [
        {"name": "imap", "protocol": "imap", "listen": f"{ip}:{IMAP}", "tls": "starttls"},
        {"name": "imaps", "protocol": "imap", "listen": f"{ip}:{IMAPS}", "tls": "implicit"},
        {"name": "imap-plain", "protocol": "imap", "listen": f"{ip}:{PLAIN}", "tls": "none",
         "allow_plaintext_auth": True},
    ]
    if metrics:
        cfg["metrics"] = {"listen": f"{ip}:{METRICS}"}
    else:
        cfg.pop("metrics", None)
    if admin:
        cfg["admin"] = {"listen": f"{ip}:{ADMIN}", "token_file": str(admin)}
    cfg["shutdown"] = {"drain_timeout": f"{drain:g}s"}
    if upgrade:
        cfg["upgrade"] = {"socket": str(upgrade)}
    return cfg


def proc_env(**extra):
    e = dict(os.environ)
    e.update({"CUTOVER_LOG": "debug", "NO_COLOR": "1", "RUST_BACKTRACE": "1"})
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
              "LISTEN_FDNAMES"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


class Cutover(harness.ManagedProcess):
    """``cutover run --config <dir>/routes.yaml`` on an address of its own; ``argv`` may
    wrap it (``{bin}`` and ``{config}`` are filled in). start() also waits for GET /ready
    when the config has a metrics endpoint."""

    def __init__(self, env, name, config, argv=None, extra_env=None, ports=None, wait_ready=True):
        self.wait_ready = wait_ready
        self.dir = env.root / f"ops-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = self.dir / "routes.yaml"
        self.write_config(config)
        binary = str(harness.resolve_cutover_bin())
        argv = argv or ["{bin}", "run", "--config", "{config}"]
        argv = [a.format(bin=binary, config=self.config_path) for a in argv]
        if ports is None:
            ports = [addr(l["listen"]) for l in config["listeners"]]
            ports += [addr(config[k]["listen"]) for k in ("metrics", "admin") if k in config]
        super().__init__(f"cutover-{name}", argv, ports, self.dir / "proxy.log",
                         env=proc_env(**(extra_env or {})), cwd=str(self.dir))

    def write_config(self, config):
        text = config if isinstance(config, str) else harness.to_yaml(config) + "\n"
        tmp = self.config_path.with_name("routes.yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config_path)

    def start(self, timeout=harness.START_TIMEOUT):
        if not harness.resolve_cutover_bin().exists():
            pytest.fail(f"cutover binary missing: {harness.resolve_cutover_bin()}", pytrace=False)
        super().start(timeout)
        if self.wait_ready and "metrics" in self.config:
            host, port = addr(self.config["metrics"]["listen"])
            wait_ready(host, port, timeout)
        return self

    def log_text(self):
        return harness._ANSI.sub("", self.log_path.read_text(errors="replace"))


def addr(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def get(ip, port, path, token=None, timeout=5.0):
    """One HTTP GET: (status, body); (None, error text) if the connection fails."""
    req = urllib.request.Request(f"http://{ip}:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, repr(e)


def wait_ready(ip, port, timeout=harness.START_TIMEOUT):
    harness.wait_until(lambda: get(ip, port, "/ready")[0] == 200, timeout, interval=0.1,
                       what=f"GET /ready = 200 on {ip}:{port}")


def alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def reap(pid):
    """Collect ``pid``'s exit status if it is our child (subreaper); None otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
    return None


def wait_exit(pid, timeout):
    """Bounded wait until ``pid`` is gone (reaped if it is our child); returns its exit
    status when we could reap it, True if it vanished otherwise, None if still alive."""
    deadline = time.monotonic() + timeout
    while True:
        rc = reap(pid)
        if rc is not None:
            return rc
        if not alive(pid):
            return True
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def kill_pid(pid, timeout=10.0):
    """SIGTERM ``pid`` (and its process group if it leads one), bounded wait, SIGKILL."""
    if pid is None:
        return
    if not alive(pid):
        reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_exit(pid, timeout) is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_exit(pid, timeout)


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper():
    """Orphans of our children (the process `cutover upgrade` starts and leaves) become
    our children while inside: their exit status can be collected."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def cutover_upgrade(config_path, log_path, env=None, timeout=75):
    """`cutover upgrade --config FILE`, its output (and the new process's log, which
    inherits it) appended to ``log_path``. Returns (exit status, its own output line(s),
    new pid, old pid)."""
    binary = str(harness.resolve_cutover_bin())
    with open(log_path, "ab") as log:
        off = log.tell()
        log.write(f"--- {binary} upgrade --config {config_path}\n".encode())
        log.flush()
        p = subprocess.Popen([binary, "upgrade", "--config", str(config_path)],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             env=env or proc_env(), cwd=str(config_path.parent))
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait(10)
    text = harness._ANSI.sub("", open(log_path, "rb").read()[off:].decode("utf-8", "replace"))
    m = re.search(r"upgraded: pid (\d+) serves, pid (\d+) drains and exits", text)
    return rc, text, (int(m[1]) if m else None), (int(m[2]) if m else None)


# --------------------------------------------------------------------------
# helpers: which process owns a connection
# --------------------------------------------------------------------------


def _hex_addr(ip, port):
    return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(ip))[0], port)


def socket_inode(server, client):
    """Inode of the server side of the established TCP connection ``client`` -> ``server``
    (both (ip, port)), from /proc/net/tcp; None if not found."""
    local, remote = _hex_addr(*server), _hex_addr(*client)
    # The kernel writes /proc/net/tcp a page at a time from a table that other connections
    # keep changing (the login stream): one read can miss an entry that is there all along.
    # A connection that is really gone is missing from every read.
    for _ in range(5):
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1] == local and fields[2] == remote and fields[3] == "01":
                    return fields[9]
        time.sleep(0.02)
    return None


def fd_inodes(pid):
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(link[8:-1])
    return out


def owners(socks, server_ip, pids):
    """For each client socket, which of ``pids`` holds the server side of its connection
    (None if none of them). A raw socket or an SSLSocket."""
    held = {pid: fd_inodes(pid) for pid in pids}
    out = []
    for s in socks:
        peer = s.getpeername()
        inode = socket_inode((server_ip, peer[1]), s.getsockname())
        out.append(next((pid for pid, inodes in held.items() if inode and inode in inodes), None))
    return out


# --------------------------------------------------------------------------
# helpers: IMAP clients (the proxy certificate is verified as "localhost")
# --------------------------------------------------------------------------


def imap_open(ip, port, mode, ctx, timeout=c.IO_TIMEOUT):
    """A RawIMAP to ``ip:port``: mode "plain", "imaps" (implicit TLS) or "starttls".
    Raises ConnectionRefusedError as is; the greeting is in ``.greeting``."""
    sock = socket.create_connection((ip, port), timeout=timeout)
    try:
        if mode == "imaps":
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        r = c.RawIMAP.__new__(c.RawIMAP)
        r.host, r.sock, r.buf, r.transcript = "localhost", sock, b"", []
        r.greeting = r.readline()
        if mode == "starttls" and r.greeting.startswith(b"* OK"):
            r.starttls(ctx)
        return r
    except BaseException:
        sock.close()
        raise


def imap_login_subject(r, user):
    """LOGIN, EXAMINE INBOX, FETCH the seeded Subject; returns the host that served it."""
    tagged, _ = r.command("a1", f'LOGIN {user} "{USERS[user]}"')
    assert c.is_tagged_ok(tagged, "a1"), r.dump()
    tagged, _ = r.command("a2", "EXAMINE INBOX")
    assert c.is_tagged_ok(tagged, "a2"), r.dump()
    tagged, lines = r.command("a3", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert c.is_tagged_ok(tagged, "a3"), r.dump()
    host = next((m[1].decode() for l in lines if (m := re.match(rb"Subject: hello from (\w+)", l))),
                None)
    assert host, r.dump()
    return host


def open_idle(ip, port, mode, ctx, user):
    r = imap_open(ip, port, mode, ctx)
    try:
        assert r.greeting.startswith(b"* OK"), r.greeting
        imap_login_subject(r, user)
        r.send("i1 IDLE\r\n")
        assert r.readline().startswith(b"+"), r.dump()
    except BaseException:
        r.close()
        raise
    return r


def readable(r):
    """True if the server sent something (or closed) on ``r``."""
    if r.buf:
        return True
    if isinstance(r.sock, ssl.SSLSocket) and r.sock.pending():
        return True
    return bool(select.select([r.sock], [], [], 0)[0])


def wait_bye(r, deadline, out):
    """Thread body: read ``r`` until `* BYE`; appends (r, monotonic time of the BYE or
    None, the BYE line or what happened instead) to ``out``."""
    when, what = None, ""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                what = "no BYE by the deadline"
                break
            r.sock.settimeout(left)
            line = r.readline()
            if line.startswith(b"* BYE"):
                when, what = time.monotonic(), line.decode(errors="replace")
                break
    except ConnectionError as e:  # EOF without BYE
        what = f"closed without BYE: {e}"[:300]
    except (OSError, ssl.SSLError) as e:
        what = f"error: {e!r}"
    out.append((r, when, what))


class LoginStream:
    """Threads logging in and out continuously through ``ip`` (plaintext and TLS).
    Every attempt is recorded: refused connects, attempts without a `* OK` greeting, and
    failed logins are failures; nothing is retried silently."""

    PLAN = (("plain", PLAIN, "bob", "green"), ("plain", PLAIN, "joeuser", "new"),
            ("imaps", IMAPS, "carol", "green"), ("imaps", IMAPS, "alice", "new"),
            ("starttls", IMAP, "bob", "green"))

    def __init__(self, ip, ctx):
        self.ip, self.ctx = ip, ctx
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = []  # monotonic end times of completed logins
        self.refused = []  # (time, mode)
        self.failed = []  # (time, mode, user, what)
        self.threads = [threading.Thread(target=self._run, args=p, daemon=True) for p in self.PLAN]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        if exc_type is not None:  # the test failed inside: say what the load saw
            print(f"\nlogin stream: {len(self.ok)} ok, {len(self.refused)} refused, "
                  f"{len(self.failed)} failed; first failures:")
            for t, mode, user, what in self.failed[:3]:
                print(f"  {mode} {user}: {what}")

    def count(self):
        with self.lock:
            return len(self.ok)

    def _run(self, mode, port, user, expect):
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                r = imap_open(self.ip, port, mode, self.ctx)
            except ConnectionRefusedError:
                with self.lock:
                    self.refused.append((t, mode))
                self.stop.wait(0.05)
                continue
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
                with self.lock:
                    self.failed.append((t, mode, user, f"connect/greeting/TLS: {e!r}"))
                continue
            with r:
                try:
                    assert r.greeting.startswith(b"* OK"), f"greeting {r.greeting!r}"
                    host = imap_login_subject(r, user)
                    assert host == expect, f"served by {host}, expected {expect}"
                    tagged, _ = r.command("a4", "LOGOUT")
                    assert c.is_tagged_ok(tagged, "a4"), r.dump()
                except Exception as e:  # noqa: BLE001
                    with self.lock:
                        self.failed.append((t, mode, user, f"{e!r}\n{r.dump()}"[:2000]))
                    continue
            with self.lock:
                self.ok.append(time.monotonic())


@pytest.fixture
def cleanup():
    """Processes and things to stop at the end of a test, also on failure:
    ``cleanup.pids`` (killed by pid), ``cleanup.procs`` (ManagedProcess, stopped; their
    ports must close), ``cleanup.socks`` (client connections, closed first)."""
    bag = types.SimpleNamespace(pids=[], procs=[], socks=[])
    yield bag
    # shown by pytest only when the test failed ("Captured stdout teardown")
    for p in bag.procs:
        for log in sorted(p.dir.glob("*.log")):
            print(f"--- {log} (last 40 lines) ---\n{harness.tail(log, 40)}")
    for r in bag.socks:
        with contextlib.suppress(Exception):
            r.close()
    for pid in bag.pids:
        kill_pid(pid)
    for p in bag.procs:
        if p.proc is not None and p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait(10)
        p.proc = None
    for p in bag.procs:
        harness.wait_until(lambda: not any(harness.port_open(*a) for a in p.ports), 10,
                           what=f"{p.name}'s ports to close")


# --------------------------------------------------------------------------
# 1. zero-downtime upgrade
# --------------------------------------------------------------------------


def test_upgrade_under_logins_refuses_nothing_and_keeps_idle_sessions_until_the_drain(
        env, servers, cleanup):
    ip = OPS_IPS["upgrade"]
    ctx = env.ssl_context()
    ctx.check_hostname = True
    d = env.root / "ops-upgrade"
    d.mkdir(exist_ok=True)
    old = Cutover(env, "upgrade", ops_config(env, ip, upgrade=d / "upgrade.sock"))
    cleanup.procs.append(old)
    upgrade_log = d / "upgrade.log"
    with subreaper():
        old.start()
        old_pid = old.pid

        # 20 IDLE sessions on the old process: plaintext and TLS, both pools
        plan = [("imaps", IMAPS, "joeuser"), ("imaps", IMAPS, "bob"), ("plain", PLAIN, "carol"),
                ("plain", PLAIN, "alice"), ("starttls", IMAP, "bob")]
        idles = []
        for i in range(IDLE_SESSIONS):
            mode, port, user = plan[i % len(plan)]
            idles.append(open_idle(ip, port, mode, ctx, user))
            cleanup.socks.append(idles[-1])
        assert owners([r.sock for r in idles], ip, [old_pid]) == [old_pid] * IDLE_SESSIONS

        handovers = []  # (start, end) of each `cutover upgrade`
        with LoginStream(ip, ctx) as load:
            c.wait_for(lambda: load.count() >= 30, 60, what="30 logins before the upgrade")
            before = load.count()
            t_up = time.monotonic()
            rc, out, new_pid, drained = cutover_upgrade(old.config_path, upgrade_log)
            t_done = time.monotonic()
            handovers.append((t_up, t_done))
            if new_pid:
                cleanup.pids.append(new_pid)
            assert rc == 0 and new_pid and drained == old_pid, \
                f"cutover upgrade: exit {rc}, output:\n{out}\n{old.diagnostics()}"
            assert new_pid != old_pid and alive(new_pid)

            # right after the hand-over: the IDLE sessions are still open on the old process
            assert alive(old_pid), "the old process exited at once instead of draining"
            assert owners([r.sock for r in idles], ip, [old_pid, new_pid]) == [old_pid] * IDLE_SESSIONS
            early = [i for i, r in enumerate(idles) if readable(r)]
            assert not early, f"IDLE sessions {early} got data right after the hand-over"
            # ... and relay: two of them leave IDLE, NOOP, and idle again
            for r in idles[:2]:
                r.send("DONE\r\n")
                tagged, _ = r.read_until_tagged("i1")
                assert c.is_tagged_ok(tagged, "i1"), r.dump()
                tagged, _ = r.command("n1", "NOOP")
                assert c.is_tagged_ok(tagged, "n1"), r.dump()
                r.send("i1 IDLE\r\n")
                assert r.readline().startswith(b"+"), r.dump()

            # new logins are served by the new process, none by the draining one
            probes = [imap_open(ip, port, mode, ctx) for mode, port, _ in plan * 2]
            cleanup.socks.extend(probes)
            for r, (_, _, user) in zip(probes, plan * 2):
                imap_login_subject(r, user)
            got = owners([r.sock for r in probes], ip, [old_pid, new_pid])
            assert got == [new_pid] * len(probes), f"probe logins served by {got} (old {old_pid}, new {new_pid})"
            for r in probes:
                r.close()

            # the IDLE sessions get `* BYE` at the old process's drain timeout
            byes = []
            waiters = [threading.Thread(target=wait_bye, args=(r, t_done + DRAIN + 10, byes), daemon=True)
                       for r in idles]
            for t in waiters:
                t.start()
            for t in waiters:
                t.join(DRAIN + 15)
            bad = [(what) for _, when, what in byes if when is None]
            assert len(byes) == IDLE_SESSIONS and not bad, f"IDLE sessions without BYE: {bad}"
            times = sorted(when - t_up for _, when, _ in byes)
            assert times[0] >= DRAIN - 0.5, \
                f"first IDLE BYE {times[0]:.2f}s after the upgrade started (drain {DRAIN}s)"
            assert times[-1] <= (t_done - t_up) + DRAIN + 5, f"last IDLE BYE after {times[-1]:.2f}s"

            # the old process exits 0 after its drain
            rc_old = old.proc.wait(15)
            old.proc = None  # its ports stay open: they are the new process's now
            assert rc_old == 0 and not alive(old_pid), f"old process exit status {rc_old}"
            after = load.count()
            c.wait_for(lambda: load.count() >= after + 30, 60, what="30 logins after the old process exited")

            # a second upgrade, from the new process (it took the upgrade socket over)
            t2 = time.monotonic()
            rc2, out2, newer_pid, drained2 = cutover_upgrade(old.config_path, upgrade_log)
            handovers.append((t2, time.monotonic()))
            if newer_pid:
                cleanup.pids.append(newer_pid)
            assert rc2 == 0 and drained2 == new_pid and newer_pid not in (None, new_pid, old_pid), \
                f"second upgrade: exit {rc2}, output:\n{out2}"
            # nothing relayed on it: it drains at once and exits 0
            rc_new = wait_exit(new_pid, DRAIN + 10)
            assert rc_new in (0, True), f"the first new process: {rc_new} (None: still running)"
            mark = load.count()
            c.wait_for(lambda: load.count() >= mark + 30, 60, what="30 logins after the second upgrade")
            r = imap_open(ip, IMAPS, "imaps", ctx)
            cleanup.socks.append(r)
            imap_login_subject(r, "joeuser")
            assert owners([r.sock], ip, [new_pid, newer_pid]) == [newer_pid]
            r.close()
    log = old.log_text() + upgrade_log.read_text(errors="replace")
    assert load.refused == [], f"{len(load.refused)} refused connects: {load.refused[:10]}"
    # Every login counts: a client that connected to the process being replaced and had
    # not logged in yet logs in there (test_preauth_session_on_the_old_process_can_still_
    # log_in_after_the_handover).
    preauth_bye = []
    failed = list(load.failed)
    assert failed == [], f"{len(failed)} failed logins:\n" + "\n\n".join(
        f"{t - t_up:+.3f}s {mode} {user}: {what}" for t, mode, user, what in failed[:5])
    assert "upgrade: the old process drains; this one serves" in log
    print(f"\nupgrade: {len(load.ok)} logins ({before} before the first upgrade), 0 refused, "
          f"{len(preauth_bye)} pre-auth `* BYE` at a hand-over; upgrades took "
          f"{', '.join(f'{b - a:.2f}s' for a, b in handovers)}; IDLE BYEs "
          f"{times[0]:.2f}..{times[-1]:.2f}s after the first")


SHUTTING_DOWN = "* BYE [UNAVAILABLE] Server shutting down"


def test_failed_upgrade_leaves_the_old_process_serving(env, servers, cleanup):
    """The new process takes the sockets over and then cannot start (a listener added to
    the file is on a busy address): `cutover upgrade` fails, the old process never stopped
    accepting, and a later upgrade (file fixed) works."""
    ip = OPS_IPS["failed"]
    ctx = env.ssl_context()
    d = env.root / "ops-failed"
    d.mkdir(exist_ok=True)
    cfg = ops_config(env, ip, drain=1, upgrade=d / "upgrade.sock")
    old = Cutover(env, "failed", cfg)
    cleanup.procs.append(old)
    busy = socket.create_server((ip, 11146))  # not SO_REUSEPORT: a bind there fails
    with subreaper(), busy:
        old.start()
        off = old.log_path.stat().st_size
        broken = dict(cfg, listeners=cfg["listeners"] + [
            {"name": "extra", "protocol": "imap", "listen": f"{ip}:11146", "tls": "none",
             "allow_plaintext_auth": True}])
        old.write_config(broken)  # the running proxy's own reload of it fails too
        harness.wait_until(lambda: "reload failed" in old.log_text()[off:], 10,
                           what="the old process to refuse the file")
        rc, out, new_pid, _ = cutover_upgrade(old.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 1 and new_pid is None, f"exit {rc}:\n{out}"
        assert "exited" in out and "11146" in out, out
        assert old.proc.poll() is None and get(ip, METRICS, "/ready")[0] == 200
        r = imap_open(ip, IMAPS, "imaps", ctx)
        cleanup.socks.append(r)
        assert imap_login_subject(r, "carol") == "green"
        assert owners([r.sock], ip, [old.pid]) == [old.pid]
        r.close()
        assert "upgrade hand-over failed; still serving" in old.log_text()[off:]

        old.write_config(cfg)
        rc, out, new_pid, drained = cutover_upgrade(old.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and drained == old.pid, out
        assert old.proc.wait(15) == 0
        old.proc = None
        r = imap_open(ip, PLAIN, "plain", ctx)
        cleanup.socks.append(r)
        assert imap_login_subject(r, "bob") == "green"
        assert owners([r.sock], ip, [new_pid]) == [new_pid]


def test_upgrade_without_a_proxy_fails_and_a_stale_socket_is_replaced(env, servers, cleanup):
    ip = OPS_IPS["stale"]
    d = env.root / "ops-stale"
    d.mkdir(exist_ok=True)
    sock = d / "upgrade.sock"
    p = Cutover(env, "stale", ops_config(env, ip, drain=1, upgrade=sock))
    cleanup.procs.append(p)
    rc, out, _, _ = cutover_upgrade(p.config_path, d / "upgrade.log")
    assert rc == 1 and "is the proxy running?" in out, out
    p.start()
    p.proc.send_signal(signal.SIGKILL)  # leaves upgrade.sock behind
    p.wait_stopped()
    assert sock.exists()
    with subreaper():
        p.start()  # binds over the stale file
        rc, out, new_pid, drained = cutover_upgrade(p.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and drained == p.pid, out
        assert p.proc.wait(15) == 0
        p.proc = None
    wait_ready(ip, METRICS, 10)  # the new process


def test_upgrade_applies_a_changed_listener_address(env, servers, cleanup):
    """A listener moved in the file before `cutover upgrade` is bound at its new address by
    the new process; the old address closes with the old process."""
    ip = OPS_IPS["moved"]
    ctx = env.ssl_context()
    d = env.root / "ops-moved"
    d.mkdir(exist_ok=True)
    cfg = ops_config(env, ip, drain=1, upgrade=d / "upgrade.sock")
    old = Cutover(env, "moved", cfg)
    cleanup.procs.append(old)
    moved_port = 11145
    with subreaper():
        old.start()
        moved = dict(cfg, listeners=[dict(l, listen=f"{ip}:{moved_port}") if l["name"] == "imap-plain"
                                     else l for l in cfg["listeners"]])
        old.write_config(moved)
        rc, out, new_pid, _ = cutover_upgrade(old.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and new_pid, out
        assert old.proc.wait(15) == 0
        old.proc = None
        old.ports = [(ip, p) for p in (IMAP, IMAPS, PLAIN, moved_port, METRICS)]
        r = imap_open(ip, moved_port, "plain", ctx)
        cleanup.socks.append(r)
        assert imap_login_subject(r, "bob") == "green"
        assert owners([r.sock], ip, [new_pid]) == [new_pid]
        assert not harness.port_open(ip, PLAIN), f"{ip}:{PLAIN} still open after the move"
    # The new process's own log until the hand-over: next to the upgrade socket.
    assert "address changed: binding it anew" in (d / "upgrade.sock.log").read_text()


def test_upgrade_applies_a_changed_metrics_address(env, servers, cleanup):
    ip = OPS_IPS["moved-metrics"]
    d = env.root / "ops-moved-metrics"
    d.mkdir(exist_ok=True)
    cfg = ops_config(env, ip, drain=1, upgrade=d / "upgrade.sock")
    old = Cutover(env, "moved-metrics", cfg)
    cleanup.procs.append(old)
    moved_port = METRICS - 1
    with subreaper():
        old.start()
        old.write_config(dict(cfg, metrics={"listen": f"{ip}:{moved_port}"}))
        rc, out, new_pid, _ = cutover_upgrade(old.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and new_pid, out
        assert old.proc.wait(15) == 0
        old.proc = None
        old.ports = [(ip, p) for p in (IMAP, IMAPS, PLAIN, METRICS, moved_port)]
        time.sleep(0.5)
        first = {port: get(ip, port, "/ready")[0] for port in (METRICS, moved_port)}
        os.kill(new_pid, signal.SIGHUP)
        time.sleep(1.0)
        after_hup = {port: get(ip, port, "/ready")[0] for port in (METRICS, moved_port)}
    hc = c.cutover_cli("healthcheck", "--config", old.config_path)
    known_bug(first == {METRICS: None, moved_port: 200} and hc.returncode == 0,
              f"metrics moved {METRICS} -> {moved_port} in the file; GET /ready after the upgrade: "
              f"{first}, after a SIGHUP: {after_hup}; `cutover healthcheck` (asks {moved_port}): "
              f"exit {hc.returncode} {hc.out.strip()}")


def test_preauth_session_on_the_old_process_can_still_log_in_after_the_handover(
        env, servers, cleanup):
    ip = OPS_IPS["preauth"]
    ctx = env.ssl_context()
    d = env.root / "ops-preauth"
    d.mkdir(exist_ok=True)
    old = Cutover(env, "preauth", ops_config(env, ip, drain=3, upgrade=d / "upgrade.sock"))
    cleanup.procs.append(old)
    with subreaper():
        old.start()
        # connected and greeted by the old process, no command sent yet
        pre = [imap_open(ip, port, mode, ctx) for mode, port in
               (("plain", PLAIN), ("imaps", IMAPS), ("starttls", IMAP))]
        cleanup.socks.extend(pre)
        assert all(r.greeting.startswith(b"* OK") for r in pre)
        assert owners([r.sock for r in pre], ip, [old.pid]) == [old.pid] * 3
        rc, out, new_pid, _ = cutover_upgrade(old.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and new_pid, out
        results = []
        for r, user in zip(pre, ("bob", "alice", "carol")):
            try:
                results.append(imap_login_subject(r, user))
            except (AssertionError, ConnectionError, OSError):
                results.append(r.dump().splitlines()[-1])
        old.proc.wait(15)
        old.proc = None
    known_bug(results == ["green", "new", "green"],
              f"logins of pre-auth connections after the hand-over: {results}")


def test_endpoints_answer_from_the_new_process_during_the_old_ones_drain(env, servers, cleanup):
    ip = OPS_IPS["endpoints"]
    d = env.root / "ops-endpoints"
    d.mkdir(exist_ok=True)
    token = d / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    old = Cutover(env, "endpoints", ops_config(env, ip, drain=3, upgrade=d / "upgrade.sock",
                                               admin=token))
    cleanup.procs.append(old)
    ctx = env.ssl_context()
    with subreaper():
        old.start()
        idle = open_idle(ip, IMAPS, "imaps", ctx, "bob")  # keeps the old process draining
        cleanup.socks.append(idle)
        rc, out, new_pid, _ = cutover_upgrade(old.config_path, d / "upgrade.log")
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and new_pid, out
        wait_ready(ip, METRICS, 10)  # the new process is ready (its first health round)
        answers = []
        while old.proc.poll() is None and len(answers) < 60:
            answers.append(("metrics", get(ip, METRICS, "/ready")[0]))
            answers.append(("admin", get(ip, ADMIN, "/ready", token=ADMIN_TOKEN)[0]))
            hc = c.cutover_cli("healthcheck", "--config", old.config_path)
            answers.append(("healthcheck", hc.returncode))
            time.sleep(0.05)
        assert old.proc.wait(15) == 0
        old.proc = None
        # once the old process is gone, every answer is the new one's: ready
        after = [get(ip, METRICS, "/ready")[0] for _ in range(10)]
        assert after == [200] * 10, after
    bad = [a for a in answers if a[1] not in (200, 0)]
    known_bug(not bad, f"{len(bad)} of {len(answers)} answers during the old process's drain "
                       f"were not ready: {bad[:12]}")


def test_upgrade_output_ends_when_the_command_exits(env, servers, cleanup):
    ip = OPS_IPS["pipe"]
    d = env.root / "ops-pipe"
    d.mkdir(exist_ok=True)
    old = Cutover(env, "pipe", ops_config(env, ip, drain=1, upgrade=d / "upgrade.sock"))
    cleanup.procs.append(old)
    with subreaper():
        old.start()
        p = subprocess.Popen([str(harness.resolve_cutover_bin()), "upgrade", "--config",
                              str(old.config_path)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=proc_env())
        rc = p.wait(60)
        m = None
        # what it printed (the new process's log goes to the same stderr pipe)
        out = b""
        deadline = time.monotonic() + 3
        eof = False
        while time.monotonic() < deadline:
            ready_, _, _ = select.select([p.stdout], [], [], 0.2)
            if ready_:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    eof = True
                    break
                out += chunk
        m = re.search(rb"upgraded: pid (\d+) serves", out)
        if m:
            cleanup.pids.append(int(m[1]))
        assert rc == 0 and m, out
        p.stdout.close()
        p.stderr.close()
        old.proc.wait(15)
        old.proc = None
    known_bug(eof, "stdout of `cutover upgrade` still open 3 s after it exited: the new "
                   f"process (pid {int(m[1])}) holds it")


# --------------------------------------------------------------------------
# 2. systemd notify
# --------------------------------------------------------------------------


class NotifySocket:
    """A fake systemd notification socket: a Unix datagram socket that records every
    datagram with the sender's pid (SO_PASSCRED) and the time it arrived."""

    def __init__(self, path):
        self.path = str(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.lock = threading.Lock()
        self.messages = []  # (monotonic time, pid, {KEY: value}, raw text)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        space = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self.stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, space)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", blob[:12])[0]
            text = data.decode("utf-8", "replace")
            fields = dict(l.split("=", 1) for l in text.splitlines() if "=" in l)
            with self.lock:
                self.messages.append((time.monotonic(), pid, fields, text))

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def since(self, n=0):
        with self.lock:
            return list(self.messages[n:])

    def count(self):
        with self.lock:
            return len(self.messages)

    def wait(self, key, value="1", after=0, timeout=10.0):
        """The first message after index ``after`` with KEY=value; returns (index, msg)."""
        def find():
            for i, m in enumerate(self.since(after)):
                if m[2].get(key) == value:
                    return after + i, m
            return None
        return harness.wait_until(find, timeout, interval=0.02,
                                  what=f"{key}={value} on the notify socket; got {self.texts(after)}")

    def texts(self, after=0):
        return [m[3].replace("\n", " ").strip() for m in self.since(after)]


@pytest.fixture
def notify_socket(env):
    d = env.root / "ops-notify"
    d.mkdir(exist_ok=True)
    s = NotifySocket(d / "notify.sock")
    yield s
    s.close()


def monotonic_usec():
    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6


WRAPPED = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$0" run --config "$1"', "{bin}", "{config}"]


def test_systemd_notify_ready_watchdog_reload_and_stopping(env, servers, notify_socket, cleanup):
    ip = OPS_IPS["notify"]
    ns = notify_socket
    cfg = ops_config(env, ip, drain=1)
    p = Cutover(env, "notify", cfg, argv=WRAPPED,
                extra_env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": 2000000})
    cleanup.procs.append(p)
    p.start()
    pid = p.pid
    assert "cutover" in open(f"/proc/{pid}/cmdline").read(), "the wrapper did not exec cutover"

    i_ready, (t_ready, sender, fields, _) = ns.wait("READY")
    assert sender == pid, f"READY=1 from pid {sender}, cutover is {pid}"
    assert fields.get("STATUS"), f"READY=1 without STATUS=: {ns.texts()}"
    before = ns.texts()[:i_ready]
    assert not any("READY=1" in t for t in before), before
    # READY comes after every listener is bound (and the first health round)
    log = p.log_text()
    for l in cfg["listeners"]:
        assert re.search(rf"listening.*listener={re.escape(l['name'])}\b", log), l["name"]
    assert all(harness.port_open(ip, port) for port in (IMAP, IMAPS, PLAIN))

    # the watchdog: WATCHDOG=1 every WatchdogSec/3 (2 s / 3), from the proxy itself
    time.sleep(3.0)
    pings = [(t, s) for t, s, f, _ in ns.since() if f.get("WATCHDOG") == "1"]
    assert all(s == pid for _, s in pings), pings
    recent = [t for t, _ in pings if t >= t_ready]
    assert len(recent) >= 3, f"{len(recent)} WATCHDOG=1 pings in 3 s: {ns.texts()}"
    gaps = sorted(b - a for a, b in zip(recent, recent[1:]))
    median = gaps[len(gaps) // 2]
    assert 0.4 <= median <= 1.0, f"watchdog pings every {median:.2f}s (want ~0.67 s): {gaps}"
    assert gaps[-1] < 2.0, f"a watchdog gap of {gaps[-1]:.2f}s would trip WatchdogSec=2s"

    # SIGHUP: RELOADING=1 with MONOTONIC_USEC=, then READY=1
    n = ns.count()
    now_us = monotonic_usec()
    p.proc.send_signal(signal.SIGHUP)
    i_rel, (_, sender, fields, text) = ns.wait("RELOADING", after=n, timeout=10)
    assert sender == pid
    assert "MONOTONIC_USEC" in fields, f"RELOADING=1 without MONOTONIC_USEC=: {text!r}"
    usec = int(fields["MONOTONIC_USEC"])
    assert now_us - 1e6 <= usec <= monotonic_usec() + 1e6, (usec, now_us)
    _, (_, sender, fields, _) = ns.wait("READY", after=i_rel + 1, timeout=10)
    assert sender == pid and fields.get("STATUS"), ns.texts(n)

    # SIGTERM: STOPPING=1
    n = ns.count()
    p.proc.send_signal(signal.SIGTERM)
    _, (_, sender, _, _) = ns.wait("STOPPING", after=n, timeout=5)
    assert sender == pid
    assert p.proc.wait(15) == 0
    p.wait_stopped()
    print(f"\nnotify: {len(recent)} watchdog pings, median gap {median:.2f}s; messages: {ns.texts()[:4]}")


def test_systemd_notify_failed_reload_still_answers_reloading_then_ready(
        env, servers, notify_socket, cleanup):
    ip = OPS_IPS["notify"]
    ns = notify_socket
    cfg = ops_config(env, ip, drain=1)
    p = Cutover(env, "notify-bad-reload", cfg, argv=WRAPPED,
                extra_env={"NOTIFY_SOCKET": ns.path})
    cleanup.procs.append(p)
    p.start()
    ns.wait("READY")
    p.write_config("listeners: [ {name: imap\n")  # not YAML
    n = ns.count()
    off = p.log_path.stat().st_size
    p.proc.send_signal(signal.SIGHUP)
    harness.wait_until(lambda: "reload failed" in p.log_path.read_bytes()[off:].decode(errors="replace"),
                       10, what="the failed reload in the log")
    time.sleep(0.5)
    got = ns.texts(n)
    assert p.proc.poll() is None
    known_bug(any("RELOADING=1" in t for t in got) and any("READY=1" in t for t in got),
              f"after a failed SIGHUP reload the notify socket got {got}")


def test_upgrade_under_notify_does_not_tell_systemd_the_service_stops(
        env, servers, notify_socket, cleanup):
    ip = OPS_IPS["notify-upgrade"]
    ns = notify_socket
    d = env.root / "ops-notify-upgrade"
    d.mkdir(exist_ok=True)
    old = Cutover(env, "notify-upgrade", ops_config(env, ip, drain=1, upgrade=d / "upgrade.sock"),
                  extra_env={"NOTIFY_SOCKET": ns.path})
    cleanup.procs.append(old)
    with subreaper():
        old.start()
        ns.wait("READY")
        n = ns.count()
        # as `ExecReload=cutover upgrade` would run: NOTIFY_SOCKET in its environment
        rc, out, new_pid, _ = cutover_upgrade(old.config_path, d / "upgrade.log",
                                              env=proc_env(NOTIFY_SOCKET=ns.path))
        if new_pid:
            cleanup.pids.append(new_pid)
        assert rc == 0 and new_pid, out
        assert old.proc.wait(15) == 0
        old.proc = None
        time.sleep(0.3)
    msgs = ns.since(n)
    mainpid = [m for m in msgs if m[2].get("MAINPID") == str(new_pid)]
    assert mainpid, f"no MAINPID={new_pid}: {ns.texts(n)}"
    stopping = [(pid, text.strip()) for _, pid, f, text in msgs if f.get("STOPPING") == "1"]
    known_bug(not stopping, f"STOPPING=1 sent during an upgrade (old pid {old_pid_of(msgs, new_pid)}): "
                            f"{stopping}; all: {ns.texts(n)}")


def old_pid_of(msgs, new_pid):
    return sorted({pid for _, pid, _, _ in msgs if pid != new_pid})


# --------------------------------------------------------------------------
# 3. socket activation
# --------------------------------------------------------------------------


def test_socket_activation_serves_on_the_inherited_socket_and_binds_nothing(env, servers, cleanup):
    ip = OPS_IPS["activate"]
    ctx = env.ssl_context()
    activated, configured = 11150, IMAP  # systemd's socket / the listener's own address
    cfg = ops_config(env, ip, drain=1)
    cfg["listeners"] = [l for l in cfg["listeners"] if l["name"] == "imap"]
    assert not harness.port_open(ip, configured)
    p = Cutover(env, "activate", cfg, ports=[(ip, activated)], wait_ready=False, argv=[
        ACTIVATE, "-l", f"{ip}:{activated}", "--fdname=imap", "{bin}", "run", "--config", "{config}"])
    cleanup.procs.append(p)
    p.start()  # systemd-socket-activate listens; cutover starts at the first connection
    r = imap_open(ip, activated, "starttls", ctx)
    cleanup.socks.append(r)
    assert r.greeting.startswith(b"* OK"), r.greeting
    assert imap_login_subject(r, "bob") == "green"
    r.close()
    wait_ready(ip, METRICS)
    assert "cutover" in open(f"/proc/{p.pid}/cmdline").read()
    assert not harness.port_open(ip, configured), f"{ip}:{configured} (configured) was bound too"
    log = p.log_text()
    assert re.search(rf"listening.*listener=imap\b.*addr={re.escape(ip)}:{activated}\b", log), log[-3000:]
    assert not re.search(rf"listening.*addr={re.escape(ip)}:{configured}\b", log), log[-3000:]
    # a second login, and SIGTERM ends it cleanly
    r = imap_open(ip, activated, "starttls", ctx)
    cleanup.socks.append(r)
    assert imap_login_subject(r, "joeuser") == "new"
    r.close()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    p.wait_stopped()


def test_socket_activation_with_another_name_binds_the_configured_address(env, servers, cleanup):
    ip = OPS_IPS["activate"]
    ctx = env.ssl_context()
    activated = 11151
    cfg = ops_config(env, ip, drain=1)
    cfg["listeners"] = [l for l in cfg["listeners"] if l["name"] == "imap"]
    p = Cutover(env, "activate-other", cfg, ports=[(ip, activated)], wait_ready=False, argv=[
        ACTIVATE, "-l", f"{ip}:{activated}", "--fdname=pop3", "{bin}", "run", "--config", "{config}"])
    cleanup.procs.append(p)
    p.start()
    with contextlib.suppress(OSError):  # the trigger: the proxy closes that socket
        socket.create_connection((ip, activated), timeout=2).close()
    wait_ready(ip, METRICS)
    p.ports = [(ip, IMAP)]
    r = imap_open(ip, IMAP, "starttls", ctx)
    cleanup.socks.append(r)
    assert imap_login_subject(r, "carol") == "green"
    r.close()
    log = p.log_text()
    assert re.search(r"inherited socket names no listener.*pop3|listener=pop3.*names no listener", log), log[-3000:]
    harness.wait_until(lambda: not harness.port_open(ip, activated), 5,
                       what="the unclaimed activated socket to be closed")


# --------------------------------------------------------------------------
# 4. healthcheck
# --------------------------------------------------------------------------


def test_healthcheck_ready_not_running_and_draining(env, servers, cleanup):
    ip = OPS_IPS["health"]
    ctx = env.ssl_context()
    d = env.root / "ops-health"
    d.mkdir(exist_ok=True)
    token = d / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    cfg = ops_config(env, ip, drain=3, admin=token)
    p = Cutover(env, "health", cfg)
    cleanup.procs.append(p)
    # an admin-only configuration for the same proxy: healthcheck asks the admin endpoint
    admin_only = dict(cfg)
    admin_only.pop("metrics")
    admin_cfg = d / "admin-only.yaml"
    admin_cfg.write_text(harness.to_yaml(admin_only) + "\n")

    hc = c.cutover_cli("healthcheck", "--config", p.config_path)
    assert hc.returncode == 1 and "not ready" in hc.out, (hc.returncode, hc.out, hc.err)
    assert re.search(r"refused", hc.out, re.I), hc.out

    p.start()
    hc = c.cutover_cli("healthcheck", "--config", p.config_path)
    assert (hc.returncode, hc.out) == (0, "ready\n"), (hc.returncode, hc.out, hc.err)
    hc = c.cutover_cli("healthcheck", "--config", admin_cfg)
    assert (hc.returncode, hc.out) == (0, "ready\n"), (hc.returncode, hc.out, hc.err)
    assert get(ip, METRICS, "/ready") == (200, "ready\n")
    assert get(ip, ADMIN, "/ready")[0] == 401, "admin /ready without the token"
    status, body = get(ip, ADMIN, "/ready", token=ADMIN_TOKEN)
    assert status == 200 and '"ready":true' in body, (status, body)

    # SIGTERM with an IDLE session: the proxy drains (3 s) and is not ready meanwhile
    idle = open_idle(ip, IMAPS, "imaps", ctx, "alice")
    cleanup.socks.append(idle)
    p.proc.send_signal(signal.SIGTERM)
    seen = harness.wait_until(lambda: (lambda s: s if s[0] == 503 else None)(get(ip, METRICS, "/ready")),
                              2.5, interval=0.02, what="GET /ready = 503 during the drain")
    assert seen[1] == "not ready\n"
    assert p.proc.poll() is None, "the proxy exited before the drain timeout"
    hc = c.cutover_cli("healthcheck", "--config", p.config_path)
    drained = p.proc.poll() is None
    assert hc.returncode == 1 and "not ready" in hc.out, (hc.returncode, hc.out, hc.err)
    assert not drained or "503" in hc.out, hc.out
    hca = c.cutover_cli("healthcheck", "--config", admin_cfg)
    assert hca.returncode == 1, (hca.out, hca.err)
    assert get(ip, ADMIN, "/ready", token=ADMIN_TOKEN)[0] in (503, None)
    assert p.proc.wait(15) == 0
    p.wait_stopped()
    hc = c.cutover_cli("healthcheck", "--config", p.config_path)
    assert hc.returncode == 1 and "not ready" in hc.out, (hc.returncode, hc.out, hc.err)


# --------------------------------------------------------------------------
# 5. config dump, 6. --version
# --------------------------------------------------------------------------


def test_config_dump_shows_defaults_and_hides_secrets(env, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    ip = OPS_IPS["dump"]  # nothing is started: the addresses are only validated
    cfg = ops_config(env, ip, admin=token, upgrade=tmp_path / "upgrade.sock")
    cfg["state"] = {"redis": {"url": f"redis://:{REDIS_PASSWORD}@{ip}:6379/0"}}
    cfg["lookups"] = {"people": {"redis": {"url": f"redis://app:{REDIS_PASSWORD}x@{ip}:6379/1",
                                           "key": "route:{user}"}}}
    cfg["routes"].insert(0, {"lookup": "people"})
    path = tmp_path / "routes.yaml"
    path.write_text(harness.to_yaml(cfg) + "\n")
    chk = c.cutover_cli("check", "--config", path)
    assert chk.returncode == 0, (chk.out, chk.err)
    dump = c.cutover_cli("config", "dump", "--config", path)
    assert dump.returncode == 0, (dump.out, dump.err)
    text = dump.out + dump.err
    for default in ("preauth_timeout: 1m", "max_sasl_token: 32768", "drain_timeout: 4s",
                    str(tmp_path / "upgrade.sock"), str(token)):
        assert default in text, f"{default!r} not in the dump:\n{text}"
    for secret in (ADMIN_TOKEN, ADMIN_TOKEN[:16], REDIS_PASSWORD, "app:"):
        assert secret not in text, f"{secret!r} in the dump:\n{text}"
    assert f"{ip}:6379" in text, text  # where it points stays visible


def test_version_names_the_version_commit_and_tls(env):
    cp = c.cutover_cli("--version")
    assert cp.returncode == 0, cp.err
    m = re.fullmatch(r"cutover (\d+\.\d+\.\d+\S*) \(commit ([0-9a-f]{7,40}|unknown); TLS: (.+)\)\n", cp.out)
    assert m, cp.out
    assert "rustls" in m[3], cp.out
    assert m[2] != "unknown", cp.out
    known = subprocess.run(["git", "-C", str(harness.REPO), "cat-file", "-e", f"{m[2]}^{{commit}}"],
                           capture_output=True)
    assert known.returncode == 0, f"commit {m[2]} is not a commit of this repository"


def test_logs_for_the_journal_carry_a_priority_and_no_time_of_their_own(env, tmp_path):
    """With standard error on the journal (JOURNAL_STREAM names it), each line starts with
    its syslog priority and carries no timestamp (the journal adds one); otherwise lines
    keep their time and level."""
    ip = OPS_IPS["journal"]
    path = tmp_path / "routes.yaml"
    path.write_text(harness.to_yaml(ops_config(env, ip)) + "\n")
    log = tmp_path / "stderr.log"
    for journal in (True, False):
        with open(log, "wb") as err:
            st = os.fstat(err.fileno())
            envv = dict(os.environ)
            envv.pop("JOURNAL_STREAM", None)
            if journal:
                envv["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            p = subprocess.Popen([str(harness.resolve_cutover_bin()), "run", "--config", str(path)],
                                 stdout=subprocess.DEVNULL, stderr=err, env=envv)
            try:
                c.wait_for(lambda: "ready" in log.read_text(errors="replace"), 20,
                           what="cutover ready")
            finally:
                p.send_signal(signal.SIGTERM)
                p.wait(20)
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        assert lines, "no log lines"
        if journal:
            assert all(re.match(r"<[3467]>", l) for l in lines), lines[:5]
            assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:", l) for l in lines), lines[:5]
            assert any(l.startswith("<6>") and "listening" in l for l in lines), lines[:5]
        else:
            assert all(re.match(r"\d{4}-\d\d-\d\dT", l) for l in lines), lines[:5]

"""Backend faults end to end (issue 6 item 5) and the graceful drain (item 4): the real
cutover binary in front of real Dovecot, with faults made on loopback only.

* refused:      green's IMAP stopped (its port answers RST)
* blackholed:   a listener on green's address with a full accept queue (backlog 0, one
                connection queued and never accepted): the kernel drops further SYNs,
                so a connect hangs exactly like a firewall DROP (no iptables needed)
* silent:       an in-process server that accepts and never greets
* stalling:     an in-process server that greets, reads the login and never answers
* dying:        green's Dovecot SIGKILLed (master and children) under relayed sessions
* bad TLS:      the "new" pool's `ca` is a CA that did not sign new's certificate
* DNS:          an in-process DNS server (UDP+TCP, TTL 2s) that is then stopped
* SIGTERM:      drain, `* BYE`, exit 0; and a restart under load that loses nothing

Which backend served a session is proven by the seeded "hello from <host>" message.
Every helper server is stopped at the end of its test (context managers); every test
that changes the proxy's configuration gets the default one back (conftest).
"""

import base64
import contextlib
import os
import re
import selectors
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import clients as c
import harness
from harness import GREEN_IP, MAUVE_IP, METRICS_PORT, NEW_IP, PROXY_IP, PROXY_PORTS, USERS

pytestmark = pytest.mark.proxy

IMAPS = PROXY_PORTS["imaps"]
POP3S = PROXY_PORTS["pop3s"]
SUBMISSION = PROXY_PORTS["submission"]

GREEN_IMAP = f"{GREEN_IP}:143"
MAUVE_IMAP = f"{MAUVE_IP}:143"
#: loopback address of the in-process misbehaving backends (nothing else uses it)
FAKE_IP = "127.0.0.14"

#: passive health only: a failed attempt marks a server down for `down_for`, and no
#: probe touches a server behind the test's back (so what is measured is the login)
PASSIVE = {"interval": "0s", "down_for": "60s"}

FAILURES = "cutover_backend_connect_failures_total"


# --------------------------------------------------------------------------
# helpers: config, metrics, logins
# --------------------------------------------------------------------------


def config(env, legacy=None, imap_servers=None, **top):
    """The default proxy config; ``legacy`` updates pools.legacy, ``imap_servers``
    replaces pools.legacy.imap.servers, ``top`` sets top-level keys."""
    cfg = harness.proxy_config(env)
    cfg["pools"]["legacy"].update(legacy or {})
    if imap_servers is not None:
        cfg["pools"]["legacy"]["imap"]["servers"] = list(imap_servers)
    cfg.update(top)
    return cfg


def metrics():
    return c.scrape_metrics(PROXY_IP, METRICS_PORT)


def metric(name, **labels):
    return c.metric_sum(metrics(), name, **labels)


def failures(server, reason, pool="legacy", protocol="imap"):
    return metric(FAILURES, pool=pool, protocol=protocol, server=server, reason=reason)


def timed_login(env, user, timeout=c.IO_TIMEOUT):
    """Log in over imaps through the proxy; returns (host that served it, seconds the
    LOGIN command took, from sending it to the tagged OK)."""
    conn = c.imap_connect(PROXY_IP, IMAPS, "implicit", env.ssl_context(), timeout=timeout)
    try:
        t = time.monotonic()
        typ, data = conn.login(user, USERS[user])
        took = time.monotonic() - t
        assert typ == "OK", (typ, data)
        subject = c.imap_subject(conn)
    finally:
        c.imap_logout(conn)
    m = re.fullmatch(r"hello from (\w+)", subject)
    assert m, subject
    return m[1], took


def raw_login(env, user, timeout=c.IO_TIMEOUT):
    """A RawIMAP over imaps, logged in as ``user``, INBOX examined; returns (r, host)."""
    r = c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context(), timeout=timeout)
    try:
        tagged, _ = r.command("L1", f'LOGIN {user} "{USERS[user]}"')
        assert c.is_tagged_ok(tagged, "L1"), r.dump()
        tagged, _ = r.command("L2", "EXAMINE INBOX")
        assert c.is_tagged_ok(tagged, "L2"), r.dump()
        tagged, lines = r.command("L3", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert c.is_tagged_ok(tagged, "L3"), r.dump()
    except BaseException:
        r.close()
        raise
    host = next((m[1].decode() for l in lines
                 if (m := re.match(rb"Subject: hello from (\w+)", l))), None)
    assert host, r.dump()
    return r, host


def start_idle(r, tag="I1"):
    r.send(f"{tag} IDLE\r\n")
    cont = r.readline()
    assert cont.startswith(b"+"), r.dump()


def wait_closed(r, timeout):
    """Read until the proxy closes ``r``'s connection (EOF, reset or TLS EOF).
    Returns (monotonic time of the close or None if still open at the deadline,
    the bytes received meanwhile)."""
    data = bytearray(r.buf)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, bytes(data)
        r.sock.settimeout(left)
        try:
            chunk = r.sock.recv(65536)
        except TimeoutError:
            return None, bytes(data)
        except (ssl.SSLError, OSError):
            return time.monotonic(), bytes(data)
        if not chunk:
            return time.monotonic(), bytes(data)
        data += chunk


def read_line_until(r, predicate, timeout):
    """Read lines from ``r`` until one satisfies ``predicate``; (time, line) or raise."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no matching line within {timeout}s; transcript:\n{r.dump()}"
        r.sock.settimeout(left)
        line = r.readline()
        if predicate(line):
            return time.monotonic(), line


def connect_refused(port, timeout=1.0):
    try:
        with socket.create_connection((PROXY_IP, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True


def kill_hard(proc):
    """SIGKILL a ManagedProcess and all its children (Dovecot's master and its login and
    mail processes share the process group the harness gave it), then reap it.
    The autouse fixture starts it again after the test."""
    assert proc.running, proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.stop()  # reaps, waits for the children to go and the ports to close


# --------------------------------------------------------------------------
# misbehaving servers (in-process, loopback only)
# --------------------------------------------------------------------------


class FakeBackend:
    """A TCP server on ``ip`` (ephemeral port) that accepts and then says nothing
    (``greeting=None``) or sends ``greeting`` and never answers anything after it.
    Records every byte received. Use as a context manager: the listener and every
    accepted connection are closed on exit."""

    def __init__(self, ip, greeting=None):
        self.greeting = greeting
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.address = f"{ip}:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.received = bytearray()
        self.conns = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.thread = threading.Thread(target=self._run, name=f"fake-{self.address}", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(5)
        for s in self.conns:
            s.close()
        self.sock.close()
        self.sel.close()

    def _run(self):
        while not self.stopping.is_set():
            for key, _ in self.sel.select(0.1):
                if key.data is None:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    with self.lock:
                        self.accepted += 1
                    self.conns.append(conn)
                    if self.greeting is not None:
                        conn.sendall(self.greeting)
                    conn.setblocking(False)
                    self.sel.register(conn, selectors.EVENT_READ, "conn")
                else:
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self.sel.unregister(key.fileobj)
                        continue
                    with self.lock:
                        self.received += data

    def commands(self):
        with self.lock:
            return [l for l in bytes(self.received).split(b"\r\n") if l]


class Blackhole:
    """``ip:port`` dropping SYNs, like a firewall DROP rule, without touching the host
    firewall: a listener with backlog 0 whose accept queue is filled by connections
    that are never accepted; the kernel then drops every further SYN (a connect hangs
    until its own timeout). Closed (port free again) on exit."""

    def __init__(self, ip, port):
        self.addr = (ip, port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(self.addr)
        self.listener.listen(0)
        self.fillers = []

    def __enter__(self):
        # fill the accept queue: connect until a connect no longer completes
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.5)
            try:
                s.connect(self.addr)
            except TimeoutError:
                s.close()
                break
            self.fillers.append(s)
        else:
            self.__exit__()
            raise AssertionError(f"accept queue of {self.addr} never filled")
        assert self.fillers, "not even one connection was queued"
        return self

    def __exit__(self, *exc):
        for s in self.fillers:
            s.close()
        self.listener.close()

    def connect_times_out(self, timeout=1.0):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.addr)
        except TimeoutError:
            return True
        except OSError:
            return False
        finally:
            s.close()
        return False


class DnsServer:
    """A tiny authoritative DNS server on ``ip`` (UDP and TCP on the same ephemeral
    port): A queries for a name in ``records`` ({name: ipv4}) get that address with
    ``ttl``; other types for those names get an empty NOERROR; other names NXDOMAIN.
    ``servfail()`` makes it answer every query with SERVFAIL (the name stops resolving,
    and lookups fail at once); ``stop()`` (also on exit) closes both sockets (lookups
    then fail only when the resolver's timeouts run out)."""

    def __init__(self, records, ttl, ip="127.0.0.1"):
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.ttl = ttl
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((ip, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((ip, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        tcp.listen(16)
        self.udp, self.tcp = udp, tcp
        self.address = f"{ip}:{port}"
        self.lock = threading.Lock()
        #: monotonic time of the last A answer with an address, and how many were given
        self.last_answer = None
        self.answers = 0
        self.failing = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dns", daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def servfail(self):
        with self.lock:
            self.failing = True

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.udp.close()
        self.tcp.close()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self.tcp, selectors.EVENT_READ, "tcp")
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(0.1):
                    if key.data == "udp":
                        q, peer = self.udp.recvfrom(4096)
                        a = self.answer(q)
                        if a:
                            self.udp.sendto(a, peer)
                    else:
                        conn, _ = self.tcp.accept()
                        with conn:
                            conn.settimeout(2)
                            with contextlib.suppress(OSError, struct.error):
                                n = struct.unpack("!H", self._recv_exact(conn, 2))[0]
                                a = self.answer(self._recv_exact(conn, n))
                                if a:
                                    conn.sendall(struct.pack("!H", len(a)) + a)
        finally:
            sel.close()

    @staticmethod
    def _recv_exact(conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise OSError("short read")
            buf += chunk
        return buf

    def answer(self, q):
        if len(q) < 12:
            return None
        qid, flags, qdcount = struct.unpack("!3H", q[:6])
        if flags & 0x8000 or qdcount != 1:
            return None
        i, labels = 12, []
        while i < len(q) and q[i] != 0:
            n = q[i]
            if n & 0xC0:
                return None
            labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace").lower())
            i += 1 + n
        i += 1
        if i + 4 > len(q):
            return None
        qtype, _qclass = struct.unpack("!HH", q[i:i + 4])
        question = q[12:i + 4]
        name = ".".join(labels)
        answers = []
        with self.lock:
            failing = self.failing
        if failing:
            rcode = 2  # SERVFAIL
        elif name in self.records:
            rcode = 0
            if qtype == 1:  # A
                answers.append(struct.pack("!HHHIH", 0xC00C, 1, 1, self.ttl, 4)
                               + socket.inet_aton(self.records[name]))
                with self.lock:
                    self.last_answer = time.monotonic()
                    self.answers += 1
        else:
            rcode = 3  # NXDOMAIN
        rflags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode  # QR AA RD RA
        return struct.pack("!6H", qid, rflags, 1, len(answers), 0, 0) + question + b"".join(answers)


# --------------------------------------------------------------------------
# 1. refused
# --------------------------------------------------------------------------


def test_refused_backend_fails_over_at_once_and_is_marked_down(env, proxy, servers):
    """green's IMAP stopped: its port answers RST. bob lands on mauve without waiting
    for any timeout (connect_timeout is 5s here, so a slow path would show), the
    failure is counted as reason="refused" and green is reported down."""
    proxy.reconfigure(config(env, legacy={"connect_timeout": "5s", "health": PASSIVE}))
    assert timed_login(env, "bob")[0] == "green"
    assert metric("cutover_backend_up", pool="legacy", protocol="imap", server=GREEN_IMAP) == 1
    before = failures(GREEN_IMAP, "refused")
    with servers.green.imap.stopped():
        host, took = timed_login(env, "bob")
        assert host == "mauve"
        assert took < 2.5, f"a refused backend must fail over at once, the login took {took:.2f}s"
        m = metrics()
        assert c.metric_sum(m, FAILURES, pool="legacy", protocol="imap", server=GREEN_IMAP,
                            reason="refused") >= before + 1, m
        assert c.metric_sum(m, "cutover_backend_up", pool="legacy", protocol="imap",
                            server=GREEN_IMAP) == 0, m
        assert c.metric_sum(m, "cutover_backend_up", pool="legacy", protocol="imap",
                            server=MAUVE_IMAP) == 1, m


# --------------------------------------------------------------------------
# 2. blackholed
# --------------------------------------------------------------------------


def test_blackholed_backend_costs_one_connect_timeout_then_is_skipped(env, proxy, servers):
    """SYNs to green's IMAP port are dropped: the first login waits connect_timeout (1s)
    and lands on mauve; green is then marked down (passive health), so the next login
    does not try it at all."""
    proxy.reconfigure(config(env, legacy={"connect_timeout": "1s", "login_timeout": "10s",
                                          "health": PASSIVE}))
    with servers.green.imap.stopped(), Blackhole(GREEN_IP, 143) as bh:
        assert bh.connect_times_out(1.0), "the blackhole does not drop SYNs"
        before = failures(GREEN_IMAP, "timeout")
        host, took = timed_login(env, "bob")
        assert host == "mauve"
        assert 0.9 <= took <= 6.0, f"first login took {took:.2f}s; expected about connect_timeout (1s)"
        assert failures(GREEN_IMAP, "timeout") == before + 1
        assert metric("cutover_backend_up", pool="legacy", protocol="imap", server=GREEN_IMAP) == 0

        host, took2 = timed_login(env, "bob")
        assert host == "mauve"
        assert failures(GREEN_IMAP, "timeout") == before + 1, "green was tried again although marked down"
        assert took2 < 0.9, f"second login took {took2:.2f}s: green is down and must be skipped"


# --------------------------------------------------------------------------
# 3./4. accepts but never greets / greets then stalls
# --------------------------------------------------------------------------

STALL_GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n"


@pytest.mark.parametrize("greeting", [None, STALL_GREETING], ids=["silent", "greets-then-stalls"])
def test_stalled_backend_is_failed_over_after_login_timeout(env, proxy, greeting):
    """The legacy pool is [a server that stalls, mauve] with login_timeout 2s: bob lands
    on mauve after about 2s, the failure is reason="timeout", the stalled server is
    marked down and the next login skips it."""
    with FakeBackend(FAKE_IP, greeting) as fake:
        proxy.reconfigure(config(env, legacy={"connect_timeout": "1s", "login_timeout": "2s",
                                              "health": PASSIVE},
                                 imap_servers=[fake.address, MAUVE_IMAP]))
        host, took = timed_login(env, "bob")
        assert host == "mauve"
        assert fake.accepted == 1, "the stalled server was not tried first"
        assert 1.8 <= took <= 8.0, f"login took {took:.2f}s; expected about login_timeout (2s)"
        if greeting is None:
            assert fake.commands() == [], "the proxy spoke before any greeting"
        else:
            # it got past the greeting and sent its login, then waited in vain
            cmds = fake.commands()
            assert cmds and re.match(rb"^\S+ (LOGIN|AUTHENTICATE|CAPABILITY|ID)\b", cmds[0], re.I), \
                [x[:24] for x in cmds[:1]]
        m = metrics()
        assert c.metric_sum(m, FAILURES, pool="legacy", protocol="imap", server=fake.address,
                            reason="timeout") == 1, m
        assert c.metric_sum(m, "cutover_backend_up", pool="legacy", protocol="imap",
                            server=fake.address) == 0, m
        host, took2 = timed_login(env, "bob")
        assert host == "mauve" and fake.accepted == 1, "a down server was tried again"
        assert took2 < 1.8, f"second login took {took2:.2f}s although the stalled server is down"


# --------------------------------------------------------------------------
# 5. dies mid-session
# --------------------------------------------------------------------------


def sessions_active():
    return metric("cutover_sessions_active", pool="legacy", protocol="imap")


def test_backend_killed_under_an_idle_session_closes_it_promptly(env, proxy, servers):
    """bob idles on green through the proxy; green's Dovecot is SIGKILLed: the client's
    connection closes within a few seconds (one session is never delayed by the spread,
    default 10s) and the proxy frees the session."""
    proxy.reconfigure(config(env))  # fresh health state: green is up
    base = sessions_active()
    r, host = raw_login(env, "bob")
    with r:
        assert host == "green"
        start_idle(r)
        c.wait_for(lambda: sessions_active() == base + 1, 10, what="the session to be counted")
        t = time.monotonic()
        kill_hard(servers.green.imap)
        closed, data = wait_closed(r, 15)
        assert closed is not None, f"the client's connection is still open; got {data!r}"
        assert closed - t < 5.0, f"the close took {closed - t:.2f}s after green died"
    c.wait_for(lambda: sessions_active() == base, 10, what="cutover_sessions_active back to its base")
    servers.green.imap.start()  # before the default config is restored: no probe sees it down


SPREAD = 3.0  # seconds: pools.legacy.disconnect_spread in the test below
MANY = 20


def test_backend_killed_under_many_sessions_spreads_the_closes(env, proxy, servers):
    """20 sessions of bob and carol idle on green; green dies. With disconnect_spread 3s
    the clients are not all closed at once: the first are prompt, the rest spread over
    the window, all within it plus a margin. Then everyone reconnects, to mauve."""
    proxy.reconfigure(config(env, legacy={"disconnect_spread": f"{SPREAD:g}s"}))
    base = sessions_active()
    sessions = []
    try:
        for i in range(MANY):
            user = ("bob", "carol")[i % 2]
            r, host = raw_login(env, user)
            sessions.append(r)
            assert host == "green", f"{user} landed on {host}"
            start_idle(r)
        c.wait_for(lambda: sessions_active() == base + MANY, 10, what=f"{MANY} sessions counted")
        closes = [None] * MANY

        def watch(i):
            closes[i] = wait_closed(sessions[i], SPREAD + 10)[0]
        watchers = [threading.Thread(target=watch, args=(i,)) for i in range(MANY)]
        for w in watchers:
            w.start()
        t = time.monotonic()
        kill_hard(servers.green.imap)
        for w in watchers:
            w.join(SPREAD + 15)
        assert all(x is not None for x in closes), f"some clients were never closed: {closes}"
        delays = sorted(x - t for x in closes)
        shown = ", ".join(f"{d:.2f}" for d in delays)
        assert delays[0] < 1.5, f"the first closes must be prompt: {shown}"
        assert delays[-1] <= SPREAD + 3.0, f"closes must end within the spread (+margin): {shown}"
        later = [d for d in delays if d >= 1.0]
        assert len(later) >= 5, f"closes not spread over {SPREAD}s (all at once?): {shown}"
        assert delays[-1] - delays[0] >= 1.0, f"closes not spread: {shown}"
    finally:
        for r in sessions:
            r.close()
    c.wait_for(lambda: sessions_active() == base, 10, what="every session freed")
    # everyone can come back, on mauve
    for i in range(MANY):
        user = ("bob", "carol")[i % 2]
        r, host = raw_login(env, user)
        r.close()
        assert host == "mauve", f"{user} reconnected to {host}"
    servers.green.imap.start()  # before the default config is restored: no probe sees it down


# --------------------------------------------------------------------------
# 6. backend certificate not trusted
# --------------------------------------------------------------------------


def make_other_ca(directory):
    """A self-signed CA that signed nothing the backends present."""
    key, cert = directory / "other-ca-key.pem", directory / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                    "-subj", "/CN=cutover-e2e unrelated CA",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True, timeout=30)
    cert.chmod(0o644)
    return cert


def test_untrusted_backend_certificate_fails_closed(env, proxy, servers, tmp_path):
    """pools.new.*.ca points at a CA that did not sign new's certificate: joeuser gets a
    temporary failure in every protocol, no credentials reach new (its Dovecot logs no
    login and no auth attempt for joeuser), the proxy logs the TLS error, and the
    failures are counted as reason="tls"."""
    other = make_other_ca(tmp_path)
    cfg = config(env)
    for proto in ("imap", "pop3", "smtp"):
        cfg["pools"]["new"][proto]["ca"] = str(other)
    cfg["pools"]["new"]["health"] = PASSIVE  # only the logins below touch new
    proxy.reconfigure(cfg)
    off = proxy.log_size()
    dovecots = {"imap": servers.new.imap, "pop3": servers.new.pop3, "smtp": servers.new.submission}
    log_offsets = {k: d.dovecot_log.stat().st_size if d.dovecot_log.exists() else 0
                   for k, d in dovecots.items()}
    user, pw = "joeuser", USERS["joeuser"]
    ctx = env.ssl_context()

    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=ctx) as r:
        tagged, _ = r.command("a1", f'LOGIN {user} "{pw}"')
        assert tagged.startswith(b"a1 NO [UNAVAILABLE]"), r.dump()

    p = c.pop3_connect(PROXY_IP, POP3S, "implicit", ctx)
    try:
        p.user(user)
        with pytest.raises(c.poplib.error_proto) as e:
            p.pass_(pw)
        assert e.value.args[0].startswith(b"-ERR [SYS/TEMP]"), e.value.args
    finally:
        p.close()

    s = smtplib.SMTP(PROXY_IP, SUBMISSION, timeout=c.IO_TIMEOUT)
    try:
        s.starttls(context=ctx)
        s.ehlo("client.e2e.test")
        blob = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode()).decode()
        code, resp = s.docmd("AUTH", "PLAIN " + blob)
        assert code == 454 and resp.startswith(b"4.7.0"), (code, resp)
    finally:
        s.close()

    m = metrics()
    for proto, port in (("imap", 143), ("pop3", 110), ("smtp", 587)):
        assert c.metric_sum(m, FAILURES, pool="new", protocol=proto, server=f"{NEW_IP}:{port}",
                            reason="tls") >= 1, (proto, m)
    lines = proxy.wait_log(r"backend TLS handshake failed", off, count=3)
    assert any(re.search(r"UnknownIssuer|invalid peer certificate|certificate", l) for l in lines), lines
    for proto, d in dovecots.items():
        with open(d.dovecot_log, "rb") as f:
            f.seek(log_offsets[proto])
            new_lines = f.read().decode("utf-8", "replace")
        assert "joeuser" not in new_lines, f"credentials reached new's {proto}:\n{new_lines}"

    # positive control: with the right CA, the same login is logged by that Dovecot
    n = len(servers.new.imap.logins(user))
    proxy.reconfigure(proxy.default_config)
    assert timed_login(env, user)[0] == "new"
    servers.new.imap.wait_login(user, n)


# --------------------------------------------------------------------------
# 7. a DNS name that stops resolving
# --------------------------------------------------------------------------

DNS_NAME = "green.cutover.test"
DNS_TTL = 2
DNS_GRACE = 5.0


def dns_config(env, dns, **legacy):
    """Legacy IMAP servers [green.cutover.test:143, mauve], names asked of ``dns``."""
    pool = {"dns_grace": f"{DNS_GRACE:g}s", "health": PASSIVE}
    pool.update(legacy)
    return config(env, legacy=pool, imap_servers=[f"{DNS_NAME}:143", MAUVE_IMAP],
                  dns={"servers": [dns.address]})


def wait_clock(deadline):
    """Let time pass until ``deadline`` (monotonic): what is tested here is a TTL."""
    while time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def test_name_that_stops_resolving_is_used_until_ttl_plus_grace(env, proxy):
    """The legacy pool's first server is green.cutover.test:143 (A 127.0.0.11, TTL 2s)
    from a DNS server of the test's own; dns_grace 5s. When the name stops resolving
    (SERVFAIL), logins still reach green within the TTL and past it (the last good
    address, logged as such); after TTL+grace the name fails: bob lands on mauve,
    reason="resolve"."""
    server = f"{DNS_NAME}:143"
    with DnsServer({DNS_NAME: GREEN_IP}, DNS_TTL) as dns:
        proxy.reconfigure(dns_config(env, dns))
        assert timed_login(env, "bob")[0] == "green"
        assert dns.answers >= 1, "the proxy did not ask the test's DNS server"
        dns.servfail()
        answered = dns.last_answer  # the proxy's copy is valid until about answered + TTL
        off = proxy.log_size()
        assert timed_login(env, "bob")[0] == "green"  # within the TTL

        wait_clock(answered + DNS_TTL + 1.0)  # past the TTL, within the grace
        host, took = timed_login(env, "bob")
        assert time.monotonic() < answered + DNS_TTL + DNS_GRACE, \
            f"too slow ({took:.2f}s) to observe the grace period"
        assert host == "green", "past its TTL, the last good address must be used for dns_grace"
        proxy.wait_log(r"DNS lookup failed; using the last good addresses", off, timeout=5)
        assert failures(server, "resolve") == 0

        wait_clock(answered + DNS_TTL + DNS_GRACE + 1.0)  # past TTL + grace
        host, _ = timed_login(env, "bob")
        assert host == "mauve", "past TTL+grace the stale address must no longer be used"
        assert failures(server, "resolve") >= 1
        assert metric("cutover_backend_up", pool="legacy", protocol="imap", server=server) == 0


def test_name_whose_dns_server_is_gone_is_used_until_ttl_plus_grace(env, proxy):
    """As above, but the DNS server is stopped (its port closed: the resolver's UDP
    queries go unanswered). A login started past the TTL and well within the grace
    must still reach green."""
    with DnsServer({DNS_NAME: GREEN_IP}, DNS_TTL) as dns:
        # login_timeout above the resolver's timeouts, so that only the grace decides
        proxy.reconfigure(dns_config(env, dns, login_timeout="40s"))
        assert timed_login(env, "bob")[0] == "green"
        dns.stop()
        answered = dns.last_answer
        wait_clock(answered + DNS_TTL + 1.0)
        host, took = timed_login(env, "bob", timeout=45)
        assert host == "green", (f"a login started {DNS_TTL + 1.0}s after the answer (TTL {DNS_TTL}s, "
                                 f"grace {DNS_GRACE:g}s) landed on {host} after {took:.1f}s")


# --------------------------------------------------------------------------
# 8. SIGTERM: drain, and a restart under load
# --------------------------------------------------------------------------

DRAIN = 3.0


def test_sigterm_drains_then_says_bye_and_exits_0(env, proxy):
    """With a relayed IDLE session, a relayed session still working and a pre-auth
    connection open, SIGTERM: the pre-auth client gets `* BYE` at once, new connections
    are refused, the working session goes on and ends normally, the idle one gets
    `* BYE` after about drain_timeout, and the process exits 0."""
    proxy.reconfigure(config(env, shutdown={"drain_timeout": f"{DRAIN:g}s"}))
    idle, host = raw_login(env, "bob")
    busy, _ = raw_login(env, "carol")
    pre = c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context())
    try:
        assert host == "green" and pre.greeting.startswith(b"* OK"), pre.greeting
        start_idle(idle)
        t = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)

        when, line = read_line_until(pre, lambda l: l.startswith(b"* BYE"), 5)
        assert when - t < 2.0, f"pre-auth BYE after {when - t:.2f}s"
        c.wait_for(lambda: all(connect_refused(p) for p in PROXY_PORTS.values()), 3,
                   interval=0.05, what="every listener to refuse new connections")

        # a relayed session keeps working during the drain
        tagged, _ = busy.command("B1", "NOOP")
        assert c.is_tagged_ok(tagged, "B1"), busy.dump()
        tagged, _ = busy.command("B2", "LOGOUT")
        assert c.is_tagged_ok(tagged, "B2"), busy.dump()

        when, line = read_line_until(idle, lambda l: l.startswith(b"* BYE"), DRAIN + 10)
        assert DRAIN - 0.5 <= when - t <= DRAIN + 5, f"IDLE BYE after {when - t:.2f}s (drain {DRAIN}s)"
        closed, _ = wait_closed(idle, 10)
        assert closed is not None, "the connection stayed open after BYE"
        rc = proxy.proc.wait(15)
        assert rc == 0, f"exit status {rc}"
    finally:
        for r in (idle, busy, pre):
            r.close()
        proxy.wait_stopped()  # reaped: the fixture must not count this as a crash
    proxy.start()  # the fixture puts the default config back afterwards


class Load:
    """IMAP logins and SMTP submissions in a loop through the proxy. A login that got its
    tagged OK must complete (EXAMINE, FETCH, LOGOUT); a message that got 250 after DATA
    is remembered; connection failures are counted (allowed during a restart)."""

    IMAP_USERS = (("bob", "green"), ("carol", "green"), ("joeuser", "new"),
                  ("alice", "new"), ("bob", "green"), ("joeuser", "new"))
    SMTP_USERS = (("joeuser", "new"), ("bob", "green"), ("alice", "new"), ("carol", "green"))

    def __init__(self, env):
        self.env = env
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.logins_ok = 0
        self.lost_logins = []  # tagged OK, then the session failed
        self.wrong_host = []
        self.accepted = []  # (host, token) of messages answered 250 after DATA
        self.failed = {"imap": 0, "smtp": 0}
        self.threads = [threading.Thread(target=self._imap, args=u, daemon=True) for u in self.IMAP_USERS]
        self.threads += [threading.Thread(target=self._smtp, args=u, daemon=True) for u in self.SMTP_USERS]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def counts(self):
        with self.lock:
            return self.logins_ok, len(self.accepted)

    def _fail(self, proto):
        with self.lock:
            self.failed[proto] += 1
        self.stop.wait(0.05)  # pace retries while the proxy is away

    def _imap(self, user, expect):
        ctx = self.env.ssl_context()
        while not self.stop.is_set():
            try:
                r = c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=ctx)
            except (OSError, ConnectionError):
                self._fail("imap")
                continue
            with r:
                try:
                    tagged, _ = r.command("a1", f'LOGIN {user} "{USERS[user]}"')
                except (OSError, ConnectionError):
                    self._fail("imap")
                    continue
                if not c.is_tagged_ok(tagged, "a1"):
                    self._fail("imap")
                    continue
                try:
                    tagged, _ = r.command("a2", "EXAMINE INBOX")
                    assert c.is_tagged_ok(tagged, "a2")
                    tagged, lines = r.command("a3", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                    assert c.is_tagged_ok(tagged, "a3")
                    tagged, _ = r.command("a4", "LOGOUT")
                    assert c.is_tagged_ok(tagged, "a4")
                except Exception as e:  # noqa: BLE001 - recorded, asserted by the test
                    with self.lock:
                        self.lost_logins.append(f"{user}: {e!r}\n{r.dump()}")
                    continue
                with self.lock:
                    self.logins_ok += 1
                    if not any(f"hello from {expect}".encode() in l for l in lines):
                        self.wrong_host.append((user, lines))

    def _smtp(self, user, host):
        ctx = self.env.ssl_context()
        while not self.stop.is_set():
            tok = c.token("restart")
            try:
                s = smtplib.SMTP(PROXY_IP, SUBMISSION, timeout=c.IO_TIMEOUT)
            except OSError:
                self._fail("smtp")
                continue
            try:
                s.starttls(context=ctx)
                s.ehlo("client.e2e.test")
                s.login(user, USERS[user])
                s.mail(f"{user}@example.net")
                s.rcpt("x@example.net")
                code, _ = s.data(f"Subject: {tok}\r\n\r\nrestart under load {tok}\r\n".encode())
                if code == 250:
                    with self.lock:
                        self.accepted.append((host, tok))
                else:
                    self._fail("smtp")
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    s.quit()
            except (smtplib.SMTPException, OSError):
                self._fail("smtp")
            finally:
                s.close()


RESTARTS = 3
#: completed logins and accepted messages wanted before each restart and after the last
LOAD_STEP = (40, 10)


def test_restart_under_load_loses_no_login_and_no_message(env, proxy, servers):
    """IMAP logins and SMTP submissions (both pools) run in a loop while the proxy is
    restarted three times (SIGTERM, exit 0, start again with the same config). Clients
    that hit the restart window may fail to connect; every login that got a tagged OK
    completes, and every message answered 250 after DATA is in its sink."""
    proxy.reconfigure(config(env, shutdown={"drain_timeout": "10s"}))
    marks = []
    with Load(env) as load:
        def progressed(since):
            n, m = load.counts()
            return n >= since[0] + LOAD_STEP[0] and m >= since[1] + LOAD_STEP[1]
        mark = (0, 0)
        for _ in range(RESTARTS):
            c.wait_for(lambda: progressed(mark), 90, what=f"load to progress past {mark}")
            before = load.counts()
            proxy.proc.send_signal(signal.SIGTERM)
            rc = proxy.proc.wait(30)
            proxy.wait_stopped()
            assert rc == 0, f"exit status {rc} on SIGTERM under load"
            mark = load.counts()
            marks.append((before, mark))
            proxy.start()
        c.wait_for(lambda: progressed(mark), 90, what=f"load to progress past {mark} after the restart")
    assert not load.lost_logins, "logins answered OK that did not complete:\n" + "\n\n".join(load.lost_logins)
    assert not load.wrong_host, load.wrong_host
    sinks = {"new": servers.new.sink, "green": servers.green.sink}
    missing = []
    for host, tok in load.accepted:
        try:
            sinks[host].wait_for(tok, timeout=10)
        except TimeoutError:
            missing.append((host, tok))
    assert not missing, f"{len(missing)} of {len(load.accepted)} accepted messages lost: {missing}"
    print(f"\nrestart under load: {load.logins_ok} logins completed, {len(load.accepted)} messages "
          f"accepted and delivered; (logins, messages) at each SIGTERM and at exit: {marks}; "
          f"failed attempts {load.failed}")

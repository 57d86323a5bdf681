"""A fleet of three cutover proxies behind HAProxy behaves like one proxy.

What runs (``fleet_servers.py``; all started here with their own config files in the
session's temp dir, and stopped at the end of the module):

* ``redis-server`` on 127.0.0.1:16379 without persistence: the fleet's shared state
  (``state.redis``);
* cutover ``proxy-a``/``-b``/``-c`` on 127.0.0.21/.22/.23, each with an IMAP (implicit
  TLS), a POP3 (STARTTLS) and a pop-before-smtp SMTP listener that REQUIRE a PROXY
  header (trusted 127.0.0.0/8), and its own metrics and admin endpoints;
* HAProxy on 127.0.0.20 in TCP mode: round-robin over the three with ``send-proxy-v2``,
  passing the TLS bytes through (it terminates nothing), connecting from 127.0.0.20;
* a Dovecot on 127.0.0.30 whose listeners take PROXY headers (``haproxy = yes``): the
  fleet's "new" pool, with ``pools.new.proxy_protocol: v2``. Legacy users go to the
  session's green/mauve as everywhere else.

Clients either go through HAProxy (no header: HAProxy writes it) or straight to one
proxy, writing the 16+12-byte PROXY v2 header themselves (with their real address, as
HAProxy would), so that a test can pick the instance. The proxies' certificate names
"localhost": clients verify that name (SNI) whatever address they connect to.

Tests, one property each:

a. the client's address (a distinct loopback source, port included) reaches Dovecot
   through both hops, and every proxy shows it, never HAProxy's;
b. a hold sent to A holds a login on B; a release sent to C lets it through;
c. a kick sent to C ends the user's IDLE sessions on A and B;
d. a POP3 login through A opens the pop-before-smtp window for SMTP on B (and C), for
   that client address only;
e. K failed logins spread round-robin over the three block the user at exactly K,
   on every proxy;
f. a PROXY header from outside ``proxy_protocol.trusted`` is refused (no greeting) and
   counted;
g. Redis SIGKILLed: logins go on, ``cutover_state_backend_up`` drops to 0 and a real
   Prometheus finds ``cutover_state_backend_up == 0`` (and the CutoverSharedStateDown
   alert pending) for every proxy; Redis back on the same port: the gauge returns to 1
   and holds span the fleet again.

Failures get the tail of every fleet process's log attached.
"""

import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import threading
import time

import pytest

import clients as c
import fleet_servers as fs
import harness
from fleet_servers import FLEET, HAPROXY_IP, KEY_PREFIX, PORTS, THROTTLE, TLS_NAME
from harness import USERS

pytestmark = pytest.mark.proxy

IMAPS = PORTS["imaps"]
POP3 = PORTS["pop3"]
SMTP = PORTS["smtp"]

#: test a's client: connects to HAProxy from this address (nobody else uses it)
CLIENT_IP = "127.0.0.77"
#: test d's POP3 client, and another address that did not log in
BRIDGE_IP = "127.0.0.78"
OTHER_IP = "127.0.0.79"
#: source of the clients that talk to one proxy directly (writing their own header)
DIRECT_IP = "127.0.0.1"
#: test f: proxy-d trusts only this network; a client there is trusted
TRUSTED_ONLY = "127.0.0.200/32"
TRUSTED_SOURCE = "127.0.0.200"

#: bound (s) for anything that crosses Redis (pub/sub, the write queue) to show up
PROPAGATION = 5.0
#: bound (s) for the fleet to see Redis again (or notice it gone): the heartbeat runs
#: every 2 s, the control channel resubscribes within ~2.5 s
REDIS_NOTICE = 10.0
#: longest acceptable login while Redis is dead (every state call is bounded by 50 ms)
DEGRADED_LOGIN_BOUND = 5.0
ALERTS = harness.REPO / "dashboards" / "alerts.yml"
K = THROTTLE["user_failures"]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


class _Diagnostics:
    """A plugin registered while the fleet runs: failures of this module's tests get the
    tail of every fleet process's log."""

    def __init__(self, fleet):
        self.fleet = fleet

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        if rep.when in ("setup", "call") and rep.failed and item.module.__name__ == __name__:
            rep.sections.append(("fleet logs (tails)", self.fleet.diagnostics(40)))


def subscribed_count(p):
    return p.log_text().count("subscribed to the control channel")


def alive_key(p):
    return f"{KEY_PREFIX}{{fleet}}:alive:{p.instance}"


def wait_fleet_ready(fleet, subscribed_before=None, timeout=REDIS_NOTICE):
    """Bounded wait until every proxy says the store answers (gauge 1), has (re)joined
    the control channel (one more 'subscribed' log line than ``subscribed_before``) and
    has announced itself with a heartbeat (its ``alive`` key). The last one matters:
    a proxy's FIRST successful heartbeat also deletes its session list in Redis
    ("a restarted proxy starts with no sessions"), and it may come up to 2 s after the
    gauge turned 1, wiping the listing of sessions opened in between (see README)."""
    for p in fleet.proxies.values():
        c.wait_for(lambda: state_up(p) == 1, timeout, interval=0.1,
                   what=f"cutover_state_backend_up == 1 on {p.instance}")
        n = (subscribed_before or {}).get(p.instance, 0)
        c.wait_for(lambda: subscribed_count(p) > n, timeout, interval=0.1,
                   what=f"{p.instance} to subscribe to the control channel")
        c.wait_for(lambda: fleet.redis.cli("EXISTS", alive_key(p)) == "1", timeout,
                   interval=0.1, what=f"{p.instance}'s heartbeat ({alive_key(p)})")


@pytest.fixture(scope="module")
def fleet(request, env, servers):
    binary = harness.resolve_cutover_bin()
    if not binary.exists():
        pytest.fail(f"cutover binary missing: {binary} does not exist (set CUTOVER_BIN)",
                    pytrace=False)
    f = fs.Fleet(env, binary)
    plugin = _Diagnostics(f)
    request.config.pluginmanager.register(plugin, "cutover-fleet-diagnostics")
    try:
        try:
            f.start()
            wait_fleet_ready(f)
        except Exception as e:
            pytest.fail(f"the fleet did not start: {e}\n{f.diagnostics(30)}", pytrace=False)
        yield f
    finally:
        request.config.pluginmanager.unregister(plugin)
        f.stop()


@pytest.fixture(autouse=True)
def _fleet_restore(fleet):
    """After each test: nothing a test started left behind, Redis running again, no user
    held (a release on A reaches every proxy's mirror). A fleet process that exited
    during the test is started again, and the test errors in teardown."""
    yield
    for p in list(fleet.extra):
        p.stop()
        fleet.extra.remove(p)
    if not fleet.redis.running:  # a test killed it (kill() forgets the process)
        before = {p.instance: subscribed_count(p) for p in fleet.proxies.values()}
        fleet.redis.start()
        wait_fleet_ready(fleet, before)
    died = [p for p in fleet.processes() if p.proc is not None and not p.running]
    notes = [f"{p.name} exited with status {p.proc.returncode}\n{p.diagnostics(40)}" for p in died]
    for p in died:
        p.proc = None
        p.start()
    if died:
        wait_fleet_ready(fleet)
    for user in set(fleet.a.admin_ok("GET", "/holds")["held"]) | set(USERS):
        fleet.a.admin_ok("POST", f"/release?user={user}")
    if notes:
        pytest.fail("\n".join(notes), pytrace=False)


# --------------------------------------------------------------------------
# clients: through HAProxy, or straight to one proxy with our own PROXY header
# --------------------------------------------------------------------------


def open_socket(addr, source, header, timeout=c.IO_TIMEOUT):
    """A TCP connection to ``addr`` from ``source``; with ``header``, a PROXY v2 header
    naming this connection's real ends goes first (what HAProxy would send)."""
    sock = socket.create_connection(addr, timeout, source_address=(source, 0))
    if header:
        sock.sendall(fs.proxy_v2_header(sock.getsockname(), sock.getpeername()))
    return sock


def haproxy(port):
    return (HAPROXY_IP, port)


def direct(p, port):
    return (p.ip, port)


class IMAPClient(imaplib.IMAP4_SSL):
    """imaplib over implicit TLS to ``addr`` (verifying TLS_NAME)."""

    def __init__(self, addr, ctx, source=DIRECT_IP, header=True):
        self._addr, self._source, self._header = addr, source, header
        super().__init__(TLS_NAME, addr[1], ssl_context=ctx, timeout=c.IO_TIMEOUT)

    def _create_socket(self, timeout):
        sock = open_socket(self._addr, self._source, self._header, timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=TLS_NAME)


class RawIMAPClient(c.RawIMAP):
    """clients.RawIMAP over implicit TLS to ``addr`` (verifying TLS_NAME)."""

    def __init__(self, addr, ctx, source=DIRECT_IP, header=True):  # noqa: super not called
        self.host = TLS_NAME
        sock = open_socket(addr, source, header)
        self.local = sock.getsockname()
        self.sock = ctx.wrap_socket(sock, server_hostname=TLS_NAME)
        self.buf = b""
        self.transcript = []
        self.greeting = self.readline()

    def login(self, user):
        tagged, _ = self.command("l", f'LOGIN "{user}" "{USERS[user]}"')
        assert c.is_tagged_ok(tagged, "l"), self.dump()
        return self


class POP3Client(poplib.POP3):
    """poplib with STLS to ``addr`` (verifying TLS_NAME)."""

    def __init__(self, addr, source=DIRECT_IP, header=True):
        self._addr, self._source, self._header = addr, source, header
        super().__init__(TLS_NAME, addr[1], timeout=c.IO_TIMEOUT)

    def _create_socket(self, timeout):
        return open_socket(self._addr, self._source, self._header, timeout)


class SMTPClient(smtplib.SMTP):
    """smtplib to ``addr`` (STARTTLS verifies TLS_NAME)."""

    def __init__(self, addr, source=DIRECT_IP, header=True):
        self._addr, self._src, self._header = addr, source, header
        super().__init__(TLS_NAME, addr[1], local_hostname="client.fleet.test",
                         timeout=c.IO_TIMEOUT)

    def _get_socket(self, host, port, timeout):
        return open_socket(self._addr, self._src, self._header, timeout)


def imap_subject(env, addr, user, password=None, source=DIRECT_IP, header=True):
    """Log in, read message 1's Subject ("hello from <host>"), log out."""
    conn = IMAPClient(addr, env.ssl_context(), source, header)
    try:
        conn.login(user, password or USERS[user])
        return c.imap_subject(conn)
    finally:
        c.imap_logout(conn)


def imap_login_line(env, addr, user, password, source=DIRECT_IP, header=True):
    """One LOGIN on a fresh connection; the tagged answer (bytes)."""
    with RawIMAPClient(addr, env.ssl_context(), source, header) as r:
        assert r.greeting.startswith(b"* OK"), r.dump()
        tagged, _ = r.command("a", f'LOGIN "{user}" "{password}"')
        return tagged


def idle_session(env, addr, user):
    """A logged-in RawIMAP session with INBOX selected, in IDLE."""
    r = RawIMAPClient(addr, env.ssl_context())
    try:
        r.login(user)
        tagged, _ = r.command("s", "SELECT INBOX")
        assert c.is_tagged_ok(tagged, "s"), r.dump()
        r.send("i IDLE\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        return r
    except BaseException:
        r.close()
        raise


def metric(p, name, **labels):
    return c.metric_sum(p.metrics(), name, **labels)


def state_up(p):
    """cutover_state_backend_up{instance_name=<p>} (None if absent)."""
    values = c.metric_values(p.metrics(), "cutover_state_backend_up", instance_name=p.instance)
    assert len(values) <= 1, values
    return values[0] if values else None


def sessions_of(p, user):
    return [row for row in p.admin_ok("GET", "/sessions") if row["user"] == user]


def held_login_waits_for_release(env, fleet, user, hold_on, login_on, release_on):
    """``hold_on`` holds ``user``; a login of ``user`` straight to ``login_on`` must
    wait (its log says 'login held', the login is still pending a second later, another
    user gets through meanwhile) until ``release_on`` releases the user. Returns the
    seconds between the release and the login's success."""
    assert hold_on.admin_ok("POST", f"/hold?user={user}") == {
        "user": user, "held": True, "already": False}
    for p in fleet.proxies.values():  # the fleet-wide list, from any proxy
        assert user in p.admin_ok("GET", "/holds")["held"], p.instance
    released0 = metric(login_on, "cutover_held_logins_total", result="released")
    result = {}

    def login():
        try:
            result["subject"] = imap_subject(env, direct(login_on, IMAPS), user)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
        result["done"] = time.monotonic()

    off = login_on.log_size()
    waiter = threading.Thread(target=login, daemon=True)
    waiter.start()
    try:
        line = login_on.wait_log(rf"login held.*\b{user}\b|\b{user}\b.*login held", off,
                                 timeout=PROPAGATION)
        assert not result, f"the login on {login_on.instance} did not wait: {result}"
        # somebody else is not held meanwhile, on the same proxy
        assert imap_subject(env, direct(login_on, IMAPS), "bob") == "hello from green"
        waiter.join(1.0)  # bounded: it must still be waiting
        assert waiter.is_alive() and not result, f"the held login did not wait: {result}"
    finally:
        t_release = time.monotonic()
        answer = release_on.admin_ok("POST", f"/release?user={user}")
        waiter.join(10)
    assert answer == {"user": user, "released": True}, answer
    assert not waiter.is_alive(), f"the login on {login_on.instance} still waits after the release"
    assert result.get("subject") == "hello from green", (result, line)
    assert result["done"] >= t_release
    c.wait_for(lambda: metric(login_on, "cutover_held_logins_total", result="released")
               >= released0 + 1, PROPAGATION, what="cutover_held_logins_total{result=released}")
    for p in fleet.proxies.values():
        assert user not in p.admin_ok("GET", "/holds")["held"], p.instance
    return result["done"] - t_release


# --------------------------------------------------------------------------
# a. the client's address through both hops
# --------------------------------------------------------------------------


def test_client_address_reaches_dovecot_through_haproxy_and_cutover(env, fleet):
    """Three IMAP sessions from 127.0.0.77 through HAProxy land on the three proxies
    (round robin). Dovecot logs each login with rip=127.0.0.77 and rport= the client's
    own port: the address travelled client -> HAProxy (send-proxy-v2) -> cutover ->
    Dovecot (proxy_protocol: v2). Every proxy lists all three in /sessions with that
    client address, each proxy's log has its session with peer=127.0.0.77:port and
    via=HAProxy, and HAProxy's own address appears as nobody's client."""
    user = "joeuser"
    n0 = len(fleet.dovecot.logins(user))
    offsets = {p.instance: p.log_size() for p in fleet.proxies.values()}
    sessions = []
    try:
        for _ in FLEET:
            r = RawIMAPClient(haproxy(IMAPS), env.ssl_context(), source=CLIENT_IP, header=False)
            sessions.append(r)
            r.login(user)
            tagged, _ = r.command("s", "SELECT INBOX")
            assert c.is_tagged_ok(tagged, "s"), r.dump()
        ports = {r.local[1] for r in sessions}
        assert {r.local[0] for r in sessions} == {CLIENT_IP}

        # Dovecot saw the client itself, port included
        logins = c.wait_for(lambda: fleet.dovecot.logins(user)[n0:] if
                            len(fleet.dovecot.logins(user)) >= n0 + 3 else None,
                            PROPAGATION, what="3 logins in the PROXY-protocol Dovecot's log")
        assert [l["rip"] for l in logins] == [CLIENT_IP] * 3, [l["line"] for l in logins]
        assert {int(l["rport"]) for l in logins} == ports, [l["line"] for l in logins]
        assert {l["lip"] for l in logins} == {fs.FLEET_DOVECOT_IP}, [l["line"] for l in logins]
        assert all(l["tls"] for l in logins), [l["line"] for l in logins]

        # every proxy lists the fleet's three sessions, one per proxy, with the client
        for p in fleet.proxies.values():
            rows = c.wait_for(lambda: (lambda rs: rs if len(rs) == 3 else None)(
                [row for row in sessions_of(p, user) if row["client"].startswith(CLIENT_IP + ":")]),
                PROPAGATION, what=f"3 sessions of {user} in /sessions of {p.instance}")
            assert {row["instance"] for row in rows} == set(FLEET), rows
            assert {row["client"] for row in rows} == {f"{CLIENT_IP}:{port}" for port in ports}, rows
            assert {(row["protocol"], row["pool"]) for row in rows} == {("imap", "new")}, rows
        by_instance = {row["instance"]: int(row["client"].rsplit(":", 1)[1]) for row in rows}
    finally:
        for r in sessions:
            r.close()

    for p in fleet.proxies.values():
        port = by_instance[p.instance]
        log = p.log_since(offsets[p.instance])
        mine = [l for l in log.splitlines() if f"peer={CLIENT_IP}:{port}" in l]
        assert mine, f"{p.instance}: no log line with peer={CLIENT_IP}:{port}\n{log[-3000:]}"
        assert any(f"via={HAPROXY_IP}:" in l for l in mine), mine
        assert f"peer={HAPROXY_IP}" not in log, f"{p.instance} took HAProxy for a client"
        assert not any(row["client"].startswith(HAPROXY_IP + ":")
                       for row in p.admin_ok("GET", "/sessions"))
    assert not any(l["rip"] == HAPROXY_IP for l in fleet.dovecot.logins())
    # HAProxy's view (one tcplog line per connection, written at its end): the same
    # client connections, one to each of its three servers
    clients = {f"{CLIENT_IP}:{port}" for port in by_instance.values()}
    hap = c.wait_for(lambda: (lambda ls: ls if len(ls) == 3 else None)(
        [l for l in fleet.haproxy.log_lines("imaps") if l.split()[0] in clients]),
        PROPAGATION, what="HAProxy's log lines of the three connections")
    assert len({l.split()[3] for l in hap}) == 3, hap


# --------------------------------------------------------------------------
# b. hold on A, login waits on B, release on C
# --------------------------------------------------------------------------


def test_hold_on_a_holds_a_login_on_b_until_a_release_on_c(env, fleet):
    """POST /hold to proxy-a; every proxy's /holds lists the user; a login straight to
    proxy-b waits ('login held' in B's log, still pending a second later, while bob gets
    through B); POST /release to proxy-c lets it through to its pool."""
    took = held_login_waits_for_release(env, fleet, "carol", fleet.a, fleet.b, fleet.c)
    print(f"\n[fleet] held login on B finished {took:.3f}s after the release on C")


# --------------------------------------------------------------------------
# c. kick on C ends IDLE sessions on A and B
# --------------------------------------------------------------------------


def test_kick_on_c_ends_idle_sessions_on_a_and_b(env, fleet):
    """joeuser IDLEs on proxy-a and on proxy-b; POST /kick to proxy-c answers
    {"kicked": 0, "fleet": true} (C has none of them) and both sessions get an untagged
    BYE, then EOF; A and B each count one admin kick and log where it came from."""
    user = "joeuser"
    kicked0 = {p.instance: metric(p, "cutover_sessions_kicked_total", reason="admin")
               for p in fleet.proxies.values()}
    offsets = {p.instance: p.log_size() for p in fleet.proxies.values()}
    ra = idle_session(env, direct(fleet.a, IMAPS), user)
    try:
        rb = idle_session(env, direct(fleet.b, IMAPS), user)
        try:
            rows = c.wait_for(lambda: (lambda rs: rs if len(rs) == 2 else None)(
                sessions_of(fleet.c, user)), PROPAGATION, what="both sessions in C's /sessions")
            assert sorted(row["instance"] for row in rows) == ["proxy-a", "proxy-b"], rows

            t = time.monotonic()
            out = fleet.c.admin_ok("POST", f"/kick?user={user}")
            assert out == {"user": user, "kicked": 0, "fleet": True}, out
            lines_a = [line for _, line in c.read_until_eof(ra, 10)]
            lines_b = [line for _, line in c.read_until_eof(rb, 10)]
            took = time.monotonic() - t
        finally:
            rb.close()
    finally:
        ra.close()
    for name, lines in (("proxy-a", lines_a), ("proxy-b", lines_b)):
        byes = [l for l in lines if l.startswith(b"* BYE")]
        assert byes, f"{name}: no untagged BYE before EOF: {lines!r}"
        assert b"administrator" in byes[0], byes
    print(f"\n[fleet] kick on C ended the sessions on A and B within {took:.3f}s: {byes[0]!r}")
    for p in (fleet.a, fleet.b):
        c.wait_for(lambda: metric(p, "cutover_sessions_kicked_total", reason="admin")
                   == kicked0[p.instance] + 1, PROPAGATION, what=f"{p.instance} kick counter")
        line = p.wait_log(r"kick from the fleet", offsets[p.instance], timeout=PROPAGATION)[0]
        assert re.search(rf'user="?{user}"? sessions=1 from="?proxy-c"?', line), line
    assert metric(fleet.c, "cutover_sessions_kicked_total", reason="admin") == kicked0["proxy-c"]
    c.wait_for(lambda: sessions_of(fleet.a, user) == [], PROPAGATION,
               what="the kicked sessions to leave /sessions")


# --------------------------------------------------------------------------
# d. pop-before-smtp: POP3 on A opens the window on B
# --------------------------------------------------------------------------


def smtp_mail_code(env, p, source):
    """Straight to ``p``'s bridge listener from ``source``: EHLO, STARTTLS, EHLO, MAIL
    FROM without AUTH; returns the MAIL reply (code, text). RSET, QUIT."""
    return c.smtp_mail_code(SMTPClient(direct(p, SMTP), source), env.ssl_context())


def test_pop3_login_on_a_opens_the_bridge_on_b(env, fleet, servers):
    """Before any login from 127.0.0.78, MAIL without AUTH on proxy-b's bridge listener
    gets 530 5.7.0. bob's POP3 login straight to proxy-a from 127.0.0.78 writes the
    window to Redis; then proxy-b (and proxy-c) accept MAIL from 127.0.0.78 without
    AUTH, and a message sent through B reaches bob's pool (green's sink), while
    127.0.0.79 still gets 530 5.7.0."""
    code, msg = smtp_mail_code(env, fleet.b, BRIDGE_IP)
    assert (code, msg[:5]) == (530, b"5.7.0"), (code, msg)

    conn = POP3Client(direct(fleet.a, POP3), source=BRIDGE_IP)
    try:
        conn.stls(context=env.ssl_context())
        conn.user("bob")
        conn.pass_(USERS["bob"])
        assert c.pop3_subject(conn) == "hello from green"
    finally:
        conn.quit()
    # the window is written to Redis right after the login (without delaying it)
    key = f"{KEY_PREFIX}{{ip:{BRIDGE_IP}}}:bridge"
    window = c.wait_for(lambda: fleet.redis.cli("GET", key), PROPAGATION,
                        interval=0.05, what=f"the bridge window {key} in Redis")
    assert window.startswith("bob\t"), window

    tok = c.token("fleet-bridge")
    s = SMTPClient(direct(fleet.b, SMTP), BRIDGE_IP)
    try:
        s.starttls(context=env.ssl_context())
        s.ehlo()
        code, msg = s.mail("bob@example.net")
        assert code == 250, (code, msg)
        code, msg = s.rcpt("friend@example.org")
        assert code == 250, (code, msg)
        code, msg = s.data(f"From: bob@example.net\r\nTo: friend@example.org\r\n"
                           f"Subject: {tok}\r\n\r\nbridged through proxy-b\r\n".encode())
        assert code == 250, (code, msg)
    finally:
        s.quit()
    got = servers.green.sink.wait_for(tok)
    assert got.mail_from == "bob@example.net" and got.rcpt_tos == ["friend@example.org"], got
    assert servers.sink_for(tok) == ["green"]

    assert smtp_mail_code(env, fleet.c, BRIDGE_IP)[0] == 250
    code, msg = smtp_mail_code(env, fleet.b, OTHER_IP)
    assert (code, msg[:5]) == (530, b"5.7.0"), (code, msg)


# --------------------------------------------------------------------------
# e. K failures over three proxies block at K
# --------------------------------------------------------------------------


def failures_by_instance(fleet):
    return {p.instance: metric(p, "cutover_logins_total", protocol="imap", pool="new",
                               result="auth_failed") for p in fleet.proxies.values()}


def test_failed_logins_spread_over_the_fleet_block_at_exactly_k(env, fleet):
    """auth_throttle.user_failures = K = 3 on every proxy. K-1 wrong passwords for alice
    through HAProxy (one proxy each, round robin): Redis counts K-1, and the right
    password (through HAProxy, on the third proxy) is accepted. Then K wrong passwords
    through HAProxy, exactly one per proxy: the K-th is still an ordinary
    AUTHENTICATIONFAILED, after it the right password is refused with "Too many failed
    logins" by each proxy (straight to A, B and C) and through HAProxy."""
    user, good = "alice", USERS["alice"]
    fails_key = f"{KEY_PREFIX}{{{user}}}:fails"
    assert K == 3

    def fail_through_haproxy(n):
        before = failures_by_instance(fleet)
        for _ in range(n):
            tagged = imap_login_line(env, haproxy(IMAPS), user, "wrong-password", CLIENT_IP, False)
            assert tagged.startswith(b"a NO [AUTHENTICATIONFAILED]"), tagged
        after = c.wait_for(lambda: (lambda f: f if sum(f.values()) == sum(before.values()) + n
                                    else None)(failures_by_instance(fleet)),
                           PROPAGATION, what=f"{n} auth_failed logins counted")
        per = {k: after[k] - before[k] for k in after}
        assert sorted(per.values()) == sorted([1] * n + [0] * (3 - n)), (
            f"HAProxy did not spread the failures one per proxy: {per}")
        return per

    # below the limit
    per = fail_through_haproxy(K - 1)
    assert fleet.redis.cli("GET", fails_key) == str(K - 1)
    ok0 = {p.instance: metric(p, "cutover_logins_total", protocol="imap", pool="new", result="ok")
           for p in fleet.proxies.values()}
    assert imap_subject(env, haproxy(IMAPS), user, source=CLIENT_IP, header=False) == "hello from new"
    served_by = [p.instance for p in fleet.proxies.values()
                 if metric(p, "cutover_logins_total", protocol="imap", pool="new", result="ok")
                 > ok0[p.instance]]
    assert served_by and per[served_by[0]] == 0, (
        f"the accepted login was served by {served_by}, failures went to {per}")
    # a success clears the user's fleet-wide count
    c.wait_for(lambda: fleet.redis.cli("EXISTS", fails_key) == "0", PROPAGATION,
               what="the success to clear the failure count")

    # at the limit
    throttled0 = {p.instance: metric(p, "cutover_logins_total", pool="throttled", result="refused")
                  for p in fleet.proxies.values()}
    fail_through_haproxy(K)
    assert fleet.redis.cli("GET", fails_key) == str(K)
    assert fleet.redis.cli("HEXISTS", f"{KEY_PREFIX}{{fleet}}:blocks", f"user:{user}") == "1"
    for p in fleet.proxies.values():
        tagged = imap_login_line(env, direct(p, IMAPS), user, good)
        assert tagged.startswith(b"a NO") and b"Too many failed logins" in tagged, (p.instance, tagged)
        assert metric(p, "cutover_logins_total", pool="throttled", result="refused") \
            == throttled0[p.instance] + 1, p.instance
    tagged = imap_login_line(env, haproxy(IMAPS), user, good, CLIENT_IP, False)
    assert b"Too many failed logins" in tagged, tagged
    # the throttle is the user's: another user still gets in everywhere
    for p in fleet.proxies.values():
        assert imap_subject(env, direct(p, IMAPS), "bob") == "hello from green"


# --------------------------------------------------------------------------
# f. a PROXY header from an untrusted address
# --------------------------------------------------------------------------


def recv_all(sock, timeout=5.0):
    """Everything the server sends until it closes (EOF or reset), bounded."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data, "reset"
        except (TimeoutError, socket.timeout):
            return data, "timeout"
        if not chunk:
            return data, "eof"
        data += chunk
    return data, "timeout"


def client_hello(ctx):
    """The bytes of a TLS ClientHello for TLS_NAME (from an in-memory handshake)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=TLS_NAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]  # a TLS handshake record
    return hello


def test_proxy_header_from_an_untrusted_address_is_refused(env, fleet):
    """proxy-d (127.0.0.24) is configured like the fleet but trusts only 127.0.0.200/32.
    A PROXY v2 header from 127.0.0.1 to its POP3 listener gets no greeting, the
    connection is closed, and cutover_connections_refused_total{reason="proxy_untrusted"}
    goes up (the log names our connection); on its IMAP listener our TLS ClientHello
    gets no answer either. The same header from 127.0.0.200 gets the POP3 greeting and an
    IMAP login (the listener works; only trust differs)."""
    d = fleet.extra_proxy(trusted=[TRUSTED_ONLY])
    d.start()

    def untrusted(listener):
        return metric(d, "cutover_connections_refused_total", listener=listener,
                      reason="proxy_untrusted")

    pop0, imap0 = untrusted("pop3"), untrusted("imaps")
    off = d.log_size()
    sock = open_socket(direct(d, POP3), DIRECT_IP, header=True)
    try:
        port = sock.getsockname()[1]
        data, how = recv_all(sock)
    finally:
        sock.close()
    assert data == b"" and how in ("eof", "reset"), (data, how)
    c.wait_for(lambda: untrusted("pop3") >= pop0 + 1, PROPAGATION,
               what="proxy_untrusted counted on pop3")
    line = d.wait_log(rf"peer={re.escape(DIRECT_IP)}:{port}\b.*proxy_untrusted", off,
                      timeout=PROPAGATION)[0]
    print(f"\n[fleet] untrusted header: closed ({how}); {line.strip()}")

    # implicit TLS: our ClientHello after the header gets no ServerHello, only the close
    sock = open_socket(direct(d, IMAPS), DIRECT_IP, header=True)
    try:
        try:
            sock.sendall(client_hello(env.ssl_context()))
        except OSError:
            pass  # already closed: fine
        data, how = recv_all(sock)
    finally:
        sock.close()
    assert data == b"" and how in ("eof", "reset"), (data, how)
    c.wait_for(lambda: untrusted("imaps") >= imap0 + 1, PROPAGATION,
               what="proxy_untrusted counted on imaps")

    # the same from the trusted address: served
    sock = open_socket(direct(d, POP3), TRUSTED_SOURCE, header=True)
    try:
        sock.settimeout(c.IO_TIMEOUT)
        assert sock.recv(4096).startswith(b"+OK"), "no POP3 greeting from the trusted source"
    finally:
        sock.close()
    assert imap_subject(env, direct(d, IMAPS), "bob", source=TRUSTED_SOURCE) == "hello from green"


# --------------------------------------------------------------------------
# g. Redis killed, and back
# --------------------------------------------------------------------------


def logins_through_haproxy(env, fleet, what):
    """Three IMAP logins through HAProxy (one per proxy), each bounded in time."""
    ok0 = {p.instance: metric(p, "cutover_logins_total", protocol="imap", result="ok")
           for p in fleet.proxies.values()}
    took = []
    for _ in FLEET:
        t = time.monotonic()
        assert imap_subject(env, haproxy(IMAPS), "bob", source=CLIENT_IP, header=False) \
            == "hello from green", what
        took.append(time.monotonic() - t)
    assert max(took) < DEGRADED_LOGIN_BOUND, (what, took)
    for p in fleet.proxies.values():
        assert metric(p, "cutover_logins_total", protocol="imap", result="ok") == ok0[p.instance] + 1, (
            what, p.instance)
    return took


def test_redis_killed_logins_go_on_gauge_and_alert_then_sharing_resumes(env, fleet):
    """A real Prometheus scrapes the three proxies (dashboards/alerts.yml loaded). Redis
    is SIGKILLed: logins through HAProxy still succeed promptly on all three proxies;
    cutover_state_backend_up drops to 0 on each within REDIS_NOTICE seconds, Prometheus
    evaluates `cutover_state_backend_up == 0` to one series per proxy and holds the
    CutoverSharedStateDown alert pending for each. Redis restarted on the same port
    (empty): the gauge returns to 1, the expression to nothing, and a hold on A again
    holds a login on B until a release on C."""
    prom = harness.Prometheus(env.root / "fleet-prometheus",
                              [f"{ip}:{fs.METRICS_PORT}" for ip in FLEET.values()],
                              job=fs.PROM_JOB, ip=fs.PROM_IP, port=fs.PROM_PORT,
                              rule_files=[ALERTS])
    fleet.extra.append(prom)
    prom.start()
    prom.wait_ready()
    c.wait_for(lambda: len([s for s in prom.series("cutover_state_backend_up") if s["value"][1] == "1"])
               == 3, 30, interval=0.5, what="Prometheus to scrape the gauge of the three proxies")

    logins_through_haproxy(env, fleet, "before the kill")
    subscribed = {p.instance: subscribed_count(p) for p in fleet.proxies.values()}
    t_kill = time.monotonic()
    fleet.redis.kill()

    took = logins_through_haproxy(env, fleet, "right after the kill")
    noticed = {}
    for p in fleet.proxies.values():
        c.wait_for(lambda: state_up(p) == 0, REDIS_NOTICE, interval=0.1,
                   what=f"cutover_state_backend_up == 0 on {p.instance}")
        noticed[p.instance] = round(time.monotonic() - t_kill, 2)
    firing = c.wait_for(lambda: (lambda r: r if len(r) == 3 else None)(
        prom.series("cutover_state_backend_up == 0")), 15, interval=0.5,
        what="Prometheus: cutover_state_backend_up == 0 for the three proxies")
    assert {s["metric"]["instance_name"] for s in firing} == set(FLEET), firing
    alerts = c.wait_for(lambda: (lambda r: r if len(r) == 3 else None)(
        prom.series('ALERTS{alertname="CutoverSharedStateDown"}')), 15, interval=0.5,
        what="the CutoverSharedStateDown alert (pending) for the three proxies")
    assert {s["metric"]["instance_name"] for s in alerts} == set(FLEET), alerts
    assert {s["metric"]["alertstate"] for s in alerts} == {"pending"}, alerts  # for: 30s
    took += logins_through_haproxy(env, fleet, "with Redis known to be down")
    print(f"\n[fleet] Redis killed: gauge 0 after {noticed} s; logins took "
          f"{min(took):.3f}-{max(took):.3f} s")

    t_start = time.monotonic()
    fleet.redis.start()
    wait_fleet_ready(fleet, subscribed)
    back = time.monotonic() - t_start
    c.wait_for(lambda: prom.series("cutover_state_backend_up == 0") == [], 15, interval=0.5,
               what="Prometheus: cutover_state_backend_up == 0 to be empty again")
    print(f"[fleet] Redis restarted: every proxy up and resubscribed after {back:.2f} s")
    logins_through_haproxy(env, fleet, "after the restart")
    held_login_waits_for_release(env, fleet, "carol", fleet.a, fleet.b, fleet.c)

"""Migration controls (issue 4) end to end: the real cutover binary in front of real
Dovecot, driven by real clients and by the `cutover` CLI itself.

Stages with `from:` times, hot reload (SIGHUP and file change), moving users
(`on_move`), fallback pools, user name normalization, a 1M-line cohort file, the
stragglers report, `cutover kick|hold|release`, and the pop-before-smtp bridge.

Every test that changes the proxy's configuration (proxy.reconfigure() or
proxy.write_config()) gets the default configuration back afterwards (conftest).
Which backend served a session is proven by the seeded "hello from <host>" message.
"""

import calendar
import json
import os
import random
import re
import smtplib
import threading
import time

import pytest

import clients as c
import harness
from harness import (ADMIN_PORT, METRICS_PORT, NEW_IP, NEW_USERS, PROXY_IP, PROXY_PORTS,
                     USERS)

pytestmark = pytest.mark.proxy

IMAP = PROXY_PORTS["imap"]
IMAPS = PROXY_PORTS["imaps"]
POP3 = PROXY_PORTS["pop3"]

#: listeners some tests add (loopback, ports outside the default set)
PLAIN_IMAP_PORT = 11144  # IMAP with allow_plaintext_auth: true
COMPAT_SMTP_PORT = 11025  # SMTP with relay: pop-before-smtp
#: a loopback address where nothing listens (a pool whose only server is dead)
DEAD_IP = "127.0.0.13"
#: the bridge test's client address: no other test logs in from it, and the
#: bridge's window is per client address
BRIDGE_SOURCE = "127.0.0.2"
OTHER_SOURCE = "127.0.0.3"

#: a user provisioned on the legacy hosts only (fixture `dave`)
DAVE = ("dave", "dave-secret-6")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def config(env, routes=None, admin=None, **top):
    """The default proxy config with a short drain (fast restarts), optionally other
    routes, an admin endpoint on 127.0.0.1:19899 (``admin={}`` or with extra keys),
    and other top-level keys."""
    cfg = harness.proxy_config(env)
    cfg["shutdown"] = {"drain_timeout": "1s"}
    if routes is not None:
        cfg["routes"] = routes
    if admin is not None:
        cfg["admin"] = {"listen": f"{PROXY_IP}:{ADMIN_PORT}", **admin}
    cfg.update(top)
    return cfg


def default_routes(*extra_first):
    """The default routes (NEW_USERS -> new, everyone else -> legacy), after ``extra_first``."""
    return [*extra_first, {"users": list(NEW_USERS), "pool": "new"}, {"pool": "legacy"}]


def plain_imap_listener():
    return {"name": "imap-plain", "protocol": "imap", "listen": f"{PROXY_IP}:{PLAIN_IMAP_PORT}",
            "allow_plaintext_auth": True}


def metrics():
    return c.scrape_metrics(PROXY_IP, METRICS_PORT)


def metric(name, **labels):
    return c.metric_sum(metrics(), name, **labels)


def which(env, user, password=None, port=IMAPS, tls="implicit", login=None):
    """Log in through the proxy as ``login`` (default ``user``); "hello from <host>"."""
    return c.imap_which_host(PROXY_IP, port, login or user, password or USERS[user], tls=tls,
                             ctx=env.ssl_context())


def cli_ok(*args):
    cp = c.cutover_cli(*args)
    assert cp.returncode == 0, f"cutover {' '.join(map(str, args))}: rc={cp.returncode}\n{cp.out}\n{cp.err}"
    return cp


def open_session(env, user, password=None):
    """A logged-in raw IMAP session through the proxy (STARTTLS on 11143) with INBOX
    selected; returns (RawIMAP, subject of message 1)."""
    r = c.RawIMAP(PROXY_IP, IMAP)
    try:
        r.starttls(env.ssl_context())
        tagged, _ = r.command("l", f'LOGIN "{user}" "{password or USERS[user]}"')
        assert c.is_tagged_ok(tagged, "l"), r.dump()
        tagged, _ = r.command("s", "SELECT INBOX")
        assert c.is_tagged_ok(tagged, "s"), r.dump()
        tagged, lines = r.command("f", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert c.is_tagged_ok(tagged, "f"), r.dump()
        subj = next((l.decode().split(":", 1)[1].strip() for l in lines if l.startswith(b"Subject:")), None)
        return r, subj
    except BaseException:
        r.close()
        raise


def wait_reloads(before_ok, n=1, timeout=30.0):
    """Bounded poll until cutover_config_reloads_total{result="ok"} grew by ``n``."""
    return c.wait_for(lambda: metric("cutover_config_reloads_total", result="ok") >= before_ok + n,
                      timeout, interval=0.05, what=f"{n} successful reload(s)")


# --------------------------------------------------------------------------
# 1. a stage starting a few seconds ahead moves an idling user
# --------------------------------------------------------------------------

#: seconds between writing the config and the stage start: enough for the restart,
#: a STARTTLS login, SELECT and IDLE (~0.5 s here)
STAGE_LEAD = 4


def stage_config(env, start):
    """Default routes now; from ``start`` on, stage wave-1 also sends bob to new."""
    cfg = config(env, on_move={"action": "kick", "grace": "0s"})
    cfg["stages"] = [{"name": "wave-1", "from": rfc3339(start),
                      "routes": default_routes({"users": ["bob"], "pool": "new"})}]
    return cfg


def idle(r):
    r.send("i IDLE\r\n")
    assert r.readline().startswith(b"+"), r.dump()


def assert_moved_at(lines, start):
    """An untagged BYE saying the mailbox moved, not before ``start``, soon after."""
    byes = [(t, l) for t, l in lines if l.startswith(b"* BYE")]
    assert byes, f"no untagged BYE before the close: {lines!r}"
    t_bye, bye = byes[0]
    assert b"moved" in bye, bye
    # not before the stage's time (the proxy's clock has 1 s granularity)
    assert t_bye >= start - 0.01, f"kicked at {t_bye:.3f}, before the stage start {start}"
    assert t_bye < start + 5, f"kicked {t_bye - start:.1f}s after the stage start"
    return t_bye, bye


def test_stage_switch_kicks_an_idling_user_who_reconnects_to_new(env, proxy, servers):
    start = int(time.time()) + STAGE_LEAD
    proxy.reconfigure(stage_config(env, start))
    kicked0 = metric("cutover_sessions_kicked_total", reason="moved")

    r, subj = open_session(env, "bob")
    try:
        assert subj == "hello from green"
        idle(r)
        # while bob idles, the operator's preview: check lists the stage as scheduled,
        # route --at shows the move, route (now) does not yet
        cp = cli_ok("check", "--config", proxy.config_path)
        stage_line = next((l for l in cp.out.splitlines() if "wave-1" in l), "")
        assert rfc3339(start) in stage_line and "scheduled" in stage_line, cp.out
        later = json.loads(cli_ok("route", "--config", proxy.config_path, "--json", "--at",
                                  rfc3339(start + 1), "bob").out)
        assert (later["pool"], later["stage"]) == ("new", "wave-1"), later
        now = json.loads(cli_ok("route", "--config", proxy.config_path, "--json", "bob").out)
        assert now["pool"] == "legacy", now
        assert time.time() < start, (
            f"setup took too long: the stage started ({rfc3339(start)}) before bob was idling "
            "and the previews ran; raise STAGE_LEAD")
        lines = c.read_until_eof(r, STAGE_LEAD + 10)
    finally:
        r.close()
    t_bye, bye = assert_moved_at(lines, start)
    print(f"\n[stage] BYE {t_bye - start:+.2f}s after the stage start: {bye.decode()}")

    # the reconnect lands on new
    n = len(servers.new.imap.logins("bob"))
    r, subj = open_session(env, "bob")
    try:
        assert subj == "hello from new"
        servers.new.imap.wait_login("bob", n)
        # carol is untouched by the stage
        assert which(env, "carol") == "hello from green"
        body = metrics()
        assert c.metric_sum(body, "cutover_stage_active", stage="wave-1") == 1, body
        assert c.metric_sum(body, "cutover_stage_active", stage="(initial)") == 0, body
        assert c.metric_sum(body, "cutover_sessions_kicked_total", reason="moved") >= kicked0 + 1
        assert "stage starts" in proxy.log_text()

        # roll back: remove the stage from the file (no SIGHUP); within the 2 s poll bob's
        # session on new is ended the same way, and he lands on legacy again
        idle(r)
        t = time.time()
        proxy.write_config(config(env, on_move={"action": "kick", "grace": "0s"}))
        lines = c.read_until_eof(r, 8)
    finally:
        r.close()
    assert any(l.startswith(b"* BYE") and b"moved" in l for _, l in lines), lines
    print(f"[stage] rollback by file edit: BYE after {lines[-1][0] - t:.2f}s")
    assert which(env, "bob") == "hello from green"


def test_a_stage_added_by_a_reload_moves_idling_users_at_its_time(env, proxy, servers):
    """The usual operator flow: the proxy runs, the operator adds a stage to routes.yaml."""
    proxy.reconfigure(config(env, on_move={"action": "kick", "grace": "0s"}))
    r, subj = open_session(env, "bob")
    try:
        assert subj == "hello from green"
        idle(r)
        start = int(time.time()) + STAGE_LEAD
        ok0 = metric("cutover_config_reloads_total", result="ok")
        proxy.write_config(stage_config(env, start))
        proxy.sighup()
        wait_reloads(ok0)
        assert time.time() < start, "reload took too long; raise STAGE_LEAD"
        lines = c.read_until_eof(r, STAGE_LEAD + 6)
    finally:
        r.close()
    assert_moved_at(lines, start)
    assert which(env, "bob") == "hello from new"


# --------------------------------------------------------------------------
# 2. SIGHUP with an invalid file keeps serving; a valid edit is picked up alone
# --------------------------------------------------------------------------


def test_sighup_with_an_invalid_file_keeps_serving_then_a_valid_edit_is_picked_up(env, proxy):
    held, subj = open_session(env, "joeuser")
    try:
        assert subj == "hello from new"
        errors0 = metric("cutover_config_reloads_total", result="error")
        ok0 = metric("cutover_config_reloads_total", result="ok")

        # (a) valid YAML naming a pool that does not exist
        bad = config(env)
        bad["routes"][1]["pool"] = "legcy"
        off = proxy.log_size()
        proxy.write_config(bad)
        proxy.sighup()
        line = proxy.wait_log(r"reload failed", off)[0]
        assert "legcy" in line, line
        assert "SIGHUP" in proxy.log_since(off)
        c.wait_for(lambda: metric("cutover_config_reloads_total", result="error") >= errors0 + 1, 5,
                   interval=0.05, what="the error counter")
        assert which(env, "bob") == "hello from green"
        assert which(env, "joeuser") == "hello from new"

        # (b) a file that is not even YAML
        off = proxy.log_size()
        proxy.write_config("listeners: [ { name: imap, protocol: imap\nroutes: : -\n")
        proxy.sighup()
        proxy.wait_log(r"reload failed", off)
        c.wait_for(lambda: metric("cutover_config_reloads_total", result="error") >= errors0 + 2, 5,
                   interval=0.05, what="the error counter")
        assert which(env, "bob") == "hello from green"
        assert which(env, "carol") == "hello from green"
        assert metric("cutover_config_reloads_total", result="ok") == ok0, "an invalid file was applied"
        # the session opened before both attempts is still relayed
        tagged, _ = held.command("n", "NOOP")
        assert c.is_tagged_ok(tagged, "n"), held.dump()

        # (c) a valid edit WITHOUT SIGHUP: carol moves to new within the 2 s poll (+ margin)
        good = config(env, routes=default_routes({"users": ["carol"], "pool": "new"}))
        off = proxy.log_size()
        t0 = time.monotonic()
        proxy.write_config(good)
        c.wait_for(lambda: which(env, "carol") == "hello from new", 8, interval=0.1,
                   what="carol to be routed to new after the file edit")
        took = time.monotonic() - t0
        print(f"\n[reload] file edit picked up after {took:.2f}s")
        log = proxy.log_since(off)
        assert "configuration files changed" in log and "configuration reloaded" in log, log
        assert "SIGHUP" not in log
        assert metric("cutover_config_reloads_total", result="ok") >= ok0 + 1
        assert which(env, "bob") == "hello from green"
        tagged, _ = held.command("n2", "NOOP")
        assert c.is_tagged_ok(tagged, "n2"), held.dump()
    finally:
        held.close()


# --------------------------------------------------------------------------
# 3. reloads during ~200 logins/s lose no login
# --------------------------------------------------------------------------

LOAD_RATE = 200  # logins per second, paced (at most)
LOAD_SECONDS = 5.0
LOAD_WORKERS = 16
LOAD_RELOADS = 6
LOAD_USERS = ("bob", "joeuser", "bob", "alice")  # both pools; carol is what the reloads move
#: the load must keep at least this share of the rate reached without reloads
LOAD_KEEP = 0.6
#: longest acceptable pause between two completed logins (a stalled accept loop)
LOAD_MAX_GAP = 2.0
EXTRA_IMAP_PORT = 11145  # a listener that the reloads add and remove


class LoginLoad:
    """``LOAD_WORKERS`` threads doing LOGIN/LOGOUT on the proxy's plaintext IMAP
    listener, paced to at most ``LOAD_RATE``/s, for ``seconds`` of wall time."""

    def __init__(self, seconds):
        self.lock = threading.Lock()
        self.slot = 0
        self.done = []  # completion times of successful logins
        self.failures = []
        self.t0 = time.monotonic() + 0.1
        self.stop_at = self.t0 + seconds
        self.threads = [threading.Thread(target=self._worker, args=(n,), daemon=True)
                        for n in range(LOAD_WORKERS)]
        for t in self.threads:
            t.start()

    def _worker(self, seed):
        rnd = random.Random(seed)
        while True:
            with self.lock:
                i = self.slot
                self.slot += 1
            at = max(self.t0 + i / LOAD_RATE, time.monotonic())
            if at >= self.stop_at:
                return
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing, not synchronization
            user = rnd.choice(LOAD_USERS)
            try:
                conn = c.imap_connect(PROXY_IP, PLAIN_IMAP_PORT)
                try:
                    typ, data = conn.login(user, USERS[user])
                    assert typ == "OK", (typ, data)
                finally:
                    conn.logout()
                with self.lock:
                    self.done.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every failure is recorded
                with self.lock:
                    self.failures.append(f"{user} at +{time.monotonic() - self.t0:.2f}s: {e!r}")

    def join(self):
        for t in self.threads:
            t.join(LOAD_SECONDS + 60)
        assert not any(t.is_alive() for t in self.threads), "login workers did not finish"
        self.elapsed = time.monotonic() - self.t0
        return self

    def max_gap(self):
        times = [self.t0, *sorted(self.done), self.stop_at]
        return max(b - a for a, b in zip(times, times[1:]))


def test_reloads_during_200_logins_per_second_lose_none(env, proxy):
    def variant(i):
        v = config(env, hostname=f"reload-{i}.cutover.test")
        v["listeners"].append(plain_imap_listener())
        if i % 2 == 0:  # carol (not in the load) moves to new, a listener appears
            v["routes"] = default_routes({"users": ["carol"], "pool": "new"})
            v["listeners"].append({"name": "imap-extra", "protocol": "imap",
                                   "listen": f"{PROXY_IP}:{EXTRA_IMAP_PORT}"})
        return v

    proxy.reconfigure(variant(1))
    # calibration without reloads: what this machine does (Dovecot forks per login)
    base = LoginLoad(1.5).join()
    assert not base.failures, base.failures[:20]
    base_rate = len(base.done) / 1.5

    before = metrics()
    load = LoginLoad(LOAD_SECONDS)
    # reloads spread over the load: write a variant, SIGHUP, wait until it is applied
    reload_times = []
    for i in range(LOAD_RELOADS):
        target = load.t0 + (i + 0.5) * LOAD_SECONDS / LOAD_RELOADS
        if target > time.monotonic():
            time.sleep(target - time.monotonic())  # pacing
        ok_before = metric("cutover_config_reloads_total", result="ok")
        s = time.monotonic()
        proxy.write_config(variant(i))
        proxy.sighup()
        wait_reloads(ok_before, 1, timeout=10)
        reload_times.append(time.monotonic() - s)
        # the removed listener's accept loop stops asynchronously, just after the swap
        harness.wait_until(lambda: harness.port_open(PROXY_IP, EXTRA_IMAP_PORT) == (i % 2 == 0), 3,
                           what=f"listener imap-extra {'added' if i % 2 == 0 else 'removed'}")
    load.join()
    after = metrics()
    n = len(load.done)
    print(f"\n[load] without reloads: {base_rate:.0f} logins/s; with {len(reload_times)} reloads "
          f"(each applied within {max(reload_times):.2f}s): {n} logins ok, {len(load.failures)} "
          f"failed in {LOAD_SECONDS:.0f}s ({n / LOAD_SECONDS:.0f}/s), longest pause "
          f"{load.max_gap():.2f}s")
    assert not load.failures, f"{len(load.failures)} failed logins:\n" + "\n".join(load.failures[:20])
    expected = min(base_rate, LOAD_RATE) * LOAD_SECONDS
    assert LOAD_KEEP * expected <= n <= LOAD_RATE * LOAD_SECONDS + LOAD_WORKERS, (
        f"{n} logins in {LOAD_SECONDS}s; about {expected:.0f} expected (the proxy stalled?)")
    assert load.max_gap() < LOAD_MAX_GAP, f"no login completed for {load.max_gap():.2f}s"
    # the proxy counted exactly these logins, all ok, and applied every reload
    d = lambda name, **kw: c.metric_sum(after, name, **kw) - c.metric_sum(before, name, **kw)  # noqa: E731
    assert d("cutover_logins_total", result="ok") == n, (d("cutover_logins_total", result="ok"), n)
    assert d("cutover_logins_total") == n, "logins that did not end ok"
    assert d("cutover_config_reloads_total", result="ok") >= LOAD_RELOADS
    assert d("cutover_config_reloads_total", result="error") == 0
    # the last variant (odd) is in force: carol on legacy, the extra listener gone
    assert which(env, "carol") == "hello from green"
    assert not harness.port_open(PROXY_IP, EXTRA_IMAP_PORT)


# --------------------------------------------------------------------------
# 4. fallback: on an unavailable pool, and on a rejection when asked to
# --------------------------------------------------------------------------


@pytest.fixture
def dave(servers):
    """``dave`` exists on the legacy hosts (green, mauve) only, not on new."""
    for h in (servers.green, servers.mauve):
        h.add_user(*DAVE)
    # Dovecot re-reads a changed passwd-file at most once a second: poll until it has
    for h in (servers.green, servers.mauve):
        c.wait_for(lambda: c.imap_which_host(h.ip, 143, *DAVE) == f"hello from {h.name}", 10,
                   what=f"dave to be known on {h.name}")
    yield DAVE
    for h in (servers.green, servers.mauve):
        h.remove_user(DAVE[0])


def test_fallback_when_every_server_of_the_pool_is_down(env, proxy, servers):
    assert not harness.port_open(DEAD_IP, 143) and not harness.port_open(DEAD_IP, 110)
    cfg = config(env, routes=default_routes({"users": ["bob"], "pool": "dead", "fallback": "legacy"}))
    cfg["pools"]["dead"] = {
        "connect_timeout": "1s",
        "health": {"interval": "0s"},
        "imap": {"servers": [f"{DEAD_IP}:143"]},
        "pop3": {"servers": [f"{DEAD_IP}:110"]},
        "smtp": {"servers": [f"{DEAD_IP}:587"]},
    }
    proxy.reconfigure(cfg)
    f0 = metric("cutover_fallbacks_total", to="legacy", reason="unavailable")
    decision = json.loads(cli_ok("route", "--config", proxy.config_path, "--json", "bob").out)
    assert decision["pool"] == "dead" and decision["fallback"]["pool"] == "legacy", decision
    n = len(servers.green.imap.logins("bob"))
    t = time.monotonic()
    assert which(env, "bob") == "hello from green"
    assert time.monotonic() - t < 10
    servers.green.imap.wait_login("bob", n)
    assert c.pop3_which_host(PROXY_IP, POP3, "bob", USERS["bob"], "starttls",
                             env.ssl_context()) == "hello from green"
    assert metric("cutover_fallbacks_total", reason="unavailable") >= f0 + 2
    assert metric("cutover_fallbacks_total", **{"from": "dead"}, to="legacy", reason="unavailable") >= 2
    # others are not affected
    assert which(env, "carol") == "hello from green"
    assert which(env, "joeuser") == "hello from new"


def new_rejections(servers, user):
    """How often new's Dovecot (IMAP) rejected ``user`` as unknown."""
    return sum(1 for l in servers.new.imap.log_text().splitlines()
               if f"passwd-file({user}," in l and "unknown user" in l)


def test_fallback_on_auth_failure_only_when_asked(env, proxy, servers, dave):
    user, password = dave
    # sanity: new does not know dave
    with pytest.raises(c.imaplib.IMAP4.error):
        c.imap_login(NEW_IP, 993, user, password, "implicit", env.ssl_context())

    # with fallback_on_auth_failure: new rejects, legacy (green) serves him
    cfg = config(env, routes=default_routes(
        {"users": [user], "pool": "new", "fallback": "legacy", "fallback_on_auth_failure": True}))
    proxy.reconfigure(cfg)
    f0 = metric("cutover_fallbacks_total", reason="auth_failed")
    n_green = len(servers.green.imap.logins(user))
    n_rejected = new_rejections(servers, user)
    assert which(env, user, password) == "hello from green"
    servers.green.imap.wait_login(user, n_green)
    c.wait_for(lambda: new_rejections(servers, user) > n_rejected, 5,
               what="new's log to show that it was asked first")
    assert metric("cutover_fallbacks_total", **{"from": "new"}, to="legacy", reason="auth_failed") >= f0 + 1
    # a wrong password is rejected by both: still a failure, not a way in
    with pytest.raises(c.imaplib.IMAP4.error):
        which(env, user, password + "-wrong")

    # without it: new's rejection is final, legacy is never asked
    cfg = config(env, routes=default_routes({"users": [user], "pool": "new", "fallback": "legacy"}))
    proxy.reconfigure(cfg)
    n_green = len(servers.green.imap.logins(user))
    n_mauve = len(servers.mauve.imap.logins(user))
    n_rejected = new_rejections(servers, user)
    f1 = metric("cutover_fallbacks_total")
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        tagged, _ = r.command("a1", f'LOGIN "{user}" "{password}"')
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), r.dump()
    c.wait_for(lambda: new_rejections(servers, user) > n_rejected, 5, what="new's rejection")
    assert len(servers.green.imap.logins(user)) == n_green, "dave reached green without the flag"
    assert len(servers.mauve.imap.logins(user)) == n_mauve
    assert metric("cutover_fallbacks_total") == f1


# --------------------------------------------------------------------------
# 5. user name normalization
# --------------------------------------------------------------------------


def test_joeuser_at_example_net_reaches_joeusers_pool_as_joeuser(env, proxy, servers):
    # without `users:` the address is an unknown user (routed to legacy, rejected there)
    with pytest.raises(c.imaplib.IMAP4.error):
        which(env, "joeuser", login="JoeUser@example.net")

    cfg = config(env, users={"local_domains": ["example.net"], "case_insensitive": True})
    proxy.reconfigure(cfg)
    decision = json.loads(cli_ok("route", "--config", proxy.config_path, "--json",
                                 "JoeUser@example.net").out)
    assert (decision["user"], decision["pool"]) == ("joeuser", "new"), decision

    n = len(servers.new.imap.logins("joeuser"))
    assert which(env, "joeuser", login="JoeUser@example.net") == "hello from new"
    login = servers.new.imap.wait_login("joeuser", n)
    assert login["user"] == "joeuser", login["line"]
    # the legacy hosts only know bare names, too
    n = len(servers.green.imap.logins("bob"))
    assert which(env, "bob", login="BOB@Example.NET") == "hello from green"
    assert servers.green.imap.wait_login("bob", n)["user"] == "bob"
    # another domain is not stripped: routed as is, and nobody knows that user
    with pytest.raises(c.imaplib.IMAP4.error):
        which(env, "joeuser", login="joeuser@other.example")


# --------------------------------------------------------------------------
# 6. a one-million-line cohort file
# --------------------------------------------------------------------------

COHORT_SIZE = 1_000_000
COHORT_BOUND = 30.0  # seconds: generous; the README promises well under one second


def _write_cohort(path, with_bob):
    rnd = random.Random(4)
    bob_at = rnd.randrange(COHORT_SIZE)
    names = [f"user{i:07d}" for i in range(COHORT_SIZE)]
    names[bob_at] = "bob" if with_bob else "not-bob"
    rnd.shuffle(names)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# wave 1: one million users\n" + "\n".join(names) + "\n")
    os.replace(tmp, path)


def test_a_million_line_cohort_file(env, proxy):
    cohort = env.root / "proxy" / "cohort-1m.txt"
    _write_cohort(cohort, with_bob=True)
    proxy.reconfigure(config(env))
    before = proxy.proc_status()

    cfg = config(env, routes=default_routes({"users_file": str(cohort), "pool": "new"}))
    off = proxy.log_size()
    ok0 = metric("cutover_config_reloads_total", result="ok")
    t = time.monotonic()
    proxy.write_config(cfg)
    proxy.sighup()
    proxy.wait_log(r"configuration reloaded", off, timeout=COHORT_BOUND)
    took = time.monotonic() - t
    wait_reloads(ok0)
    after = proxy.proc_status()
    print(f"\n[cohort] {COHORT_SIZE} names ({cohort.stat().st_size / 1e6:.1f} MB): reload "
          f"applied in {took:.2f}s; proxy VmRSS {before['VmRSS'] / 1024:.1f} -> "
          f"{after['VmRSS'] / 1024:.1f} MiB, VmHWM {before['VmHWM'] / 1024:.1f} -> "
          f"{after['VmHWM'] / 1024:.1f} MiB")
    assert which(env, "bob") == "hello from new"
    assert which(env, "carol") == "hello from green"
    assert which(env, "joeuser") == "hello from new"
    d = json.loads(cli_ok("route", "--config", proxy.config_path, "--json", "bob").out)
    assert d["pool"] == "new" and d["rule_index"] == 0, d

    # editing the cohort file alone (no SIGHUP, config untouched) is picked up
    off = proxy.log_size()
    t = time.monotonic()
    _write_cohort(cohort, with_bob=False)
    c.wait_for(lambda: which(env, "bob") == "hello from green", COHORT_BOUND, interval=0.25,
               what="bob back on legacy after his removal from the cohort file")
    print(f"[cohort] cohort file edit picked up after {time.monotonic() - t:.2f}s; VmRSS "
          f"{proxy.proc_status()['VmRSS'] / 1024:.1f} MiB")
    assert "configuration files changed" in proxy.log_since(off)

    # and a fresh start with the file is quick too
    t = time.monotonic()
    proxy.reconfigure(cfg)
    started = time.monotonic() - t
    status = proxy.proc_status()
    print(f"[cohort] restart with the cohort in {started:.2f}s (incl. stop); VmRSS "
          f"{status['VmRSS'] / 1024:.1f} MiB, VmHWM {status['VmHWM'] / 1024:.1f} MiB")
    assert started < COHORT_BOUND
    assert which(env, "bob") == "hello from green"


# --------------------------------------------------------------------------
# 7. the stragglers report after mixed traffic
# --------------------------------------------------------------------------


def test_stragglers_after_mixed_traffic(env, proxy):
    cfg = config(env, admin={})
    cfg["listeners"].append(plain_imap_listener())
    proxy.reconfigure(cfg)  # a fresh process: an empty history

    assert which(env, "bob") == "hello from green"  # legacy, TLS (imaps)
    assert which(env, "carol", port=PLAIN_IMAP_PORT, tls=None) == "hello from green"  # legacy, plaintext
    assert which(env, "joeuser") == "hello from new"  # new, TLS
    assert c.pop3_which_host(PROXY_IP, POP3, "alice", USERS["alice"], "starttls",
                             env.ssl_context()) == "hello from new"  # new, TLS (STLS)

    cp = cli_ok("stragglers", "--config", proxy.config_path, "--hours", "1", "--json")
    rows = json.loads(cp.out)
    by_user = {}
    for row in rows:
        by_user.setdefault(row["user"], []).append(row)
    assert sorted(by_user) == ["bob", "carol"], rows
    (bob,), (carol,) = by_user["bob"], by_user["carol"]
    assert (bob["pool"], bob["protocol"], bob["listener"], bob["tls"], bob["why"]) == \
        ("legacy", "imap", "imaps", True, ["legacy_pool"]), bob
    assert (carol["pool"], carol["protocol"], carol["listener"], carol["tls"], carol["why"]) == \
        ("legacy", "imap", "imap-plain", False, ["legacy_pool", "no_tls"]), carol
    for row in rows:
        seen = calendar.timegm(time.strptime(row["last_seen"], "%Y-%m-%dT%H:%M:%SZ"))
        assert abs(seen - time.time()) < 120, row

    # the table for humans says the same
    text = cli_ok("stragglers", "--config", proxy.config_path, "--hours", "1").out
    assert "joeuser" not in text and "alice" not in text, text
    assert any(l.split()[:2] == ["bob", "legacy"] for l in text.splitlines()), text
    assert any(l.split()[:2] == ["carol", "legacy"] and "no_tls" in l for l in text.splitlines()), text
    assert "2 entries" in text, text


# --------------------------------------------------------------------------
# 8. cutover kick / hold / release on real sessions
# --------------------------------------------------------------------------


def test_kick_hold_release(env, proxy):
    proxy.reconfigure(config(env, admin={}))
    path = proxy.config_path

    # kick: bob's open session ends with an untagged BYE, then EOF
    kicked0 = metric("cutover_sessions_kicked_total", reason="admin")
    r, subj = open_session(env, "bob")
    try:
        assert subj == "hello from green"
        out = json.loads(cli_ok("kick", "--config", path, "bob").out)
        assert out == {"user": "bob", "kicked": 1}, out
        lines = c.read_until_eof(r, 10)
    finally:
        r.close()
    assert any(l.startswith(b"* BYE") and b"administrator" in l for _, l in lines), lines
    assert metric("cutover_sessions_kicked_total", reason="admin") >= kicked0 + 1
    # nobody else to kick
    assert json.loads(cli_ok("kick", "--config", path, "carol").out)["kicked"] == 0

    # hold: bob's next login waits ...
    released0 = metric("cutover_held_logins_total", result="released")
    assert json.loads(cli_ok("hold", "--config", path, "bob").out)["held"] is True
    holds = c.curl(f"http://{PROXY_IP}:{ADMIN_PORT}/holds")
    assert holds.returncode == 0 and "bob" in json.loads(holds.text)["held"], holds.text
    result = {}

    def login():
        try:
            result["subject"] = which(env, "bob")
        except Exception as e:  # noqa: BLE001
            result["error"] = e
        result["done"] = time.monotonic()

    off = proxy.log_size()
    waiter = threading.Thread(target=login, daemon=True)
    waiter.start()
    proxy.wait_log(r"login held", off)  # the login reached the hold
    # other users are not held meanwhile
    assert which(env, "carol") == "hello from green"
    waiter.join(1.0)  # bounded: it must still be waiting
    assert waiter.is_alive() and not result, f"the held login did not wait: {result}"
    # ... until release, then it goes through to the route in force
    t_release = time.monotonic()
    assert json.loads(cli_ok("release", "--config", path, "bob").out)["released"] is True
    waiter.join(10)
    assert not waiter.is_alive(), "the released login did not finish"
    assert result.get("subject") == "hello from green", result
    assert result["done"] >= t_release
    assert metric("cutover_held_logins_total", result="released") >= released0 + 1
    assert which(env, "bob") == "hello from green"  # no longer held

    # a held login past admin.hold_max_wait gets a temporary failure
    proxy.reconfigure(config(env, admin={"hold_max_wait": "1s"}))
    cli_ok("hold", "--config", path, "bob")
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        t = time.monotonic()
        tagged, _ = r.command("a1", f'LOGIN bob "{USERS["bob"]}"')
        waited = time.monotonic() - t
    assert tagged.startswith(b"a1 NO [UNAVAILABLE]"), r.dump()
    assert 0.9 <= waited < 10, waited
    assert metric("cutover_held_logins_total", result="timed_out") >= 1
    cli_ok("release", "--config", path, "bob")
    assert which(env, "bob") == "hello from green"


# --------------------------------------------------------------------------
# 9. the pop-before-smtp bridge
# --------------------------------------------------------------------------

BRIDGE_WINDOW = 5  # seconds


def swaks_refused(text):
    """swaks's transcript shows MAIL FROM answered with 530 5.7.0 (``<** `` in
    plaintext, ``<~* `` inside TLS mark an error reply)."""
    return re.search(r"^ ?~?> MAIL FROM:.*\n<[~*]\* 530 5\.7\.0 ", text, re.M) is not None


def smtp_mail_code(ctx, source):
    """From ``source``: EHLO, STARTTLS, EHLO and MAIL FROM on the compat listener without
    AUTH; returns the MAIL reply (code, text). Nothing is sent: RSET, QUIT."""
    return c.smtp_mail_code(smtplib.SMTP(PROXY_IP, COMPAT_SMTP_PORT, local_hostname="bridge.e2e.test",
                                         timeout=c.IO_TIMEOUT, source_address=(source, 0)), ctx)


def test_pop_before_smtp_bridge(env, proxy, servers):
    cfg = config(env)
    cfg["listeners"].append({"name": "smtp-compat", "protocol": "smtp",
                             "listen": f"{PROXY_IP}:{COMPAT_SMTP_PORT}", "tls": "starttls",
                             "relay": "pop-before-smtp", "window": f"{BRIDGE_WINDOW}s"})
    proxy.reconfigure(cfg)  # fresh process: no address has logged in yet
    # the bridge listener is not one start() waits for
    harness.wait_until(lambda: harness.port_open(PROXY_IP, COMPAT_SMTP_PORT), 10,
                       what="the compat listener")

    def send(tok, source=BRIDGE_SOURCE):
        return c.swaks(PROXY_IP, COMPAT_SMTP_PORT, mail_from="bob@example.net", to="friend@example.org",
                       tls="starttls", ca=env.ca, subject=tok, body=f"bridged {tok}", source=source)

    # before any POP3 login from this address: 530
    tok0 = c.token("bridge-before")
    cp = send(tok0)
    assert cp.returncode != 0 and swaks_refused(cp.text), cp.text

    # bob's POP3 login through the proxy from the same address opens the window
    t_before_login = time.time()
    conn = c.pop3_login(PROXY_IP, POP3, "bob", USERS["bob"], "starttls", env.ssl_context(),
                        source=BRIDGE_SOURCE)
    try:
        assert c.pop3_subject(conn) == "hello from green"
    finally:
        conn.quit()
    tok1 = c.token("bridge-within")
    cp = send(tok1)
    assert cp.returncode == 0, cp.text
    msg = servers.green.sink.wait_for(tok1)
    assert msg.mail_from == "bob@example.net" and msg.rcpt_tos == ["friend@example.org"], msg
    assert servers.sink_for(tok1) == ["green"]
    assert time.time() - t_before_login < BRIDGE_WINDOW, "too slow to test inside the window"

    # the window belongs to the address: another loopback address is still refused
    code, _ = smtp_mail_code(env.ssl_context(), OTHER_SOURCE)
    assert code == 530, code
    # plain AUTH keeps working on the compat listener (joeuser: new's submission)
    tok_auth = c.token("bridge-auth")
    cp = c.swaks(PROXY_IP, COMPAT_SMTP_PORT, user="joeuser", password=USERS["joeuser"],
                 tls="starttls", ca=env.ca, subject=tok_auth, source=OTHER_SOURCE)
    assert cp.returncode == 0, cp.text
    servers.new.sink.wait_for(tok_auth)

    # after the window: refused again (bounded poll; each probe is a fresh connection)
    def refused():
        code, _ = smtp_mail_code(env.ssl_context(), BRIDGE_SOURCE)
        return time.time() if code == 530 else None
    t_refused = c.wait_for(refused, BRIDGE_WINDOW + 10, interval=0.25,
                           what="the bridge window to close")
    closed_after = t_refused - t_before_login
    print(f"\n[bridge] refused again {closed_after:.2f}s after the POP3 login "
          f"(window {BRIDGE_WINDOW}s, kept in whole seconds)")
    assert closed_after > BRIDGE_WINDOW - 0.05, (
        f"refused {closed_after:.2f}s after the login, inside the {BRIDGE_WINDOW}s window")
    assert closed_after < BRIDGE_WINDOW + 2.5, f"window still open {closed_after:.2f}s after the login"
    tok2 = c.token("bridge-after")
    cp = send(tok2)
    assert cp.returncode != 0 and swaks_refused(cp.text), cp.text
    assert servers.sink_for(tok0) == [] and servers.sink_for(tok2) == []

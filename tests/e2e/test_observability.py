"""Observability, end to end (issue 5):

* ``test_dashboard_and_alert_queries_against_prometheus``: a REAL Prometheus
  (Debian's /usr/bin/prometheus, 127.0.0.1:19090, scrape and rule evaluation every
  1 s, job "cutover") scrapes the running proxy and loads dashboards/alerts.yml as
  its rule file. The proxy keeps shared state in a REAL ``redis-server`` of this
  module's own (127.0.0.40:16380, ``state.redis``, ``instance_name: e2e-proxy``), so
  that ``cutover_state_backend_up`` exists (and is 1) for the dashboard and for
  CutoverSharedStateDown. Two route lookups: one reads rows from that Redis (a row that
  routes, a row naming a pool that does not exist), one's database is gone. The test
  drives logins of every protocol (IMAP, POP3, SMTP) with every result (ok,
  auth_failed, backend_unavailable), a failover, a fallback, lookups answered, failed
  and refused, TLS both ways, a failed TLS handshake and a failed reload, waits (bounded) until
  Prometheus has scraped all of it, then evaluates EVERY PromQL expression of
  dashboards/cutover.json and dashboards/alerts.yml through /api/v1/query. Any
  invalid expression, or one that returns no series, fails the test.

  How alert expressions are evaluated: an alert expression is a condition
  (``x == 0``, ``a / b > 0.3 and c > 0.1``, ``absent(x)``) and rightly returns
  nothing while all is well. The test evaluates the whole expression (it must be
  valid) and then each operand: the expression is split at its top-level
  comparison (``== != > < >= <=``) and set (``and or unless``) operators, outer
  parentheses are removed and ``absent(x)`` / ``absent_over_time(x)`` is replaced
  by ``x``; every operand must return at least one series (a number literal
  returns a scalar, which counts) and, if it is a vector, carry the ``instance``
  label, so that the alert says which proxy it is about. Prometheus' own rule
  evaluation must also report every rule healthy, and the faults the test
  injects must show up as pending/firing alerts (CutoverLookupFailing for the lookup
  whose database is gone, never for the one that answers).

  Dashboard expressions are queries, not conditions: each must return series as
  written, after substituting ``$__rate_interval`` (and ``$__interval``,
  ``$__range``) with 1m, ``$job`` and ``$instance`` with ``.*``. The variables'
  ``label_values(selector, label)`` queries are checked the same way.

* ``promtool check rules dashboards/alerts.yml`` must pass, and ``promtool check
  metrics`` must find no problem in a scrape of the proxy taken after the traffic.

* ``test_lookup_alerts_fire_and_clear_in_time``: ``promtool test rules`` runs the
  expressions of CutoverLookupFailing and CutoverLookupRejectedRows on synthetic
  series: when they fire after a lookup's database goes down, that they stay while
  logins only hit the cache and clear once it answers again (no proxy needed).

* ``test_standby_alert_fires_and_clears_in_time``: the same for CutoverServedByStandby:
  standby logins for 10 minutes fire it, one failover never does, and it clears about 5
  minutes after the preferred server serves again.

* ``test_standby_logins_are_counted_when_the_first_server_is_known_down``: green's IMAP
  is stopped and the health checks mark it down; bob's logins then go straight to
  mauve (no attempt on green, no failover) and each one counts in
  ``cutover_logins_standby_total`` (issue 17 item 2). The Prometheus test above also
  sees the failover green -> mauve counted there, and CutoverServedByStandby pending.

* ``test_logs_carry_no_secrets``: cutover runs with ``--log-format json`` and
  CUTOVER_LOG=debug; the test logs in with every mechanism (IMAP LOGIN quoted and
  as literals, AUTHENTICATE PLAIN with SASL-IR and with a continuation, AUTHENTICATE
  LOGIN; POP3 USER/PASS, AUTH PLAIN both ways, AUTH LOGIN; SMTP AUTH PLAIN both
  ways and AUTH LOGIN; new and legacy pools, pop-before-smtp; right and wrong
  passwords) and then searches the whole log for every password (raw and escaped
  forms) and for every base64 encoding of it (SASL payloads, at any alignment):
  none may appear. Every log line must be a JSON object, and every line of one
  client session must carry the same session id (the ``id`` field of the
  ``session`` span).
"""

import base64
import binascii
import contextlib
import imaplib
import json
import poplib
import re
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import clients as c
import harness
from harness import METRICS_PORT, PROXY_IP, PROXY_PORTS, USERS

pytestmark = pytest.mark.proxy

REPO = harness.REPO
DASHBOARD = REPO / "dashboards" / "cutover.json"
ALERTS = REPO / "dashboards" / "alerts.yml"

PROMTOOL = "/usr/bin/promtool"
PROM_IP = "127.0.0.1"
PROM_PORT = 19090
PROM_JOB = "cutover"
PROM_BOUND = harness.PROM_BOUND  # seconds: bound for Prometheus to have scraped / evaluated something

#: this module's redis-server (shared state of the proxy under Prometheus): an address
#: of its own, so that it never meets test_fleet.py's (127.0.0.1:16379)
REDIS_IP = "127.0.0.40"
REDIS_PORT = 16380
#: the proxy's instance_name (the label of cutover_state_backend_up)
INSTANCE_NAME = "e2e-proxy"
#: bound (s) for the proxy to see its Redis (it connects at start; a heartbeat every 2 s)
REDIS_BOUND = 15.0

#: A pool whose servers do not exist (nothing listens on 127.0.0.13/.14): logins
#: routed there end in backend_unavailable, after a failover from .13 to .14.
DEAD_SERVERS = ("127.0.0.13", "127.0.0.14")
#: Routed to the dead pool without fallback (any password: it never gets checked).
NOBODY = "nobody"
#: Routed to the dead pool with `fallback: legacy`: served by green.
FALLBACK_USER = "carol"
STAGE = "wave-1"

#: Route lookups (the dashboard's "Route lookups" row, alerts CutoverLookupFailing and
#: CutoverLookupRejectedRows): LOOKUP reads rows from this module's Redis (database
#: LOOKUP_DB, key route:<user>), where LOOKUP_USER's row names the legacy pool (the pool
#: the next rule would give too) and BAD_ROW_USER's a pool that does not exist (the login
#: is refused, a rejected row). DEAD_LOOKUP's Redis does not exist (nothing listens on
#: 127.0.0.13:6379): every query of it fails, LOOKUP_USER's logins go on to the next
#: rule (on_error: next), and CutoverLookupFailing goes off for it.
LOOKUP = "mailboxes"
LOOKUP_DB = 1
DEAD_LOOKUP = "archive"
LOOKUP_USER = "bob"
BAD_ROW_USER = "dave"
LOOKUP_ROWS = {LOOKUP_USER: "legacy", BAD_ROW_USER: "nosuch"}


# --------------------------------------------------------------------------
# configuration used by these tests
# --------------------------------------------------------------------------


def observability_config(env):
    """The default proxy config plus a dead pool, a fallback route, a stage in force,
    shared state in this module's Redis with an instance_name and route lookups, one
    in that Redis and one whose database is gone (so that every labelled series of the
    catalogue has a reason to exist)."""
    cfg = harness.proxy_config(env)
    cfg["instance_name"] = INSTANCE_NAME
    # a generous bound: this test is about the metrics, not about Redis' latency on a
    # busy machine (a late call would turn cutover_state_backend_up to 0 for a while)
    cfg["state"] = {"redis": {"url": f"redis://{REDIS_IP}:{REDIS_PORT}/0",
                              "key_prefix": "cutover:", "timeout": "500ms"}}
    cfg["pools"]["gone"] = {
        "connect_timeout": "1s",
        "imap": {"servers": [f"{ip}:143" for ip in DEAD_SERVERS]},
        "pop3": {"servers": [f"{ip}:110" for ip in DEAD_SERVERS]},
        "smtp": {"servers": [f"{ip}:587" for ip in DEAD_SERVERS]},
    }
    cfg["lookups"] = {
        # a generous timeout, as for state.redis: a late answer would set off
        # CutoverLookupFailing for the healthy lookup on a busy machine
        LOOKUP: {"redis": {"url": f"redis://{REDIS_IP}:{REDIS_PORT}/{LOOKUP_DB}",
                           "key": "route:{user}"},
                 "timeout": "1s"},
        DEAD_LOOKUP: {"redis": {"url": f"redis://{DEAD_SERVERS[0]}:6379/0", "key": "route:{user}"},
                      "on_error": "next"},
    }
    cfg["stages"] = [{
        "name": STAGE,
        "from": "2020-01-01T00:00:00Z",  # in force since long ago
        "routes": [
            {"users": list(harness.NEW_USERS), "pool": "new"},
            {"users": [FALLBACK_USER], "pool": "gone", "fallback": "legacy"},
            {"users": [NOBODY], "pool": "gone"},
            {"users": [LOOKUP_USER], "lookup": DEAD_LOOKUP},
            {"lookup": LOOKUP},
            {"pool": "legacy"},
        ],
    }]
    return cfg


# --------------------------------------------------------------------------
# Prometheus answers
# --------------------------------------------------------------------------


def series_count(answer):
    """Number of series in a successful /api/v1/query answer (a scalar counts as 1)."""
    data = answer["data"]
    if data["resultType"] in ("scalar", "string"):
        return 1
    return len(data["result"])


# --------------------------------------------------------------------------
# PromQL expressions of the dashboard and the rules
# --------------------------------------------------------------------------

#: Grafana's variables and what the test puts in their place.
SUBSTITUTIONS = [
    ("${__rate_interval}", "1m"), ("$__rate_interval", "1m"),
    ("${__interval}", "1m"), ("$__interval", "1m"),
    ("${__range}", "1m"), ("$__range", "1m"),
    ("${job}", ".*"), ("$job", ".*"),
    ("${instance}", ".*"), ("$instance", ".*"),
]


def substitute(expr):
    for var, value in SUBSTITUTIONS:
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def dashboard_queries(dash):
    """(where, expr) for every PromQL expression of the dashboard: panel targets
    (also inside collapsed rows) and annotations."""
    out = []

    def panel_targets(panels):
        for p in panels:
            for i, t in enumerate(p.get("targets", [])):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} target {t.get('refId', i)}", t["expr"]))
            panel_targets(p.get("panels", []))

    panel_targets(dash.get("panels", []))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a.get('name')!r}", a["expr"]))
    return out


def variable_queries(dash):
    """(name, selector, label) of each ``label_values(selector, label)`` variable."""
    out = []
    for v in dash["templating"]["list"]:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q or "")
        assert m, f"variable {v['name']}: expected label_values(selector, label), got {q!r}"
        out.append((v["name"], m.group(1), m.group(2)))
    return out


_SET_OPS = re.compile(r"(and|or|unless)(?![a-zA-Z0-9_:])")
_MODIFIERS = re.compile(
    r"\s*(?:bool\b)?\s*(?:(?:on|ignoring)\s*\([^)]*\))?\s*(?:(?:group_left|group_right)\s*(?:\([^)]*\))?)?")


def split_top(expr):
    """Split ``expr`` at its top-level comparison and set operators (outside
    parentheses, braces, brackets and strings); returns the operands."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in ("==", "!=", ">=", "<=") if expr.startswith(o, i)), None)
            if op is None and ch in "<>":
                op = ch
            if op is None and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] in "_:")):
                m = _SET_OPS.match(expr, i)
                op = m.group(1) if m else None
            if op:
                parts.append(expr[start:i])
                i += len(op)
                i = _MODIFIERS.match(expr, i).end()
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def strip_parens(expr):
    expr = expr.strip()
    while expr.startswith("("):
        depth = 0
        for i, ch in enumerate(expr):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        if i != len(expr) - 1:
            break
        expr = expr[1:-1].strip()
    return expr


def operands(expr):
    """The expressions that must return series for a condition to be able to fire."""
    expr = strip_parens(expr)
    parts = split_top(expr)
    if len(parts) > 1:
        return [x for p in parts for x in operands(p)]
    m = re.fullmatch(r"(absent|absent_over_time)\s*\((.*)\)", expr, re.S)
    if m:
        return operands(m.group(2))
    return [expr]


def test_operands_splitter():
    """The splitter used to evaluate alert conditions (no proxy needed)."""
    assert operands("cutover_backend_up == 0") == ["cutover_backend_up", "0"]
    assert operands('up{job=~".*cutover.*"} == 0') == ['up{job=~".*cutover.*"}', "0"]
    assert operands('absent(cutover_build_info{job=~".*cutover.*"})') == \
        ['cutover_build_info{job=~".*cutover.*"}']
    assert operands("(a / b) > 0.3 and c > 0.1") == ["a / b", "0.3", "c", "0.1"]
    assert operands('x{result!="ok",reason=~"a|b"} >= bool 1') == ['x{result!="ok",reason=~"a|b"}', "1"]
    assert operands("a > on(pool) group_left(x) b unless c") == ["a", "b", "c"]
    assert operands("sum by (error, origin) (rate(errors_total[5m]))") == \
        ["sum by (error, origin) (rate(errors_total[5m]))"]
    assert operands("cutover_certificate_not_after_seconds - time() < 14 * 86400") == \
        ["cutover_certificate_not_after_seconds - time()", "14 * 86400"]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


def state_up():
    """cutover_state_backend_up{instance_name=INSTANCE_NAME} from the proxy's /metrics
    (None if absent)."""
    values = c.metric_values(scrape_text(), "cutover_state_backend_up", instance_name=INSTANCE_NAME)
    assert len(values) <= 1, values
    return values[0] if values else None


@pytest.fixture(scope="module")
def obs_redis(env):
    """This module's redis-server (REDIS_IP:REDIS_PORT, empty, no persistence), for
    observability_config's state.redis; stopped at the end of the module, also on
    failure (after the proxy went back to the default config, which has no Redis)."""
    if not Path(harness.REDIS_SERVER).exists():
        pytest.fail(f"{harness.REDIS_SERVER} missing: apt-get install redis-server "
                    "(scripts/test.sh does)", pytrace=False)
    redis = harness.Redis(env, REDIS_IP, REDIS_PORT, "obs-redis")
    try:
        redis.start()
        assert redis.cli("PING") == "PONG"
        yield redis
    finally:
        try:
            redis.stop()
        except Exception as e:  # report, but let the other fixtures clean up
            print(f"[e2e] stopping {redis.name}: {e}\n{redis.diagnostics(30)}")


@pytest.fixture
def obs_proxy(env, obs_redis, proxy):
    """The proxy restarted with observability_config (the default is put back after),
    once it says its shared state answers (cutover_state_backend_up == 1); the rows of
    lookup LOOKUP are in its Redis before."""
    for user, pool in LOOKUP_ROWS.items():
        assert obs_redis.cli("-n", LOOKUP_DB, "SET", f"route:{user}", pool) == "OK"
    proxy.reconfigure(observability_config(env))
    harness.wait_until(lambda: harness.port_open(PROXY_IP, METRICS_PORT), 10,
                       what="the metrics listener")
    c.wait_for(lambda: state_up() == 1, REDIS_BOUND, interval=0.1,
               what=f"cutover_state_backend_up{{instance_name={INSTANCE_NAME!r}}} == 1 "
                    f"(the proxy and its Redis {obs_redis.url})")
    return proxy


@pytest.fixture
def prometheus(env, obs_proxy):
    """A real Prometheus scraping the proxy and evaluating dashboards/alerts.yml;
    stopped (and its TSDB left in the temp dir) at the end, also on failure."""
    if not Path(harness.PROMETHEUS).exists():
        pytest.fail(f"{harness.PROMETHEUS} missing: apt-get install prometheus (scripts/test.sh does)",
                    pytrace=False)
    prom = harness.Prometheus(env.root / f"prometheus-{uuid.uuid4().hex[:8]}",
                              [f"{PROXY_IP}:{METRICS_PORT}"], job=PROM_JOB, ip=PROM_IP,
                              port=PROM_PORT, rule_files=[ALERTS])
    try:
        prom.start()
        prom.wait_ready()
        # the first scrape comes up to ~5 s after /-/ready (service discovery updates are
        # batched): wait for it, so that the traffic's counter increases are all seen
        c.wait_for(lambda: prom.value(f'up{{job="{PROM_JOB}"}}') == 1, PROM_BOUND, interval=0.2,
                   what="Prometheus' first scrape of the proxy")
        yield prom
    finally:
        try:
            prom.stop()
        except Exception as e:  # report, but let the other fixtures clean up
            print(f"[e2e] stopping prometheus: {e}\n{prom.diagnostics(30)}")


# --------------------------------------------------------------------------
# traffic
# --------------------------------------------------------------------------


def expect_failure(fn, what):
    try:
        fn()
    except (imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException) as e:
        return e
    raise AssertionError(f"{what}: login succeeded, expected a failure")


def imap_try(env, user, password, listener="imaps"):
    tls = "implicit" if listener == "imaps" else "starttls"
    conn = c.imap_connect(PROXY_IP, PROXY_PORTS[listener], tls, env.ssl_context())
    try:
        conn.login(user, password)
        return c.imap_subject(conn)
    finally:
        c.imap_logout(conn)


def pop3_try(env, user, password, listener="pop3s"):
    tls = "implicit" if listener == "pop3s" else "starttls"
    conn = c.pop3_connect(PROXY_IP, PROXY_PORTS[listener], tls, env.ssl_context())
    try:
        conn.user(user)
        conn.pass_(password)
        return c.pop3_subject(conn)
    finally:
        with contextlib.suppress(Exception):
            conn.quit()


def smtp_connect(env, listener="submissions"):
    if listener == "submissions":
        conn = smtplib.SMTP_SSL(PROXY_IP, PROXY_PORTS[listener], timeout=c.IO_TIMEOUT,
                                context=env.ssl_context())
        conn.ehlo("client.e2e.test")
    else:
        conn = smtplib.SMTP(PROXY_IP, PROXY_PORTS[listener], timeout=c.IO_TIMEOUT)
        conn.ehlo("client.e2e.test")
        conn.starttls(context=env.ssl_context())
        conn.ehlo("client.e2e.test")
    return conn


def smtp_try(env, user, password, listener="submissions"):
    conn = smtp_connect(env, listener)
    try:
        conn.login(user, password)
        code, _ = conn.noop()
        assert code == 250, code
        return code
    finally:
        with contextlib.suppress(Exception):
            conn.quit()
        conn.close()


def failed_tls_handshake(listener="imaps"):
    """Plaintext to an implicit-TLS listener: a failed client handshake."""
    with socket.create_connection((PROXY_IP, PROXY_PORTS[listener]), timeout=c.IO_TIMEOUT) as s:
        s.sendall(b"a CAPABILITY\r\n")
        s.settimeout(5)
        with contextlib.suppress(OSError):
            while s.recv(4096):
                pass


def drive_traffic(env, servers, proxy):
    """Logins of each protocol and result, a failover, a fallback, TLS both ways, a
    failed handshake, route lookups (answered, failed, a rejected row), a good and then
    a refused reload. Returns what was driven, by result."""
    ctx_new = "hello from new"
    done = {"ok": 0, "auth_failed": 0, "backend_unavailable": 0}
    joe, bob = USERS["joeuser"], USERS["bob"]
    wrong = f"wrong-{uuid.uuid4().hex[:12]}"

    # ok: new pool (STARTTLS and implicit TLS), legacy pool, fallback to legacy
    assert imap_try(env, "joeuser", joe, "imap") == ctx_new
    assert imap_try(env, "joeuser", joe, "imaps") == ctx_new
    assert imap_try(env, "bob", bob) == "hello from green"
    assert imap_try(env, FALLBACK_USER, USERS[FALLBACK_USER]) == "hello from green"
    assert pop3_try(env, "joeuser", joe, "pop3") == ctx_new
    assert pop3_try(env, "joeuser", joe, "pop3s") == ctx_new
    assert pop3_try(env, "bob", bob) == "hello from green"
    assert pop3_try(env, FALLBACK_USER, USERS[FALLBACK_USER]) == "hello from green"
    smtp_try(env, "joeuser", joe, "submission")
    smtp_try(env, "joeuser", joe, "submissions")
    smtp_try(env, "bob", bob)  # legacy: pop-before-smtp
    smtp_try(env, FALLBACK_USER, USERS[FALLBACK_USER])
    done["ok"] += 12

    # a failover inside the legacy pool: green's IMAP is down, mauve serves bob
    with servers.green.imap.stopped():
        assert imap_try(env, "bob", bob) == "hello from mauve"
    done["ok"] += 1

    # auth_failed, each protocol, both pools
    for user in ("joeuser", "bob"):
        expect_failure(lambda: imap_try(env, user, wrong), f"IMAP {user} wrong password")
        expect_failure(lambda: pop3_try(env, user, wrong), f"POP3 {user} wrong password")
        expect_failure(lambda: smtp_try(env, user, wrong), f"SMTP {user} wrong password")
        done["auth_failed"] += 3

    # backend_unavailable: routed to the dead pool
    expect_failure(lambda: imap_try(env, NOBODY, wrong), "IMAP to a dead pool")
    expect_failure(lambda: pop3_try(env, NOBODY, wrong), "POP3 to a dead pool")
    expect_failure(lambda: smtp_try(env, NOBODY, wrong), "SMTP to a dead pool")
    done["backend_unavailable"] += 3

    # route lookups: every login of bob above asked DEAD_LOOKUP (failed: the next rule)
    # and then LOOKUP (one query, then cache hits); a row naming a pool that does not
    # exist is refused (a temporary failure, not counted in `done`)
    expect_failure(lambda: imap_try(env, BAD_ROW_USER, wrong), "IMAP with a lookup row naming no pool")

    failed_tls_handshake("imaps")
    failed_tls_handshake("submissions")

    # a good reload, then a refused one (counted as error; the running configuration
    # stays, and cutover_config_last_reload_successful reads 0 until a valid file is saved)
    off = proxy.log_size()
    proxy.write_config(observability_config(env))
    proxy.sighup()
    proxy.wait_log(r"configuration reloaded", off)
    off = proxy.log_size()
    proxy.write_config("routes: [ this is not : valid\n")
    proxy.sighup()
    proxy.wait_log(r"reload failed", off)
    return done


# --------------------------------------------------------------------------
# the Prometheus test
# --------------------------------------------------------------------------


def scrape_text():
    return c.scrape_metrics(PROXY_IP, METRICS_PORT)


def wait_scraped(prom, expected_ok):
    """Bounded poll until Prometheus holds the proxy's current login counts."""
    def caught_up():
        direct = c.metric_sum(scrape_text(), "cutover_logins_total")
        seen = prom.value(f'sum(cutover_logins_total{{job="{PROM_JOB}"}})')
        ok = prom.value(f'sum(cutover_logins_total{{job="{PROM_JOB}", result="ok"}})')
        return seen is not None and seen >= direct and ok is not None and ok >= expected_ok
    c.wait_for(caught_up, PROM_BOUND, interval=0.5,
               what="Prometheus to scrape the proxy's login counters")


def evaluate_all(prom, items, must_have_instance=False, bound=20.0):
    """Evaluate (where, expr) items; retry the empty ones (series created by the last
    events need two scrapes inside a rate window) until ``bound``. Returns the list of
    problems (empty if all good)."""
    deadline = time.monotonic() + bound
    pending = list(items)
    problems = []
    while True:
        retry = []
        for where, expr in pending:
            ans = prom.query(expr)
            if ans.get("status") != "success":
                problems.append(f"{where}: INVALID ({ans.get('errorType')}: {ans.get('error')})\n    {expr}")
            elif series_count(ans) == 0:
                retry.append((where, expr))
            elif must_have_instance and ans["data"]["resultType"] == "vector":
                missing = [r["metric"] for r in ans["data"]["result"] if "instance" not in r["metric"]]
                if missing:
                    problems.append(f"{where}: series without an instance label {missing[:3]}\n    {expr}")
        if not retry or time.monotonic() >= deadline:
            problems += [f"{where}: NO SERIES\n    {expr}" for where, expr in retry]
            return problems
        pending = retry
        time.sleep(1.0)


def test_promtool_check_rules():
    cp = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, timeout=30)
    out = (cp.stdout + cp.stderr).decode("utf-8", "replace")
    assert cp.returncode == 0, out
    assert "SUCCESS" in out, out


def alert_rule(name):
    """expr, for and severity of alert ``name`` as dashboards/alerts.yml writes them
    (its block read as text: the e2e tests do without a YAML library)."""
    text = ALERTS.read_text(encoding="utf-8")
    m = re.search(rf"^( *)- alert: {name}\n(.*?)(?=^\1- alert: |^ *- name: |\Z)", text, re.S | re.M)
    assert m, f"no alert {name} in {ALERTS}"
    lines = m.group(2).splitlines()
    rule = {}
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "expr" and value in ("|", "|-", ">-"):
            indent = len(line) - len(line.lstrip())
            body = []
            for more in lines[i + 1:]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                body.append(more.strip())
            value = "\n".join(body).strip()
        if key in ("expr", "for", "severity") and key not in rule:
            rule[key] = value
    assert {"expr", "for", "severity"} <= set(rule), rule
    return rule


def promtool_test_rules(rules, tests):
    """``promtool test rules`` of ``tests`` (a list of promtool test cases) against a
    rules file holding ``rules`` (from alert_rule(), annotations left out so that the
    cases only say which alerts fire when). Scrapes and evaluations every 15 s."""
    group = {"name": "under-test", "rules": [
        {"alert": name, "expr": r["expr"], "for": r["for"], "labels": {"severity": r["severity"]}}
        for name, r in rules.items()]}
    with tempfile.TemporaryDirectory(prefix="cutover-promtool-") as d:
        (Path(d) / "rules.yml").write_text(json.dumps({"groups": [group]}, indent=1))
        # JSON is YAML: promtool reads both files as they are
        (Path(d) / "test.yml").write_text(json.dumps(
            {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": tests}, indent=1))
        cp = subprocess.run([PROMTOOL, "test", "rules", "test.yml"], cwd=d,
                            capture_output=True, timeout=60)
    out = (cp.stdout + cp.stderr).decode("utf-8", "replace")
    assert cp.returncode == 0, out
    assert "SUCCESS" in out, out


def test_lookup_alerts_fire_and_clear_in_time():
    """CutoverLookupFailing and CutoverLookupRejectedRows of dashboards/alerts.yml, run
    by promtool on synthetic series (one sample every 15 s). The database of lookup
    "mailboxes" stops answering at 5m: the alert fires within 1-2 minutes and clears
    within ~2 minutes of the first answer again; it stays while only cached users log
    in (no query: the gauge keeps its 0); and it fires on failures that the gauge
    misses (a database failing now and then)."""
    labels = 'job="cutover", instance="proxy:9898", lookup="mailboxes"'
    up = f"cutover_lookup_up{{{labels}}}"
    errors, timeouts = (f'cutover_lookup_queries_total{{{labels}, result="{r}"}}'
                        for r in ("error", "timeout"))
    rejected = f'cutover_lookup_rejected_rows_total{{{labels}, reason="unknown_pool"}}'
    failing = ("CutoverLookupFailing", {"severity": "critical"})
    refused = ("CutoverLookupRejectedRows", {"severity": "warning", "reason": "unknown_pool"})

    def case(alert, series, expect):
        """series: (selector, promtool values); expect: (eval time, fires)."""
        name, extra = alert
        fired = [{"exp_labels": {"job": "cutover", "instance": "proxy:9898", "lookup": "mailboxes",
                                 **extra}}]
        return {"interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [{"eval_time": t, "alertname": name,
                                     "exp_alerts": fired if fires else []} for t, fires in expect]}

    promtool_test_rules({n: alert_rule(n) for n in (failing[0], refused[0])}, [
        # down at 5m (every query fails: 3 per scrape), answers again at 10m15s
        case(failing, [(up, "1x19 0x20 1x40"), (errors, "0x19 3+3x20 63x40")],
             [("4m45s", False), ("5m45s", False), ("6m30s", True), ("10m", True), ("11m", True),
              ("12m30s", False), ("20m", False)]),
        # two timeouts at 5m, then only cached users log in (no query): still firing
        case(failing, [(up, "1x19 0x60"), (timeouts, "0x19 2x60")],
             [("6m30s", True), ("20m", True)]),
        # a query fails every 15 s, but the last one before each scrape is answered: the
        # gauge reads 1 at every scrape
        case(failing, [(up, "1x80"), (errors, "0x19 1+1x60")],
             [("4m45s", False), ("6m30s", True), ("20m", True)]),
        # one login refused at 5m for a row naming an unknown pool: ~10 minutes of warning
        case(refused, [(rejected, "0x19 1x60")],
             [("4m45s", False), ("6m30s", True), ("14m", True), ("16m", False)]),
    ])


def test_standby_alert_fires_and_clears_in_time():
    """CutoverServedByStandby of dashboards/alerts.yml, run by promtool on synthetic
    series (one sample every 15 s). From 5m on, pool legacy's IMAP logins are served by
    its standby (one more every 15 s) until 25m: pending at once, firing once that has
    lasted 10 minutes, clear about 5 minutes after the preferred server is back. One
    failover (a single standby login) never fires it."""
    labels = 'job="cutover", instance="proxy:9898", pool="legacy", protocol="imap"'
    standby = f"cutover_logins_standby_total{{{labels}}}"
    fired = [{"exp_labels": {"job": "cutover", "instance": "proxy:9898", "pool": "legacy",
                             "protocol": "imap", "severity": "warning"}}]

    def case(values, expect):
        return {"interval": "15s",
                "input_series": [{"series": standby, "values": values}],
                "alert_rule_test": [{"eval_time": t, "alertname": "CutoverServedByStandby",
                                     "exp_alerts": fired if fires else []} for t, fires in expect]}

    promtool_test_rules({"CutoverServedByStandby": alert_rule("CutoverServedByStandby")}, [
        case("0x19 1+1x80 81x60",
             [("4m45s", False), ("6m", False), ("14m", False), ("16m", True), ("25m", True),
              ("29m", True), ("31m", False), ("40m", False)]),
        # one failover at 5m: pending for 5 minutes, never firing
        case("0x19 1x100", [("6m", False), ("12m", False), ("16m", False), ("30m", False)]),
    ])


def test_standby_logins_are_counted_when_the_first_server_is_known_down(env, servers, proxy):
    """green's IMAP stopped, health checks every second mark it down; then every login of
    bob goes straight to mauve: counted as standby, not as a failover."""
    cfg = harness.proxy_config(env)
    cfg["pools"]["legacy"]["health"] = {"interval": "1s", "fall": 1, "rise": 1}
    proxy.reconfigure(cfg)
    harness.wait_until(lambda: harness.port_open(PROXY_IP, METRICS_PORT), 10,
                       what="the metrics listener")
    green = f"{harness.GREEN_IP}:143"

    def value(name, **labels):
        return c.metric_sum(scrape_text(), name, **labels)

    c.wait_for(lambda: value("cutover_backend_up", pool="legacy", protocol="imap", server=green) == 1,
               10, interval=0.2, what=f"{green} up")
    with servers.green.imap.stopped():
        c.wait_for(lambda: c.metric_values(scrape_text(), "cutover_backend_up", pool="legacy",
                                           protocol="imap", server=green) == [0.0],
                   10, interval=0.2, what=f"the health checks to mark {green} down")
        standby = value("cutover_logins_standby_total", pool="legacy", protocol="imap")
        failovers = value("cutover_failovers_total", pool="legacy", protocol="imap")
        for _ in range(3):
            assert imap_try(env, "bob", USERS["bob"]) == "hello from mauve"
        assert value("cutover_logins_standby_total", pool="legacy", protocol="imap") == standby + 3
        assert value("cutover_failovers_total", pool="legacy", protocol="imap") == failovers, \
            "green was known down: no attempt, no failover"
    # green back and up: bob is served by his preferred server again, not counted
    c.wait_for(lambda: value("cutover_backend_up", pool="legacy", protocol="imap", server=green) == 1,
               15, interval=0.2, what=f"the health checks to see {green} up again")
    assert imap_try(env, "bob", USERS["bob"]) == "hello from green"
    assert value("cutover_logins_standby_total", pool="legacy", protocol="imap") == standby + 3


def test_dashboard_is_importable_as_is():
    """Static checks of dashboards/cutover.json (Grafana import format)."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash.get("id") is None, "an importable dashboard has id null"
    assert dash.get("uid") and dash.get("title")
    assert 36 <= dash["schemaVersion"] <= 41, dash["schemaVersion"]
    inputs = dash.get("__inputs", [])
    assert any(i.get("type") == "datasource" and i.get("pluginId") == "prometheus" for i in inputs), inputs
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        v = variables[name]
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert v["type"] == "query" and q.startswith("label_values(cutover_build_info"), v
        assert q.endswith(f", {name})"), q
        assert v.get("includeAll") and v.get("allValue") == ".*", f"{name}: All must mean .*"
        assert v["datasource"]["uid"] == "${datasource}"

    ids, panels = set(), []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))
    walk(dash["panels"])
    for p in panels:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]

    queries = dashboard_queries(dash)
    assert len(queries) >= 30, len(queries)
    metric = re.compile(r"\b(cutover_[a-z_]+|process_[a-z_]+|up)\b(\{[^}]*\})?(?!\s*\()")
    for where, expr in queries:
        for m in metric.finditer(expr):
            if m.group(1) == "up" and not m.group(2):
                continue  # the word "up" outside a selector
            assert m.group(2) and 'job=~"$job"' in m.group(2) and 'instance=~"$instance"' in m.group(2), \
                f"{where}: {m.group(1)} is not filtered by job and instance: {expr}"
        for r in re.findall(r"\[([^\]]*)\]", expr):
            assert r == "$__rate_interval", f"{where}: range [{r}] instead of [$__rate_interval]: {expr}"
    titles = " ".join(p["title"].lower() for p in panels)
    for needed in ("share of logins by pool", "stage", "backend health", "failover", "fallback",
                   "login rate", "latency", "tls", "connections", "sessions", "bytes", "reload",
                   "kicked", "refused", "certificate", "memory", "cpu", "file descriptors", "build",
                   "lookup queries", "lookup answers", "hit ratio", "lookup query latency",
                   "lookup database", "rows rejected", "cache entries"):
        assert needed in titles, f"no panel about {needed!r}"


def test_dashboard_and_alert_queries_against_prometheus(env, servers, obs_proxy, prometheus):
    proxy, prom = obs_proxy, prometheus
    done = drive_traffic(env, servers, proxy)
    # one logged-in session stays open while the queries run (sessions_active = 1)
    held = c.imap_login(PROXY_IP, PROXY_PORTS["imaps"], "alice", USERS["alice"],
                        "implicit", env.ssl_context())
    try:
        wait_scraped(prom, done["ok"])
        # every result of every protocol arrived in Prometheus
        for proto in ("imap", "pop3", "smtp"):
            for result in done:
                v = prom.value(f'sum(cutover_logins_total{{job="{PROM_JOB}", protocol="{proto}", '
                               f'result="{result}"}})')
                assert v and v >= 1, f"Prometheus has no {proto} {result} login (got {v})"
        v = prom.value(f'sum(cutover_failovers_total{{job="{PROM_JOB}", pool="legacy", protocol="imap"}})')
        assert v and v >= 1, f"the failover green -> mauve was not counted ({v})"
        v = prom.value(f'sum(cutover_logins_standby_total{{job="{PROM_JOB}", pool="legacy", protocol="imap"}})')
        assert v and v >= 1, f"the login mauve served for green was not counted as standby ({v})"
        v = prom.value(f'sum(cutover_logins_standby_total{{job="{PROM_JOB}", pool="new"}})')
        assert v == 0, f"logins of the one-server pool counted as standby ({v})"
        v = prom.value(f'sum(cutover_fallbacks_total{{job="{PROM_JOB}", from="gone", to="legacy", '
                       f'reason="unavailable"}})')
        assert v and v >= 3, f"fallbacks gone -> legacy not counted ({v})"
        v = prom.value(f'sum(cutover_sessions_active{{job="{PROM_JOB}", pool="new", protocol="imap"}})')
        assert v == 1, f"the open IMAP session is not in cutover_sessions_active ({v})"
        # the shared state answered all along: its gauge, by instance_name, is 1
        gauge = f'cutover_state_backend_up{{job="{PROM_JOB}", instance_name="{INSTANCE_NAME}"}}'
        c.wait_for(lambda: prom.value(gauge) == 1, PROM_BOUND, interval=0.5,
                   what=f"Prometheus: {gauge} == 1")
        assert state_up() == 1, "the proxy lost its Redis during the traffic"

        # the route lookups: LOOKUP answered (a query, then cache hits) and refused a
        # row; DEAD_LOOKUP's queries all failed
        def lookups(metric, name, match=""):
            return prom.value(f'sum({metric}{{job="{PROM_JOB}", lookup="{name}"{match}}})')
        for metric, name, match, low, high in [
                ("cutover_lookup_up", LOOKUP, "", 1, 1),
                ("cutover_lookup_up", DEAD_LOOKUP, "", 0, 0),
                ("cutover_lookup_queries_total", LOOKUP, ', result="found"', 1, None),
                ("cutover_lookup_queries_total", LOOKUP, ', result=~"error|timeout"', 0, 0),
                ("cutover_lookup_cache_total", LOOKUP, ', result="hit"', 1, None),
                ("cutover_lookup_rejected_rows_total", LOOKUP, ', reason="unknown_pool"', 1, None),
                ("cutover_lookup_queries_total", DEAD_LOOKUP, ', result=~"error|timeout"', 1, None),
                ("cutover_lookup_queries_total", DEAD_LOOKUP, ', result=~"found|not_found"', 0, 0)]:
            v = lookups(metric, name, match)
            assert v is not None and v >= low and (high is None or v <= high), \
                f"{metric}{{lookup={name!r}{match}}} is {v}, expected {low}..{high}"

        # ---- the dashboard: every query returns series
        dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        items = [(where, substitute(expr)) for where, expr in dashboard_queries(dash)]
        problems = evaluate_all(prom, items)
        for name, selector, label in variable_queries(dash):
            ans = prom.query(substitute(selector))
            if ans.get("status") != "success":
                problems.append(f"variable {name}: INVALID {ans.get('error')}: {selector}")
            elif not any(label in r["metric"] for r in ans["data"]["result"]):
                problems.append(f"variable {name}: no series with a {label!r} label: {selector}")

        # ---- the rules, as Prometheus loaded them from dashboards/alerts.yml
        def rules_evaluated():
            ans = prom.api("/api/v1/rules")
            rules = [r for g in ans["data"]["groups"] for r in g["rules"]]
            if rules and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules):
                return rules
            return None
        rules = c.wait_for(rules_evaluated, PROM_BOUND, what="Prometheus to evaluate every rule")
        assert "CutoverSharedStateDown" in {r["name"] for r in rules}, \
            f"CutoverSharedStateDown not loaded: {sorted(r['name'] for r in rules)}"
        cp = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, timeout=30)
        found = re.search(rb"SUCCESS: (\d+) rules found", cp.stdout)
        assert found and int(found.group(1)) == len(rules), \
            f"Prometheus loaded {len(rules)} rules, promtool: {cp.stdout!r}"
        for r in rules:
            assert r["type"] == "alerting", r["name"]
            if r.get("health") != "ok" or r.get("lastError"):
                problems.append(f"rule {r['name']}: Prometheus says {r.get('health')}: {r.get('lastError')}")
            assert r.get("duration", 0) > 0, f"rule {r['name']} has no for:"
            assert r["labels"].get("severity") in ("info", "warning", "critical"), r["name"]
            assert r["annotations"].get("summary") and r["annotations"].get("description"), r["name"]
            full = prom.query(r["query"])
            if full.get("status") != "success":
                problems.append(f"rule {r['name']}: INVALID {full.get('error')}\n    {r['query']}")
        alert_items = [(f"rule {r['name']} operand {i}", op)
                       for r in rules for i, op in enumerate(operands(r["query"]))]
        problems += evaluate_all(prom, alert_items, must_have_instance=True)
        assert not problems, "dashboard/alert expressions failing:\n" + "\n".join(problems)
        print(f"\n[e2e] Prometheus evaluated {len(items)} dashboard queries, "
              f"{len(variable_queries(dash))} variables, {len(rules)} rules "
              f"({len(alert_items)} operands): all returned series")

        # ---- the injected faults are seen by the rules (pending, or firing after `for:`)
        want = {("CutoverConfigReloadFailed", None, None, None), ("CutoverPoolDown", "gone", None, None)}
        want |= {("CutoverBackendDown", "gone", f"{ip}:143", None) for ip in DEAD_SERVERS}
        want |= {("CutoverLookupFailing", None, None, DEAD_LOOKUP),
                 ("CutoverLookupRejectedRows", None, None, LOOKUP)}
        # mauve served bob for green: pending (it fires only if that lasts 10 minutes)
        want |= {("CutoverServedByStandby", "legacy", None, None)}
        seen = {}

        def active():
            alerts = prom.api("/api/v1/alerts")["data"]["alerts"]
            got = {(a["labels"]["alertname"], a["labels"].get("pool"), a["labels"].get("server"),
                    a["labels"].get("lookup")) for a in alerts}
            seen["missing"], seen["active"] = want - got, got
            return alerts if want <= got else None
        try:
            alerts = c.wait_for(active, PROM_BOUND,
                                what="alerts for the dead pool, the failed reload and the standby")
        except AssertionError:
            pytest.fail(f"alerts never became active: {sorted(seen['missing'], key=str)}; "
                        f"active: {sorted(seen['active'], key=str)}", pytrace=False)
        names = {(a["labels"]["alertname"], a["labels"].get("pool", a["labels"].get("lookup")))
                 for a in alerts}
        for bad in (("CutoverScrapeDown", None), ("CutoverMetricsAbsent", None),
                    ("CutoverPoolDown", "new"), ("CutoverPoolDown", "legacy"),
                    ("CutoverSharedStateDown", None), ("CutoverLookupFailing", LOOKUP),
                    ("CutoverServedByStandby", "new")):
            assert bad not in names, f"{bad} is active on a healthy setup: {alerts}"
    finally:
        c.imap_logout(held)

    # ---- promtool lints a scrape taken after all that traffic
    body = scrape_text().encode()
    (prom.dir / "cutover-scrape.txt").write_bytes(body)  # kept with the temp dir on failure
    cp = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert cp.returncode == 0, (cp.stdout + cp.stderr).decode("utf-8", "replace")


# --------------------------------------------------------------------------
# logs: no secrets, JSON, one session id per session
# --------------------------------------------------------------------------


def _b64_cores(secret):
    """Base64 text that appears in ANY base64 encoding of a byte string containing
    ``secret``, whatever its offset (3 alignments, the partial edge characters dropped)."""
    out = set()
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + secret).decode()
        start = (pad * 4 + 2) // 3  # characters touched by the padding bytes
        end = ((pad + len(secret)) // 3) * 4  # whole groups made of secret bytes only
        core = enc[start:end]
        if len(core) >= 8:
            out.add(core)
    return out


def _escape_bytes(raw, quote):
    """Printable ASCII as is, backslash and ``quote`` escaped, the rest as \\xNN."""
    out = []
    for b in raw:
        if b == 92 or b == quote[0]:
            out.append("\\" + chr(b))
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def secret_forms(password):
    """Spellings under which a password could leak into a log line."""
    raw = password.encode("utf-8")
    forms = {
        password,
        json.dumps(password)[1:-1],  # JSON / Rust Debug escaping
        json.dumps(password, ensure_ascii=True)[1:-1],
        raw.decode("ascii", "backslashreplace"),  # bytes shown as \xNN
        "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}" for b in raw),
        _escape_bytes(raw, quote=b'"'),  # Rust's escape_ascii / b"..." Debug
        _escape_bytes(raw, quote=b"'"),  # Python's repr of bytes
        ", ".join(str(b) for b in raw),  # a Debug-printed Vec<u8>
        binascii.hexlify(raw).decode(),
    }
    forms |= _b64_cores(raw)
    return {f for f in forms if len(f) >= 6}


def test_secret_forms_find_encoded_passwords():
    """The log search finds a password inside any base64 payload and in escaped forms
    (no proxy needed)."""
    for pw in (USERS["weird"], "joe-secret-1", "wrong-0123456789-3-\u00fc"):
        forms = secret_forms(pw)
        for prefix in ("", "a", "ab", "\0joeuser\0", "user\0user\0", "x" * 7):
            for suffix in ("", "z", "\r\n"):
                blob = base64.b64encode((prefix + pw + suffix).encode()).decode()
                assert any(f in blob for f in forms), (pw, prefix, suffix, blob)
        assert any(f in json.dumps({"m": pw}) for f in forms)
        assert any(f in repr(pw.encode()) for f in forms)
        assert not any(f in base64.b64encode(b"\0joeuser\0other-password").decode() for f in forms)


class LineClient:
    """A line-based client over implicit TLS (POP3 and SMTP) that records its local port."""

    def __init__(self, env, listener, source):
        sock = socket.create_connection((PROXY_IP, PROXY_PORTS[listener]), timeout=c.IO_TIMEOUT,
                                        source_address=(source, 0))
        self.peer = "%s:%d" % sock.getsockname()[:2]
        self.sock = env.ssl_context().wrap_socket(sock, server_hostname=PROXY_IP)
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode("utf-8"))

    def smtp_reply(self):
        """A whole (multi-line) SMTP reply; returns its last line."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


def test_logs_carry_no_secrets(env, servers, proxy, monkeypatch):
    """Every login mechanism, right and wrong passwords; the JSON debug log holds no
    password nor SASL payload, parses line by line, and keeps one id per session."""
    proxy.stop()
    off = proxy.log_size()
    # cutover's filter is CUTOVER_LOG (the harness sets it to debug unless the caller's
    # environment says otherwise): debug for this run whatever the caller chose
    monkeypatch.setitem(proxy.env, "CUTOVER_LOG", "debug")
    proxy.reconfigure(harness.proxy_config(env), log_format="json")

    ctx = env.ssl_context()
    tag = uuid.uuid4().hex[:10]
    # wrong passwords: unique, with the characters that need escaping in IMAP and JSON
    wrong = [f"wrong-{tag}-1", f'wr"o\\ng {{9}} {tag}-2', f"wrong-{tag}-3-ü"]
    secrets = [USERS[u] for u in ("joeuser", "alice", "bob", "carol", "weird")] + wrong
    # the sessions whose lines are checked, by client address: each connects from its own
    # loopback address (127.0.1.N), so that a reused ephemeral port cannot mix two sessions
    peers = {}
    sources = iter(f"127.0.1.{n}" for n in range(1, 250))

    def next_source():
        return next(sources)
    sessions = 0

    def plain(user, password, authz=""):
        return base64.b64encode(f"{authz}\0{user}\0{password}".encode()).decode()

    def b64(s):
        return base64.b64encode(s.encode()).decode()

    def imap_session(what, steps, listener="imaps"):
        """steps(r) drives a logged-out RawIMAP; returns the final tagged line."""
        nonlocal sessions
        r = c.RawIMAP(PROXY_IP, PROXY_PORTS[listener], "implicit", ctx, source=next_source())
        peers["%s:%d" % r.sock.getsockname()[:2]] = what
        sessions += 1
        try:
            return steps(r)
        finally:
            with contextlib.suppress(Exception):
                r.command("z", "LOGOUT")
            r.close()

    def imap_cmd(r, tag_, line, ok):
        tagged, _ = r.command(tag_, line)
        assert c.is_tagged_ok(tagged, tag_) == ok, f"{line[:20]}...: {r.dump()}"

    def imap_literal_login(r, user, password, ok, plus=False):
        u, p = user.encode(), password.encode()
        if plus:  # LITERAL+: no continuation
            r.send(b"l LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(u), u, len(p), p))
        else:
            r.send(b"l LOGIN {%d}\r\n" % len(u))
            assert r.readline().startswith(b"+"), r.dump()
            r.send(b"%s {%d}\r\n" % (u, len(p)))
            assert r.readline().startswith(b"+"), r.dump()
            r.send(p + b"\r\n")
        tagged, _ = r.read_until_tagged("l")
        assert c.is_tagged_ok(tagged, "l") == ok, r.dump()

    def imap_auth_plain_cont(r, blob, ok):
        r.send("p AUTHENTICATE PLAIN\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(blob + "\r\n")
        tagged, _ = r.read_until_tagged("p")
        assert c.is_tagged_ok(tagged, "p") == ok, r.dump()

    def imap_auth_login(r, user, password, ok):
        r.send("g AUTHENTICATE LOGIN\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(b64(user) + "\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(b64(password) + "\r\n")
        tagged, _ = r.read_until_tagged("g")
        assert c.is_tagged_ok(tagged, "g") == ok, r.dump()

    def q(s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    joe, bob, weird = USERS["joeuser"], USERS["bob"], USERS["weird"]
    # ---- IMAP
    imap_session("imap LOGIN quoted", lambda r: imap_cmd(r, "a", f"LOGIN joeuser {q(joe)}", True))
    imap_session("imap LOGIN quoted, wrong", lambda r: imap_cmd(r, "a", f"LOGIN joeuser {q(wrong[1])}", False))
    imap_session("imap LOGIN literal", lambda r: imap_literal_login(r, "weird", weird, True))
    imap_session("imap LOGIN literal+", lambda r: imap_literal_login(r, "bob", bob, True, plus=True))
    imap_session("imap LOGIN literal, wrong", lambda r: imap_literal_login(r, "alice", wrong[2], False))
    imap_session("imap PLAIN SASL-IR", lambda r: imap_cmd(
        r, "a", f"AUTHENTICATE PLAIN {plain('alice', USERS['alice'])}", True))
    imap_session("imap PLAIN SASL-IR, wrong", lambda r: imap_cmd(
        r, "a", f"AUTHENTICATE PLAIN {plain('joeuser', wrong[0])}", False))
    imap_session("imap PLAIN continuation", lambda r: imap_auth_plain_cont(r, plain("weird", weird), True))
    imap_session("imap PLAIN continuation, legacy", lambda r: imap_auth_plain_cont(
        r, plain("carol", USERS["carol"]), True))
    imap_session("imap LOGIN mechanism", lambda r: imap_auth_login(r, "joeuser", joe, True))
    imap_session("imap LOGIN mechanism, wrong", lambda r: imap_auth_login(r, "bob", wrong[0], False))
    # imaplib over STARTTLS (its own quoting)
    conn = c.imap_login(PROXY_IP, PROXY_PORTS["imap"], "alice", USERS["alice"], "starttls", ctx)
    c.imap_logout(conn)
    sessions += 1

    # ---- POP3
    def pop3_session(what, steps):
        nonlocal sessions
        cl = LineClient(env, "pop3s", next_source())
        peers[cl.peer] = what
        sessions += 1
        try:
            assert cl.line().startswith(b"+OK"), "no POP3 greeting"
            steps(cl)
        finally:
            with contextlib.suppress(Exception):
                cl.send("QUIT\r\n")
                cl.line()
            cl.close()

    def pop3_expect(cl, ok):
        line = cl.line()
        assert line.startswith(b"+OK" if ok else b"-ERR"), line

    def pop3_userpass(cl, user, password, ok):
        cl.send(f"USER {user}\r\n")
        pop3_expect(cl, True)
        cl.send(f"PASS {password}\r\n")
        pop3_expect(cl, ok)

    def pop3_plain_ir(cl, blob, ok):
        cl.send(f"AUTH PLAIN {blob}\r\n")
        pop3_expect(cl, ok)

    def pop3_plain_cont(cl, blob, ok):
        cl.send("AUTH PLAIN\r\n")
        assert cl.line().startswith(b"+"), "no continuation"
        cl.send(blob + "\r\n")
        pop3_expect(cl, ok)

    def pop3_login_mech(cl, user, password, ok):
        cl.send("AUTH LOGIN\r\n")
        assert cl.line().startswith(b"+")
        cl.send(b64(user) + "\r\n")
        assert cl.line().startswith(b"+")
        cl.send(b64(password) + "\r\n")
        pop3_expect(cl, ok)

    pop3_session("pop3 USER/PASS", lambda cl: pop3_userpass(cl, "joeuser", joe, True))
    pop3_session("pop3 USER/PASS legacy", lambda cl: pop3_userpass(cl, "bob", bob, True))
    pop3_session("pop3 USER/PASS, wrong", lambda cl: pop3_userpass(cl, "alice", wrong[0], False))
    pop3_session("pop3 AUTH PLAIN ir", lambda cl: pop3_plain_ir(cl, plain("weird", weird), True))
    pop3_session("pop3 AUTH PLAIN ir, wrong", lambda cl: pop3_plain_ir(cl, plain("bob", wrong[1]), False))
    pop3_session("pop3 AUTH PLAIN continuation", lambda cl: pop3_plain_cont(cl, plain("alice", USERS["alice"]), True))
    pop3_session("pop3 AUTH LOGIN", lambda cl: pop3_login_mech(cl, "carol", USERS["carol"], True))
    pop3_session("pop3 AUTH LOGIN, wrong", lambda cl: pop3_login_mech(cl, "joeuser", wrong[2], False))

    # ---- SMTP
    def smtp_session(what, steps):
        nonlocal sessions
        cl = LineClient(env, "submissions", next_source())
        peers[cl.peer] = what
        sessions += 1
        try:
            assert cl.smtp_reply().startswith(b"220"), "no SMTP greeting"
            cl.send("EHLO client.e2e.test\r\n")
            assert cl.smtp_reply().startswith(b"250")
            steps(cl)
        finally:
            with contextlib.suppress(Exception):
                cl.send("QUIT\r\n")
                cl.smtp_reply()
            cl.close()

    def smtp_expect(cl, ok):
        line = cl.smtp_reply()
        assert line.startswith(b"235" if ok else b"535"), line

    def smtp_plain_ir(cl, blob, ok):
        cl.send(f"AUTH PLAIN {blob}\r\n")
        smtp_expect(cl, ok)

    def smtp_plain_cont(cl, blob, ok):
        cl.send("AUTH PLAIN\r\n")
        assert cl.smtp_reply().startswith(b"334")
        cl.send(blob + "\r\n")
        smtp_expect(cl, ok)

    def smtp_login_mech(cl, user, password, ok):
        cl.send("AUTH LOGIN\r\n")
        assert cl.smtp_reply().startswith(b"334")
        cl.send(b64(user) + "\r\n")
        assert cl.smtp_reply().startswith(b"334")
        cl.send(b64(password) + "\r\n")
        smtp_expect(cl, ok)

    smtp_session("smtp AUTH PLAIN ir", lambda cl: smtp_plain_ir(cl, plain("joeuser", joe), True))
    smtp_session("smtp AUTH PLAIN ir, pop-before-smtp", lambda cl: smtp_plain_ir(cl, plain("bob", bob), True))
    smtp_session("smtp AUTH PLAIN ir, wrong", lambda cl: smtp_plain_ir(cl, plain("alice", wrong[1]), False))
    smtp_session("smtp AUTH PLAIN continuation", lambda cl: smtp_plain_cont(cl, plain("weird", weird), True))
    smtp_session("smtp AUTH PLAIN continuation, legacy wrong",
                  lambda cl: smtp_plain_cont(cl, plain("carol", wrong[0]), False))
    smtp_session("smtp AUTH LOGIN", lambda cl: smtp_login_mech(cl, "alice", USERS["alice"], True))
    smtp_session("smtp AUTH LOGIN, wrong", lambda cl: smtp_login_mech(cl, "joeuser", wrong[2], False))
    # swaks over STARTTLS (its own encoding), right and wrong
    cp = c.swaks(PROXY_IP, PROXY_PORTS["submission"], user="joeuser", password=joe,
                 tls="starttls", ca=env.ca, extra=["--quit-after", "AUTH"])
    assert cp.returncode == 0, cp.text
    cp = c.swaks(PROXY_IP, PROXY_PORTS["submission"], user="alice", password=wrong[0],
                 tls="starttls", ca=env.ca, extra=["--quit-after", "AUTH"])
    assert cp.returncode != 0, cp.text
    sessions += 2

    # every session has ended and logged its summary line
    proxy.wait_log(r'"session end"', off, timeout=20, count=sessions)
    text = proxy.log_since(off)  # this run's JSON log
    whole = proxy.log_text()  # the whole proxy.log: also the earlier tests' (text) logs

    # ---- 1. no secret, in any spelling, anywhere in the log
    leaks = []
    for s in secrets:
        for form in secret_forms(s):
            if form in whole:
                line = next(l for l in whole.splitlines() if form in l)
                leaks.append(f"{s!r} as {form!r} in: {line[:300]}")
    for s in secrets:  # the exact SASL payloads clients sent
        for user in USERS:
            for blob in (plain(user, s), plain(user, s, authz=user), b64(s)):
                if blob in whole:
                    leaks.append(f"SASL payload {blob!r} of {s!r} is in the log")
    assert not leaks, "secrets in the proxy log:\n" + "\n".join(leaks)

    # ---- 2. JSON, line by line
    records = []
    for n, line in enumerate(text.splitlines()):
        if not line.strip() or line.startswith("--- "):
            continue  # the harness' own start/restart markers
        try:
            rec = json.loads(line)
        except ValueError:
            pytest.fail(f"log line {n} is not JSON: {line[:300]}")
        assert isinstance(rec, dict) and "timestamp" in rec and "level" in rec, line[:300]
        records.append(rec)
    assert records, "no JSON log lines"
    assert any(r["level"] == "DEBUG" and r.get("target", "").startswith("cutover") for r in records), \
        "no debug line from cutover: the log filter is not at debug, the test would prove little"

    # ---- 3. one session id per session, on every line of that session
    def session_span(rec):
        spans = rec.get("spans") or ([rec["span"]] if rec.get("span") else [])
        return next((s for s in spans if s.get("name") == "session"), None)

    by_peer = {}
    for rec in records:
        sp = session_span(rec)
        if sp is None:
            continue
        assert "id" in sp, f"a session line without the session id: {rec}"
        if rec.get("span") and rec["span"].get("name") != "session":
            # an inner span is current: its list must still hold the session's
            assert rec.get("spans"), rec
        by_peer.setdefault(sp.get("peer"), []).append((sp["id"], rec))
    ids_seen = {}
    for peer, what in peers.items():
        lines = by_peer.get(peer, [])
        msgs = [r.get("message") for _, r in lines]
        assert "session end" in msgs, f"{what}: no 'session end' line with its span ({msgs})"
        assert any(m and m.startswith("login") for m in msgs), f"{what}: no login line in its span ({msgs})"
        ids = {i for i, _ in lines}
        assert len(ids) == 1, f"{what}: lines of one session carry ids {ids}"
        sid = ids.pop()
        assert sid not in ids_seen, f"{what} and {ids_seen.get(sid)} share session id {sid}"
        ids_seen[sid] = what
        # ... and no line of another connection carries that id
        other = [r for p, ls in by_peer.items() if p != peer for i, r in ls if i == sid]
        assert not other, f"{what}: id {sid} also on {other[:2]}"
    # the summary line of each session names its outcome and byte counts
    ends = [r for r in records if r.get("message") == "session end"]
    assert len(ends) >= sessions
    for r in ends:
        for field in ("outcome", "user", "pool", "server", "duration_ms", "bytes_up", "bytes_down"):
            assert field in r, f"session end without {field}: {r}"

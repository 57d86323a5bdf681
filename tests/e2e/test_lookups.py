"""Route lookups (``lookups:`` and ``{ lookup: NAME }`` rules) end to end: the real cutover
binary in front of the session's real Dovecot, reading users' pools (and pinned servers)
from a REAL PostgreSQL and a REAL ``redis-server``, driven by real clients (imaplib,
poplib, swaks), curl and the ``cutover`` CLI itself.

What runs, besides the session's Dovecot hosts and proxy (loopback only):

* PostgreSQL (``harness.Postgres``: initdb in the session's temp dir, ``postgres -c
  fsync=off`` as the ``postgres`` user when run as root) on 127.0.0.50:15432, database
  ``mail``, role ``cutover`` with trust authentication; started once for the module,
  stopped and started again by the tests that take the database away, and removed at
  the end. Its tables (``SCHEMA``):

  - ``mailbox_routes(username, pool, server)``: the provider's routing table;
  - ``query_log(username, at)``: one row per query cutover made, written by the query
    itself, so that the tests count queries AT THE DATABASE;
  - ``slow_users(username, seconds)``: the query of such a user sleeps that long.

  The lookup's query is ``SELECT pool, server FROM route_for($1)``, a plpgsql function
  doing all three (log, maybe sleep, return the row); one test uses the plain table
  query instead.
* ``redis-server`` on 127.0.0.51:16381 (``harness.Redis``, no persistence, flushed before
  every test): the ``migrated`` lookup (key ``migrated:{user}``: any value means "pool
  new") and, in one test, a lookup whose key ``route:{user}`` holds the pool as a string
  or a hash with ``pool`` and ``server``.
* Prometheus on 127.0.0.52:19090 (``harness.Prometheus``, one test only), scraping the
  proxy and loading ``dashboards/alerts.yml``.
* the proxy (``proxy.reconfigure()``; the default config comes back after each test) with
  an admin endpoint on 127.0.0.1:19899, ``on_move: kick`` without grace and, in the
  200-client test, a plaintext IMAP listener on 127.0.0.1:11146.

The routes of every test (``config()``), as an operator moving users by database would
write them::

    - { lookup: mailboxes }             # pool (and server) from PostgreSQL; no row: next rule
    - { lookup: migrated, pool: new }   # any key in Redis: pool new
    - { pool: legacy }

Which backend served a session is proven by the seeded "hello from <host>" message
(legacy's green is tried before mauve, so mauve serving means the pin worked).

Tests, one property each:

1. a row flips a user: "no row" is cached (negative TTL) until ``cutover forget``, then
   the row sends the user to new and their idling session on legacy is ended; a changed
   row takes effect when the found row's TTL (2 s) runs out, never before; the same move
   when ``cutover route --proxy`` read the new row first;
2. a row's server (a host, or host:port) serves the user first, also for a login name
   that normalizes to the row's; a server not in the pool, or a pool that does not
   exist, is a temporary failure counted in ``cutover_lookup_rejected_rows_total``; a
   pinned server that is down: the pool's others serve, unless ``pinned: strict``;
3. no row (and no key) falls through to the next rules; ``cutover route --json`` shows
   every answer asked (live), ``--proxy`` and ``GET /route`` the proxy's cache; a query
   with ``$2`` answers per protocol; a reload keeps the cache of an unchanged lookup
   and empties a changed one;
4. the database stopped: a stale answer serves, an uncached user gets IMAP ``NO
   [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``, SMTP ``454 4.7.0`` (never an authentication
   failure, not counted by the failed-login throttle), the lookup metrics say so, and
   with ``on_error: next`` the next rules decide; a real Prometheus evaluates
   ``cutover_lookup_up == 0`` and the ``CutoverLookupFailing`` alert;
5. a query that stalls (``pg_sleep``) fails the login at the 300 ms timeout, is cancelled
   on the server, and holds up nobody else; the whole database frozen (SIGSTOP): the
   same within the timeout, and it answers again when thawed;
6. 200 concurrent logins of one user make exactly one query, counted by the database;
7. Redis lookups: a string value (the pool), a hash (pool and server), any value for a
   rule with its own pool, a value naming no pool; Redis SIGKILLed and restarted.

About 30 s.
"""

import json
import poplib
import re
import shutil
import threading
import time

import pytest

import clients as c
import harness
from harness import ADMIN_PORT, GREEN_IP, MAUVE_IP, METRICS_PORT, NEW_IP, PROXY_IP, PROXY_PORTS, USERS

pytestmark = pytest.mark.proxy

IMAPS = PROXY_PORTS["imaps"]
POP3 = PROXY_PORTS["pop3"]
SUBMISSION = PROXY_PORTS["submission"]

#: this module's servers: an address of their own each (see the module docstring)
PG_IP, PG_PORT = "127.0.0.50", 15432
REDIS_IP, REDIS_PORT = "127.0.0.51", 16381
PROM_IP, PROM_PORT = "127.0.0.52", 19090
#: the 200-client test's plaintext IMAP listener (allow_plaintext_auth)
PLAIN_IMAP_PORT = 11146

#: in the lookup's URL (the role has trust authentication: never asked for); it must
#: not show up in any log or CLI output
PG_PASSWORD = "pg-url-secret-7f3a"

ALERTS = harness.REPO / "dashboards" / "alerts.yml"
LOOKUP_ALERT = "CutoverLookupFailing"

SCHEMA = """
CREATE TABLE mailbox_routes (
    username text PRIMARY KEY,
    pool     text,
    server   text
);
CREATE TABLE query_log (
    id       bigserial PRIMARY KEY,
    username text NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE slow_users (
    username text PRIMARY KEY,
    seconds  float8 NOT NULL
);
-- what cutover's query calls: logs the query, sleeps for slow users, returns the row
CREATE FUNCTION route_for(u text) RETURNS TABLE (pool text, server text)
LANGUAGE plpgsql AS $$
DECLARE
    delay float8;
BEGIN
    INSERT INTO query_log (username) VALUES (u);
    SELECT s.seconds INTO delay FROM slow_users s WHERE s.username = u;
    IF delay IS NOT NULL THEN
        PERFORM pg_sleep(delay);
    END IF;
    RETURN QUERY SELECT r.pool, r.server FROM mailbox_routes r WHERE r.username = u;
END
$$;
"""
QUERY = "SELECT pool, server FROM route_for($1)"
#: the plain form an operator would write (no query log, no sleep)
TABLE_QUERY = "SELECT pool, server FROM mailbox_routes WHERE username = $1"

#: what a temporary failure looks like to each protocol's client
IMAP_TEMPFAIL = "NO [UNAVAILABLE]"
POP3_TEMPFAIL = "-ERR [SYS/TEMP]"
SMTP_TEMPFAIL = "454 4.7.0"


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(env, request):
    """The module's PostgreSQL with SCHEMA; its directory is removed at the end (its log
    is kept, with the session's temp dir, when a test failed)."""
    db = harness.Postgres(env.root / "lookups-postgres", PG_IP, PG_PORT)
    try:
        db.start()
        db.psql(SCHEMA)
        yield db
    finally:
        db.stop()
        if request.session.testsfailed:
            shutil.rmtree(db.data, ignore_errors=True)
        else:
            db.remove()


@pytest.fixture
def db(pg):
    """The database, running (a test may have stopped or frozen it) and with empty tables."""
    pg.thaw()
    pg.start()
    pg.psql("TRUNCATE mailbox_routes, query_log, slow_users;")
    yield pg
    pg.thaw()
    pg.start()


@pytest.fixture(scope="module")
def redis_server(env):
    r = harness.Redis(env, REDIS_IP, REDIS_PORT, "lookups-redis")
    try:
        r.start()
        yield r
    finally:
        r.stop()


@pytest.fixture
def redis(redis_server):
    redis_server.start()
    redis_server.cli("FLUSHALL")
    return redis_server


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def config(env, db, redis, *, mailboxes=None, routes=None, lookups=None, listeners=()):
    """The default proxy config (TLS listeners, the new and legacy pools) with this
    module's lookups and routes, an admin endpoint, kick-on-move without grace and a
    short drain. ``mailboxes`` updates the PostgreSQL lookup's settings (``postgres``
    and ``cache`` merged key by key); ``lookups`` adds or replaces whole lookups."""
    cfg = harness.proxy_config(env)
    cfg["shutdown"] = {"drain_timeout": "1s"}
    cfg["admin"] = {"listen": f"{PROXY_IP}:{ADMIN_PORT}"}
    cfg["on_move"] = {"action": "kick", "grace": "0s"}
    mb = {
        "postgres": {"url": pg_url(db), "query": QUERY, "connections": 2},
        "timeout": "300ms",
        "cache": {"ttl": "60s", "negative_ttl": "60s", "max_entries": 100000, "stale_for": "5m"},
        "on_error": "tempfail",
        "pinned": "failover",
    }
    for k, v in (mailboxes or {}).items():
        if isinstance(v, dict) and isinstance(mb.get(k), dict):
            mb[k] = {**mb[k], **v}
        else:
            mb[k] = v
    cfg["lookups"] = {
        "mailboxes": mb,
        "migrated": {"redis": {"url": redis.url, "key": "migrated:{user}"}},
        **(lookups or {}),
    }
    cfg["routes"] = routes if routes is not None else [
        {"lookup": "mailboxes"},
        {"lookup": "migrated", "pool": "new"},
        {"pool": "legacy"},
    ]
    cfg["listeners"] = cfg["listeners"] + list(listeners)
    return cfg


def pg_url(db):
    """The lookup's connection string: db.url with a password (PG_PASSWORD)."""
    return f"postgres://{db.user}:{PG_PASSWORD}@{db.ip}:{db.port}/{db.database}"


def sql_text(v):
    return "NULL" if v is None else "'" + str(v).replace("'", "''") + "'"


def set_row(db, user, pool, server=None):
    db.psql(f"INSERT INTO mailbox_routes VALUES ({sql_text(user)}, {sql_text(pool)}, {sql_text(server)}) "
            "ON CONFLICT (username) DO UPDATE SET pool = EXCLUDED.pool, server = EXCLUDED.server;")


def queries(db, user):
    """Queries cutover made for ``user``, counted by the database (query_log)."""
    return int(db.psql(f"SELECT count(*) FROM query_log WHERE username = {sql_text(user)};"))


def metrics():
    return c.scrape_metrics(PROXY_IP, METRICS_PORT)


def lookup_metric(name, text=None, **labels):
    return c.metric_sum(text if text is not None else metrics(), name, **labels)


def which(env, user, protocol="imap"):
    """Log in through the proxy (IMAP implicit TLS, or POP3 with STLS); "hello from <host>"."""
    if protocol == "pop3":
        return c.pop3_which_host(PROXY_IP, POP3, user, USERS[user], tls="starttls", ctx=env.ssl_context())
    return c.imap_which_host(PROXY_IP, IMAPS, user, USERS[user], tls="implicit", ctx=env.ssl_context())


def imap_login_reply(env, user, password=None):
    """A raw IMAP LOGIN through the proxy (implicit TLS): (tagged reply text, seconds)."""
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        t0 = time.monotonic()
        tagged, _ = r.command("l", f'LOGIN "{user}" "{password or USERS[user]}"')
        took = time.monotonic() - t0
        if c.is_tagged_ok(tagged, "l"):
            r.command("o", "LOGOUT")
        return tagged.decode("utf-8", "replace"), took


def assert_imap_tempfail(env, user, password=None):
    reply, took = imap_login_reply(env, user, password)
    assert reply.startswith(f"l {IMAP_TEMPFAIL}"), f"{user}: {reply!r}"
    assert "AUTHENTICATIONFAILED" not in reply
    return took


def assert_pop3_tempfail(env, user):
    conn = c.pop3_connect(PROXY_IP, POP3, tls="starttls", ctx=env.ssl_context())
    try:
        conn.user(user)
        with pytest.raises(poplib.error_proto) as e:
            conn.pass_(USERS[user])
    finally:
        conn.close()
    reply = e.value.args[0].decode("utf-8", "replace")
    assert reply.startswith(POP3_TEMPFAIL), f"{user}: {reply!r}"
    assert "[AUTH]" not in reply


def assert_smtp_tempfail(env, user):
    cp = c.swaks(PROXY_IP, SUBMISSION, user=user, password=USERS[user], tls="starttls",
                 ca=str(env.ca), subject="lookup tempfail")
    # swaks prints the server's lines after "<~ " (TLS), failures after "<~* "
    replies = [re.sub(r"^<[~-]\*? ", "", l) for l in cp.text.splitlines() if re.match(r"^<[~-]", l)]
    assert any(l.startswith(SMTP_TEMPFAIL) for l in replies), cp.text
    assert not any(l.startswith(("535", "235")) for l in replies), cp.text
    assert cp.returncode != 0, cp.text


def cli_json(*args, rc=0):
    """``cutover ARGS``: its JSON output; the exit status must be ``rc`` (None: any)."""
    cp = c.cutover_cli(*args)
    assert rc is None or cp.returncode == rc, \
        f"cutover {' '.join(map(str, args))}: rc={cp.returncode}\n{cp.out}\n{cp.err}"
    return json.loads(cp.out)


def route_json(proxy, user, *extra, rc=0):
    return cli_json("route", "--config", proxy.config_path, "--json", *extra, user, rc=rc)


def logins(host, user):
    """Successful IMAP and POP3 logins of ``user`` on ``host``'s Dovecot."""
    return len(host.imap.logins(user)) + len(host.pop3.logins(user))


# --------------------------------------------------------------------------
# 1. a row flips a user: after `cutover forget`, after the TTL
# --------------------------------------------------------------------------

FLIP_TTL = 2.0  # seconds a found row is cached in test 1 (no row: 60 s)


def test_a_row_flips_a_user_after_forget_and_after_the_ttl(env, proxy, db, redis, servers):
    """bob has no row: legacy (green). A row sending him to new is inserted, but "no row"
    is cached for 60 s: still green, and no query reaches the database. `cutover forget`
    (the admin endpoint) makes the answer stale: the next login reads the row and lands
    on new, and bob's session idling on green is ended (on_move: kick). carol's row
    changes from new to legacy: she moves once the found row's TTL (2 s) has run out,
    never before."""
    proxy.reconfigure(config(env, db, redis, mailboxes={"cache": {"ttl": f"{FLIP_TTL:g}s"}}))

    assert which(env, "bob") == "hello from green"
    assert queries(db, "bob") == 1
    set_row(db, "bob", "new")
    hits0 = lookup_metric("cutover_lookup_cache_total", lookup="mailboxes", result="hit")
    r = c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context())
    try:
        tagged, _ = r.command("l", f'LOGIN "bob" "{USERS["bob"]}"')
        assert c.is_tagged_ok(tagged, "l"), r.dump()
        tagged, lines = r.command("s", "SELECT INBOX")
        assert c.is_tagged_ok(tagged, "s"), r.dump()
        assert which(env, "bob") == "hello from green", "the negative answer was not cached"
        assert queries(db, "bob") == 1, "a cached answer still queried the database"
        assert lookup_metric("cutover_lookup_cache_total", lookup="mailboxes", result="hit") >= hits0 + 2

        r.send("i IDLE\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        cp = c.cutover_cli("forget", "--config", proxy.config_path, "bob")
        assert cp.returncode == 0, f"{cp.out}\n{cp.err}"
        # both lookups had an answer cached ("no row" for each)
        assert json.loads(cp.out)["forgotten"] == 2, cp.out
        assert which(env, "bob") == "hello from new"
        assert queries(db, "bob") == 2
        # the new answer moves bob's session on green (on_move: kick, grace 0s)
        lines = c.read_until_eof(r, 10)
    finally:
        r.close()
    assert any(l.startswith(b"* BYE") and b"moved" in l for _, l in lines), lines

    # the TTL: carol's found row serves 2 s, then the database is asked again
    set_row(db, "carol", "new")
    t0 = time.monotonic()
    assert which(env, "carol") == "hello from new"
    set_row(db, "carol", "legacy")
    seen = []
    while True:
        subject = which(env, "carol")
        seen.append((round(time.monotonic() - t0, 2), subject))
        if subject == "hello from green":
            break
        assert subject == "hello from new", seen
        assert time.monotonic() - t0 < FLIP_TTL + 5, f"carol never moved: {seen}"
        time.sleep(0.2)
    took = seen[-1][0]
    print(f"\n[lookups] carol moved {took:.2f}s after her row was cached (ttl {FLIP_TTL}s): {seen}")
    assert took >= FLIP_TTL, f"moved before the TTL ran out: {seen}"
    assert queries(db, "carol") == 2, "more than one query per TTL"


def test_cutover_route_proxy_after_forget_still_moves_the_users_sessions(env, proxy, db, redis, servers):
    """As test 1, but the operator checks the new answer with `cutover route --proxy`
    (as one would after `cutover forget`) before the user's next login:
    carol's session idling on green must still be ended once her row sends her to new."""
    proxy.reconfigure(config(env, db, redis))
    r = c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context())
    try:
        tagged, _ = r.command("l", f'LOGIN "carol" "{USERS["carol"]}"')
        assert c.is_tagged_ok(tagged, "l"), r.dump()
        tagged, _ = r.command("s", "SELECT INBOX")
        assert c.is_tagged_ok(tagged, "s"), r.dump()
        r.send("i IDLE\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        set_row(db, "carol", "new")
        assert c.cutover_cli("forget", "--config", proxy.config_path, "carol").returncode == 0
        v = route_json(proxy, "carol", "--proxy")
        assert (v["pool"], v["lookup"]["cache"]) == ("new", "miss"), v
        assert which(env, "carol") == "hello from new"
        lines = c.read_until_eof(r, 3)
    finally:
        r.close()
    assert any(l.startswith(b"* BYE") and b"moved" in l for _, l in lines), lines


# --------------------------------------------------------------------------
# 2. a pinned server
# --------------------------------------------------------------------------


def test_a_row_pins_a_server_and_bad_rows_are_refused(env, proxy, db, redis, servers):
    """Legacy tries green first; a row naming mauve (a host: every protocol's server on
    it, IMAP, POP3 and SMTP submission; or host:port) makes mauve serve, also for a login name that normalizes to the
    row's (users.local_domains, case_insensitive). A row naming a server the pool does not have,
    or a pool that does not exist, is a temporary failure (never a backend connection,
    never an authentication failure), counted by reason."""
    cfg = config(env, db, redis)
    cfg["users"] = {"local_domains": ["example.net"], "case_insensitive": True}
    proxy.reconfigure(cfg)
    set_row(db, "bob", "legacy", MAUVE_IP)
    set_row(db, "carol", "legacy", f"{MAUVE_IP}:143")
    set_row(db, "alice", "legacy", NEW_IP)  # new's host is not in legacy
    set_row(db, "joeuser", "nowhere")
    m0 = metrics()

    n = len(servers.mauve.imap.logins("bob"))
    assert which(env, "bob") == "hello from mauve"
    servers.mauve.imap.wait_login("bob", n)
    # the query gets the normalized name ($1), as the backend does
    assert c.imap_which_host(PROXY_IP, IMAPS, "BOB@Example.NET", USERS["bob"], tls="implicit",
                             ctx=env.ssl_context()) == "hello from mauve"
    assert servers.mauve.imap.wait_login("bob", n + 1)["user"] == "bob"
    assert db.psql("SELECT string_agg(username, ',') FROM query_log;") == "bob"
    assert which(env, "bob", "pop3") == "hello from mauve"
    assert which(env, "carol") == "hello from mauve"
    # submission: the legacy pool's pop-before-smtp, on the pinned host (its POP3 checks
    # the password, its SMTP takes the message)
    tok = c.token("pinned")
    n = len(servers.mauve.pop3.logins("bob"))
    cp = c.swaks(PROXY_IP, SUBMISSION, user="bob", password=USERS["bob"], tls="starttls",
                 ca=str(env.ca), subject=tok, body=tok)
    assert cp.returncode == 0, cp.text
    servers.mauve.sink.wait_for(tok)
    assert servers.sink_for(tok) == ["mauve"]
    servers.mauve.pop3.wait_login("bob", n)

    before = {h.name: logins(h, "alice") + logins(h, "joeuser") for h in servers.hosts}
    assert_imap_tempfail(env, "alice")
    assert_imap_tempfail(env, "joeuser")
    assert_pop3_tempfail(env, "alice")
    m1 = metrics()
    bad = lambda text, reason: c.metric_sum(text, "cutover_lookup_rejected_rows_total",  # noqa: E731
                                            lookup="mailboxes", reason=reason)
    assert bad(m1, "unknown_server") == bad(m0, "unknown_server") + 2, m1
    assert bad(m1, "unknown_pool") == bad(m0, "unknown_pool") + 1, m1
    assert f'"{NEW_IP}" is not one of pool "legacy"\'s imap servers' in proxy.log_text()
    assert {h.name: logins(h, "alice") + logins(h, "joeuser") for h in servers.hosts} == before, \
        "a refused row reached a backend"


def test_a_pinned_server_that_is_down_fails_over_or_not_when_strict(env, proxy, db, redis, servers):
    """bob is pinned to mauve. mauve's IMAP down: with `pinned: failover` (default) green
    serves him; with `pinned: strict` his login fails temporarily."""
    set_row(db, "bob", "legacy", MAUVE_IP)
    with servers.mauve.imap.stopped():
        proxy.reconfigure(config(env, db, redis))
        assert which(env, "bob") == "hello from green"
        proxy.reconfigure(config(env, db, redis, mailboxes={"pinned": "strict"}))
        assert route_json(proxy, "bob")["servers"] == [f"{MAUVE_IP}:143"]
        assert_imap_tempfail(env, "bob")
    # mauve back (a fresh proxy: no health history)
    proxy.reconfigure(config(env, db, redis, mailboxes={"pinned": "strict"}))
    assert which(env, "bob") == "hello from mauve"


# --------------------------------------------------------------------------
# 3 and 8. no row falls through; `cutover route` asks live, `--proxy` asks the proxy
# --------------------------------------------------------------------------


def test_no_row_falls_through_and_cutover_route_shows_every_answer(env, proxy, db, redis, servers):
    """The plain table query, its URL read from a file (url_file). carol: no row, no
    key: the default rule (legacy), and `cutover route --json` lists both answers asked.
    bob: a row pinning mauve: pool, rule, servers (the pinned one first), the deciding
    answer and its cache state ("miss": the CLI asked PostgreSQL itself); through the
    proxy's admin endpoint (`--proxy`) after a login: "hit"."""
    url_file = env.root / "lookups-pg-url"
    url_file.write_text(pg_url(db) + "\n")
    proxy.reconfigure(config(env, db, redis, mailboxes={
        "postgres": {"url": None, "url_file": str(url_file), "query": TABLE_QUERY}}))
    set_row(db, "bob", "legacy", MAUVE_IP)
    redis.cli("SET", "migrated:alice", "2026-11-30")

    assert which(env, "carol") == "hello from green"
    v = route_json(proxy, "carol")
    assert (v["pool"], v["rule_index"], v["lookup"]) == ("legacy", 2, None), v
    assert v["servers"] == [f"{GREEN_IP}:143", f"{MAUVE_IP}:143"], v
    assert v["lookups"] == [{"name": "mailboxes", "row": None, "cache": "miss"},
                            {"name": "migrated", "row": None, "cache": "miss"}], v
    cp = c.cutover_cli("route", "--config", proxy.config_path, "carol")
    assert cp.returncode == 0, cp.err
    assert "lookup mailboxes: no row" in cp.out and "lookup migrated: no row" in cp.out, cp.out

    # a Redis key after no row: the migrated rule, pool new whatever the value
    assert which(env, "alice") == "hello from new"
    v = route_json(proxy, "alice")
    assert (v["pool"], v["rule_index"]) == ("new", 1), v
    assert v["lookup"] == {"name": "migrated", "row": {"pool": "2026-11-30", "server": None},
                           "cache": "miss"}, v
    assert [l["name"] for l in v["lookups"]] == ["mailboxes", "migrated"], v

    v = route_json(proxy, "bob")
    row = {"pool": "legacy", "server": MAUVE_IP}
    assert (v["pool"], v["rule_index"], v["pinned"]) == ("legacy", 0, f"{MAUVE_IP}:143"), v
    assert "lookup mailboxes" in v["rule"], v
    assert v["servers"] == [f"{MAUVE_IP}:143", f"{GREEN_IP}:143"], v
    assert v["lookup"] == {"name": "mailboxes", "row": row, "cache": "miss"}, v
    assert v["lookups"] == [v["lookup"]], v
    v = route_json(proxy, "bob", "--protocol", "pop3")
    assert v["servers"][0] == f"{MAUVE_IP}:110", v

    assert which(env, "bob") == "hello from mauve"
    v = route_json(proxy, "bob", "--proxy")
    assert (v["pool"], v["servers"][0]) == ("legacy", f"{MAUVE_IP}:143"), v
    assert v["lookup"] == {"name": "mailboxes", "row": row, "cache": "hit"}, v
    # the CLI without --proxy has no cache: it asks again
    assert route_json(proxy, "bob")["lookup"]["cache"] == "miss"
    # the admin endpoint, with curl
    cp = c.curl(f"http://{PROXY_IP}:{ADMIN_PORT}/route?user=carol&protocol=pop3")
    assert cp.returncode == 0, cp.text
    v = json.loads(cp.text)
    assert v["pool"] == "legacy" and v["servers"][0] == f"{GREEN_IP}:110", v
    assert [l["cache"] for l in v["lookups"]] == ["hit", "hit"], v


# --------------------------------------------------------------------------
# 3b. the protocol as $2; reloads and caches
# --------------------------------------------------------------------------


def test_a_query_taking_the_protocol_answers_per_protocol(env, proxy, db, redis, servers):
    """A query with $2 gets the protocol: answers are cached per protocol, and forget
    makes all of them stale."""
    q = ("SELECT CASE WHEN $2 = 'pop3' THEN 'legacy' ELSE pool END AS pool, server "
         "FROM route_for($1)")
    proxy.reconfigure(config(env, db, redis, mailboxes={"postgres": {"query": q}}))
    set_row(db, "bob", "new")
    assert which(env, "bob") == "hello from new"
    assert which(env, "bob", "pop3") == "hello from green"
    assert which(env, "bob", "pop3") == "hello from green"
    assert queries(db, "bob") == 2  # one per protocol, then cached
    assert route_json(proxy, "bob", "--protocol", "pop3")["pool"] == "legacy"
    cp = c.cutover_cli("forget", "--config", proxy.config_path, "bob")
    assert cp.returncode == 0 and json.loads(cp.out)["forgotten"] == 1, cp.out
    set_row(db, "bob", "legacy", MAUVE_IP)
    assert which(env, "bob") == "hello from mauve"
    assert which(env, "bob", "pop3") == "hello from mauve"


def test_a_reload_keeps_the_cache_of_an_unchanged_lookup_only(env, proxy, db, redis, servers):
    """SIGHUP with the same lookup settings (another part of the file changed): the
    cached "no row" of bob stays. A reload that changes the lookup's settings starts it
    with an empty cache: the row is read."""
    cfg = config(env, db, redis)
    proxy.reconfigure(cfg)
    assert which(env, "bob") == "hello from green"
    set_row(db, "bob", "new")

    def reload(new_cfg):
        ok0 = lookup_metric("cutover_config_reloads_total", result="ok")
        proxy.write_config(new_cfg)
        proxy.sighup()
        c.wait_for(lambda: lookup_metric("cutover_config_reloads_total", result="ok") >= ok0 + 1,
                   10, interval=0.05, what="a successful reload")
    cfg["lookups"]["migrated"]["timeout"] = "400ms"  # the other lookup changes
    reload(cfg)
    assert which(env, "bob") == "hello from green"
    assert queries(db, "bob") == 1
    cfg = config(env, db, redis, mailboxes={"timeout": "350ms"})
    reload(cfg)
    assert which(env, "bob") == "hello from new"
    assert queries(db, "bob") == 2


# --------------------------------------------------------------------------
# 4. the database stops: stale answers serve, the others fail temporarily
# --------------------------------------------------------------------------


def test_database_down_stale_answers_serve_others_fail_temporarily(env, proxy, db, redis, servers):
    """bob's row is cached, then made stale (POST /forget with curl), then PostgreSQL is
    stopped. bob still logs in (stale answer); carol, never cached, gets a temporary
    failure in IMAP, POP3 and SMTP, never an authentication failure (the failed-login
    throttle, at 2 per user here, does not count them); the metrics say so. The database
    back, carol logs in. With `on_error: next` and the database down again, carol goes
    to the next rules instead (legacy; alice, with a Redis key: new)."""
    cfg = config(env, db, redis)
    cfg["auth_throttle"] = {"user_failures": 2, "ip_failures": 100000, "delay": "1ms",
                            "max_delay": "1ms", "window": "60s", "block": "60s"}
    proxy.reconfigure(cfg)
    set_row(db, "bob", "new")
    set_row(db, "carol", "new")
    assert which(env, "bob") == "hello from new"
    cp = c.curl("-X", "POST", f"http://{PROXY_IP}:{ADMIN_PORT}/forget?user=bob")
    assert cp.returncode == 0, cp.text
    assert json.loads(cp.text) == {"user": "bob", "forgotten": 1, "fleet": False}, cp.text
    m0 = metrics()

    db.stop()
    assert which(env, "bob") == "hello from new", "the stale answer did not serve"
    assert_imap_tempfail(env, "carol")
    assert_pop3_tempfail(env, "carol")
    assert_smtp_tempfail(env, "carol")
    m1 = metrics()
    d = lambda name, **l: c.metric_sum(m1, name, **l) - c.metric_sum(m0, name, **l)  # noqa: E731
    assert c.metric_values(m1, "cutover_lookup_up", lookup="mailboxes") == [0.0], m1
    assert c.metric_values(m1, "cutover_lookup_up", lookup="migrated") == [1.0], m1
    failed = (d("cutover_lookup_queries_total", lookup="mailboxes", result="error")
              + d("cutover_lookup_queries_total", lookup="mailboxes", result="timeout"))
    assert failed >= 4, m1
    assert d("cutover_lookup_cache_total", lookup="mailboxes", result="stale") == 1, m1
    assert d("cutover_lookup_cache_total", lookup="mailboxes", result="error") >= 3, m1
    assert d("cutover_logins_total", result="auth_failed") == 0, m1
    assert d("cutover_logins_total", result="refused") == 3, m1
    assert "lookup: the database does not answer" in proxy.log_text()
    # `cutover route` asks live: no decision, a temporary one, and why
    v = route_json(proxy, "carol", rc=1)
    assert v["temporary"] is True and "mailboxes" in v["error"], v
    [asked] = v["lookups"]
    assert (asked["name"], asked["row"], asked["cache"]) == ("mailboxes", None, "error"), v
    assert "refused" in asked["error"] and "postgres://" not in asked["error"], v
    cp = c.cutover_cli("route", "--config", proxy.config_path, "carol")
    assert cp.returncode == 1 and "no decision" in cp.out, cp.out + cp.err
    assert PG_PASSWORD not in cp.out + cp.err

    # the database back: carol logs in (three temporary failures did not block her)
    db.start()
    assert which(env, "carol") == "hello from new"
    assert c.metric_values(metrics(), "cutover_lookup_up", lookup="mailboxes") == [1.0]

    # on_error: next -> the next rules decide
    redis.cli("SET", "migrated:alice", "yes")
    proxy.reconfigure(config(env, db, redis, mailboxes={"on_error": "next"}))
    db.stop()
    assert which(env, "carol") == "hello from green"
    assert which(env, "alice") == "hello from new"
    m2 = metrics()
    assert c.metric_values(m2, "cutover_lookup_up", lookup="mailboxes") == [0.0], m2
    assert c.metric_sum(m2, "cutover_lookup_cache_total", lookup="mailboxes", result="error") == 2, m2
    # the connection string's password appears nowhere
    assert PG_PASSWORD not in proxy.log_text()
    assert PG_PASSWORD not in metrics()


def test_prometheus_sees_the_lookup_failing(env, proxy, db, redis):
    """A real Prometheus scrapes the proxy (alerts.yml loaded): the database stopped,
    `cutover_lookup_up{lookup="mailboxes"} == 0` and the CutoverLookupFailing alert."""
    proxy.reconfigure(config(env, db, redis))
    prom = harness.Prometheus(env.root / "lookups-prometheus", [f"{PROXY_IP}:{METRICS_PORT}"],
                              job="cutover", ip=PROM_IP, port=PROM_PORT, rule_files=[ALERTS])
    try:
        prom.start()
        prom.wait_ready()
        set_row(db, "bob", "new")
        assert which(env, "bob") == "hello from new"
        c.wait_for(lambda: prom.value('cutover_lookup_up{lookup="mailboxes"}') == 1, 30,
                   interval=0.5, what="Prometheus to scrape cutover_lookup_up 1")
        db.stop()

        def failing(expr):
            # every login of carol asks the stopped database (errors are not cached)
            assert_imap_tempfail(env, "carol")
            return prom.series(expr)
        down = c.wait_for(lambda: failing('cutover_lookup_up{lookup="mailboxes"} == 0'), 20,
                          interval=0.5, what="Prometheus: cutover_lookup_up == 0")
        assert len(down) == 1, down
        c.wait_for(lambda: failing('increase(cutover_lookup_queries_total{lookup="mailboxes",'
                                   'result=~"error|timeout"}[1m]) > 0'), 20, interval=0.5,
                   what="Prometheus: failed lookup queries")

        if LOOKUP_ALERT not in ALERTS.read_text():
            # NOTE: CutoverLookupFailing came with a separate change to dashboards/alerts.yml;
            # without it this part cannot run (an xfail, not a pass, so that it shows).
            pytest.xfail(f"{LOOKUP_ALERT} is not in dashboards/alerts.yml")
        alerts = c.wait_for(lambda: failing(f'ALERTS{{alertname="{LOOKUP_ALERT}"}}'), 30,
                            interval=0.5, what=f"the {LOOKUP_ALERT} alert (pending or firing)")
        assert {a["metric"]["alertstate"] for a in alerts} <= {"pending", "firing"}, alerts
        health = prom.api("/api/v1/rules")
        bad = [r for g in health["data"]["groups"] for r in g["rules"]
               if r.get("name") == LOOKUP_ALERT and r.get("health") != "ok"]
        assert not bad, bad
    finally:
        prom.stop()


# --------------------------------------------------------------------------
# 5. a stalled query hits its timeout
# --------------------------------------------------------------------------


def test_a_stalled_query_hits_its_timeout_and_others_go_on(env, proxy, db, redis, servers):
    """carol's query sleeps 3 s; the lookup's timeout is 300 ms: her login fails
    temporarily well before 3 s, the query is cancelled on the server, and bob's login
    right after works (the stalled connection is not in his way). Then the whole
    database hangs: a stale answer serves and an uncached user fails, both within the
    timeout; thawed, the database answers again."""
    proxy.reconfigure(config(env, db, redis))
    set_row(db, "carol", "new")
    set_row(db, "bob", "new")
    db.psql("INSERT INTO slow_users VALUES ('carol', 3);")
    t0 = lookup_metric("cutover_lookup_queries_total", lookup="mailboxes", result="timeout")

    t_query = time.monotonic()
    took = assert_imap_tempfail(env, "carol")
    assert took < 1.5, f"the login waited {took:.2f}s for a 300ms lookup timeout"
    t_bob = time.monotonic()
    assert which(env, "bob") == "hello from new"
    bob_took = time.monotonic() - t_bob
    assert bob_took < 1.5, f"bob's login took {bob_took:.2f}s behind the stalled query"

    # the stalled query was cancelled on the server, long before its 3 s sleep ended
    def still_running():
        return int(db.psql("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                           "AND state = 'active' AND query LIKE '%route_for%';"))
    c.wait_for(lambda: still_running() == 0, 5, interval=0.05, what="the stalled query to end")
    ended = time.monotonic() - t_query
    print(f"\n[lookups] stalled login refused after {took:.2f}s, bob's took {bob_took:.2f}s; "
          f"the query ended on the server after {ended:.2f}s")
    assert ended < 2.5, f"the stalled query ran {ended:.2f}s: not cancelled"
    m = metrics()
    assert c.metric_sum(m, "cutover_lookup_queries_total", lookup="mailboxes", result="timeout") == t0 + 1, m
    assert c.metric_values(m, "cutover_lookup_up", lookup="mailboxes") == [1.0], m

    # the whole database hangs (every PostgreSQL process SIGSTOPped: connections are
    # still accepted by the kernel, nothing answers). bob's answer, made stale, serves
    # after the timeout; erin (nothing cached, no mailbox anywhere) fails temporarily
    db.psql("DELETE FROM slow_users; UPDATE mailbox_routes SET pool = 'legacy', server = "
            f"'{MAUVE_IP}' WHERE username = 'carol';")
    assert c.cutover_cli("forget", "--config", proxy.config_path, "bob").returncode == 0
    db.freeze()
    try:
        t = time.monotonic()
        assert which(env, "bob") == "hello from new"
        stale_took = time.monotonic() - t
        hung_took = assert_imap_tempfail(env, "erin", "erin-secret")
        m = metrics()
    finally:
        db.thaw()
    print(f"[lookups] database frozen: stale login in {stale_took:.2f}s, "
          f"uncached refused in {hung_took:.2f}s")
    assert stale_took < 2 and hung_took < 1.5, (stale_took, hung_took)
    assert c.metric_sum(m, "cutover_lookup_queries_total", lookup="mailboxes", result="timeout") >= t0 + 3, m
    assert c.metric_values(m, "cutover_lookup_up", lookup="mailboxes") == [0.0], m
    # thawed: answers again (carol's row changed meanwhile; her failures were not cached)
    c.wait_for(lambda: which(env, "carol") == "hello from mauve", 10, interval=0.2,
               what="the lookup to answer again after the database thawed")
    assert c.metric_values(metrics(), "cutover_lookup_up", lookup="mailboxes") == [1.0]


# --------------------------------------------------------------------------
# 6. 200 clients of one user: one query
# --------------------------------------------------------------------------

CROWD = 200
CROWD_QUERY_SECONDS = 1.0  # the query is slow enough for the crowd to pile up behind it


def test_200_concurrent_logins_of_one_user_make_one_query(env, proxy, db, redis, servers):
    """200 clients connect, then all send LOGIN for alice at once; her query takes 1 s.
    All 200 log in (legacy, by her row) and the database saw exactly one query."""
    plain = {"name": "imap-plain", "protocol": "imap", "listen": f"{PROXY_IP}:{PLAIN_IMAP_PORT}",
             "allow_plaintext_auth": True}
    proxy.reconfigure(config(env, db, redis, mailboxes={"timeout": "10s"}, listeners=[plain]))
    harness.wait_until(lambda: harness.port_open(PROXY_IP, PLAIN_IMAP_PORT), 10,
                       what="the plaintext IMAP listener")
    set_row(db, "alice", "legacy")
    db.psql(f"INSERT INTO slow_users VALUES ('alice', {CROWD_QUERY_SECONDS});")
    m0 = metrics()

    barrier = threading.Barrier(CROWD, timeout=60)
    results = [None] * CROWD

    def client(i):
        try:
            with c.RawIMAP(PROXY_IP, PLAIN_IMAP_PORT, timeout=60) as r:
                barrier.wait()
                tagged, _ = r.command("l", f'LOGIN "alice" "{USERS["alice"]}"')
                ok = c.is_tagged_ok(tagged, "l")
                if ok:
                    r.command("o", "LOGOUT")
                results[i] = "ok" if ok else tagged.decode("utf-8", "replace")
        except Exception as e:  # noqa: BLE001 - reported below
            barrier.abort()
            results[i] = f"{type(e).__name__}: {e}"

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CROWD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    took = time.monotonic() - t0
    failed = [r for r in results if r != "ok"]
    assert not failed, f"{len(failed)} of {CROWD} logins failed, e.g. {failed[:5]}"
    assert queries(db, "alice") == 1, "the database saw more than one query"

    m1 = metrics()
    d = lambda name, **l: c.metric_sum(m1, name, **l) - c.metric_sum(m0, name, **l)  # noqa: E731
    missed = d("cutover_lookup_cache_total", lookup="mailboxes", result="miss")
    hit = d("cutover_lookup_cache_total", lookup="mailboxes", result="hit")
    print(f"\n[lookups] {CROWD} logins in {took:.2f}s: {missed:g} waited for the one query, "
          f"{hit:g} found it cached")
    assert d("cutover_lookup_queries_total", lookup="mailboxes") == 1, m1
    assert missed + hit == CROWD, m1
    # the crowd was there while the query ran: many logins shared it (single-flight),
    # not only the cache after it
    assert missed > 1, m1
    assert d("cutover_logins_total", pool="legacy", result="ok") == CROWD, m1


# --------------------------------------------------------------------------
# 7. Redis lookups
# --------------------------------------------------------------------------


def test_redis_lookups_string_hash_and_any_key(env, proxy, db, redis, servers):
    """A Redis lookup without a pool on its rule: a string value is the pool, a hash
    gives pool and server. The `migrated` rule (pool: new) takes any value."""
    url_file = env.root / "lookups-redis-url"
    url_file.write_text(f"  {redis.url}\n")
    routes = [{"lookup": "mailboxes"}, {"lookup": "byredis"},
              {"lookup": "migrated", "pool": "new"}, {"pool": "legacy"}]
    proxy.reconfigure(config(env, db, redis, routes=routes, lookups={
        "byredis": {"redis": {"url_file": str(url_file), "key": "route:{user}"}}}))
    redis.cli("SET", "route:bob", "new")
    redis.cli("HSET", "route:carol", "pool", "legacy", "server", MAUVE_IP)
    redis.cli("SET", "migrated:alice", "1")
    redis.cli("SET", "route:weird", "nowhere")
    m0 = metrics()

    assert which(env, "bob") == "hello from new"
    assert which(env, "carol") == "hello from mauve"
    assert which(env, "alice") == "hello from new"
    assert which(env, "joeuser") == "hello from green"  # no row, no key anywhere
    v = route_json(proxy, "carol")
    assert v["lookup"] == {"name": "byredis", "row": {"pool": "legacy", "server": MAUVE_IP},
                           "cache": "miss"}, v
    assert v["servers"][0] == f"{MAUVE_IP}:143", v
    # a string again after a hash (the reader switches shapes)
    assert route_json(proxy, "bob")["pool"] == "new"

    m1 = metrics()
    d = lambda name, **l: c.metric_sum(m1, name, **l) - c.metric_sum(m0, name, **l)  # noqa: E731
    assert d("cutover_lookup_queries_total", lookup="byredis", result="found") == 2, m1
    assert d("cutover_lookup_queries_total", lookup="byredis", result="not_found") == 2, m1
    assert d("cutover_lookup_queries_total", lookup="migrated", result="found") == 1, m1
    assert c.metric_values(m1, "cutover_lookup_up", lookup="byredis") == [1.0], m1
    # a value naming no pool: refused, temporarily
    r0 = c.metric_sum(m1, "cutover_lookup_rejected_rows_total", lookup="byredis", reason="unknown_pool")
    r = c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context())
    try:
        # weird's password has quotes and backslashes: send it as a literal
        pw = USERS["weird"].encode("utf-8")
        r.send(b"l LOGIN weird {%d+}\r\n" % len(pw) + pw + b"\r\n")
        tagged, _ = r.read_until_tagged("l")
    finally:
        r.close()
    assert tagged.startswith(f"l {IMAP_TEMPFAIL}".encode()), tagged
    assert lookup_metric("cutover_lookup_rejected_rows_total", lookup="byredis",
                         reason="unknown_pool") == r0 + 1

    # Redis SIGKILLed: an uncached user reaching the Redis rules fails temporarily and
    # promptly; Redis back (empty, keys set again): the lookups answer again
    # (erin has no mailbox anywhere: a refused login never reaches a backend)
    redis.kill()
    took = assert_imap_tempfail(env, "erin", "erin-secret")
    print(f"\n[lookups] Redis down: erin refused after {took:.2f}s")
    assert took < 1.5, took
    assert c.metric_values(metrics(), "cutover_lookup_up", lookup="byredis") == [0.0]
    redis.start()
    redis.cli("SET", "route:erin", "new")
    v = c.wait_for(lambda: (lambda v: v if v.get("pool") == "new" else None)(
        route_json(proxy, "erin", "--proxy", rc=None)), 10, interval=0.2,
        what="the proxy's Redis lookup to answer again after a restart")
    assert v["lookup"] == {"name": "byredis", "row": {"pool": "new", "server": None},
                           "cache": "miss"}, v
    assert c.metric_values(metrics(), "cutover_lookup_up", lookup="byredis") == [1.0]
    # and a login: joeuser's cached "no row" made stale, his new key read
    redis.cli("SET", "route:joeuser", "new")
    assert c.cutover_cli("forget", "--config", proxy.config_path, "joeuser").returncode == 0
    assert which(env, "joeuser") == "hello from new"





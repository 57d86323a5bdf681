//! Route lookups against a real PostgreSQL (a throw-away `initdb` cluster) and a real
//! `redis-server`, with in-process fake backends: rows route users and pin servers, the
//! cache answers and is forgotten, a database that is down or stalls costs cached users
//! nothing and uncached ones a temporary failure, and a burst of one user's logins makes
//! one query, counted at the database.
//!
//! Needs PostgreSQL and redis-server (Debian's packages; `scripts/test.sh` installs
//! them). Without them the tests say so and pass, so that a bare `cargo test` on a
//! developer machine still runs.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::servers::{Postgres, Redis};
use common::*;
use cutover::config::{Config, Protocol};
use cutover::demo::FakeBackend;
use cutover::snapshot::Snapshot;

struct World {
    dir: TempDir,
    new_a: FakeBackend,
    new_b: FakeBackend,
    green: FakeBackend,
}

fn more_users(c: &mut cutover::demo::FakeConfig) {
    for u in ["dave", "erin", "frank", "gina", "slowuser"] {
        c.users.insert(u.into(), "password".into());
    }
}

async fn world() -> World {
    World {
        dir: TempDir::new("lookups"),
        new_a: fake("new-a", Protocol::Imap, more_users).await,
        new_b: fake("new-b", Protocol::Imap, more_users).await,
        green: fake("green", Protocol::Imap, more_users).await,
    }
}

impl World {
    /// A configuration: pool `new` (two servers), pool `legacy`, the given lookups and
    /// routes, an admin endpoint and metrics.
    fn yaml(&self, lookups: &str, routes: &str) -> String {
        format!(
            r#"
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
  - {{ name: pop3, protocol: pop3, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
pools:
  new:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{a}", "{b}"] }}
    pop3: {{ servers: ["127.0.0.1:9"] }}
  legacy:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{g}"] }}
    pop3: {{ servers: ["127.0.0.1:9"] }}
admin: {{ listen: "127.0.0.1:0" }}
metrics: {{ listen: "127.0.0.1:0" }}
on_move: {{ action: kick, grace: 0s }}
shutdown: {{ drain_timeout: 1s }}
lookups:
{lookups}
routes:
{routes}
"#,
            a = self.new_a.addr,
            b = self.new_b.addr,
            g = self.green.addr,
        )
    }

    async fn start(&self, yaml: &str) -> cutover::server::Running {
        let path = self.dir.join("routes.yaml");
        std::fs::write(&path, yaml).unwrap();
        let cfg = Config::load(&path).expect("valid config");
        let snap = Arc::new(Snapshot::build(cfg).unwrap());
        cutover::server::start(snap, cutover::backend::Backends::new())
            .await
            .unwrap()
    }
}

/// The PostgreSQL lookup every test uses, with `extra` settings.
fn pg_lookup(pg: &Postgres, query: &str, extra: &str) -> String {
    format!(
        "  mailboxes:\n    postgres: {{ url: \"{}\", query: \"{query}\" }}\n{extra}",
        pg.url()
    )
}

const QUERY: &str = "SELECT pool, server FROM mailbox_routes WHERE username = $1";

fn with_table(pg: &Postgres) {
    pg.psql(
        "mail",
        "CREATE TABLE mailbox_routes (username text PRIMARY KEY, pool text, server text)",
    );
}

/// Logs `user` in; the name of the backend that served it ("new-a", "green", ...), or the
/// tagged reply when the login did not succeed.
async fn served_by(addr: SocketAddr, user: &str) -> Result<String, String> {
    let mut c = Client::connect(addr).await;
    c.line().await;
    let r = c.cmd("a", &format!("LOGIN {user} password")).await;
    let last = r.last().cloned().unwrap_or_default();
    if !last.starts_with("a OK") {
        return Err(last);
    }
    c.cmd("s", "SELECT INBOX").await;
    let r = c.cmd("f", "FETCH 1 BODY[]").await;
    let subject = r
        .into_iter()
        .find(|l| l.starts_with("Subject:"))
        .unwrap_or_default();
    Ok(subject
        .trim_start_matches("Subject: hello from ")
        .to_string())
}

async fn forget(running: &cutover::server::Running, user: &str) {
    let admin = running.admin.unwrap();
    let (status, body) =
        cutover::http::request(admin, "POST", &format!("/forget?user={user}"), None)
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}");
}

fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(body, name, labels).unwrap_or(0.0)
}

#[tokio::test]
async fn rows_route_users_pin_servers_and_are_forgotten() {
    let Some(pg) = Postgres::start() else { return };
    with_table(&pg);
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('alice', 'new', NULL), ('bob', 'new', '127.0.0.1:0'), ('carol', 'nowhere', NULL)",
    );
    let w = world().await;
    // Pin bob to new-b by host:port.
    pg.psql(
        "mail",
        &format!(
            "UPDATE mailbox_routes SET server = '{}' WHERE username = 'bob'",
            w.new_b.addr
        ),
    );
    let lookups = pg_lookup(&pg, QUERY, "    cache: { ttl: 60s, negative_ttl: 60s }\n");
    let running = w
        .start(&w.yaml(&lookups, "  - { lookup: mailboxes }\n  - { pool: legacy }"))
        .await;
    let addr = running.addr("imap").unwrap();
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    assert_eq!(served_by(addr, "bob").await.unwrap(), "new-b", "pinned");
    // No row: the next rule.
    assert_eq!(served_by(addr, "dave").await.unwrap(), "green");
    // A row naming a pool that does not exist: a temporary failure, never connected.
    let r = served_by(addr, "carol").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    // A server that is not one of the pool's: the same.
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('erin', 'new', '127.0.0.77:143')",
    );
    let r = served_by(addr, "erin").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    let body = scrape(running.metrics.unwrap()).await;
    let bad = |reason| {
        value(
            &body,
            "cutover_lookup_rejected_rows_total",
            &[("lookup", "mailboxes"), ("reason", reason)],
        )
    };
    assert_eq!((bad("unknown_pool"), bad("unknown_server")), (1.0, 1.0));

    // dave's row appears: cached "no row" still routes him to legacy until forgotten.
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('dave', 'new', NULL)",
    );
    assert_eq!(served_by(addr, "dave").await.unwrap(), "green");
    forget(&running, "dave").await;
    assert_eq!(served_by(addr, "dave").await.unwrap(), "new-a");
    // Rolled back in the database: after forget, legacy again.
    pg.psql("mail", "DELETE FROM mailbox_routes WHERE username = 'dave'");
    forget(&running, "dave").await;
    assert_eq!(served_by(addr, "dave").await.unwrap(), "green");

    let body = scrape(running.metrics.unwrap()).await;
    let cache = |result| {
        value(
            &body,
            "cutover_lookup_cache_total",
            &[("lookup", "mailboxes"), ("result", result)],
        )
    };
    assert!(cache("hit") >= 1.0 && cache("miss") >= 5.0, "{body}");
    assert_eq!(
        value(&body, "cutover_lookup_up", &[("lookup", "mailboxes")]),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn an_answer_expires_with_its_ttl_and_a_changed_row_moves_open_sessions() {
    let Some(pg) = Postgres::start() else { return };
    with_table(&pg);
    let w = world().await;
    let lookups = pg_lookup(
        &pg,
        QUERY,
        "    cache: { ttl: 1s, negative_ttl: 1s, stale_for: 1m }\n",
    );
    let running = w
        .start(&w.yaml(&lookups, "  - { lookup: mailboxes }\n  - { pool: legacy }"))
        .await;
    let addr = running.addr("imap").unwrap();
    let mut idle = Client::connect(addr).await;
    idle.login_ok("frank").await;
    idle.send(b"i IDLE\r\n").await;
    assert!(idle.line().await.unwrap().starts_with("+ "));
    // The migration tooling flips frank's row; the answer expires within a second.
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('frank', 'new', NULL)",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(served_by(addr, "frank").await.unwrap(), "new-a");
    // That login noticed the change: the legacy session is moved (BYE), as on_move says.
    let rest = idle.until("* BYE").await;
    assert!(rest.last().unwrap().contains("moved"), "{rest:?}");
    assert!(idle.closed().await);
    running.shutdown().await;
}

#[tokio::test]
async fn a_database_that_is_down_costs_cached_users_nothing() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    with_table(&pg);
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('alice', 'new', NULL), ('bob', 'new', NULL)",
    );
    let w = world().await;
    // Two lookups on the same database: tempfail (default) and on_error: next.
    let lookups = format!(
        "{}    cache: {{ ttl: 100ms, stale_for: 1m }}\n    timeout: 300ms\n  fallthrough:\n    postgres: {{ url: \"{}\", query: \"{QUERY}\" }}\n    on_error: next\n    timeout: 300ms\n",
        pg_lookup(&pg, QUERY, ""),
        pg.url()
    );
    let routes = "  - { users: [erin], lookup: fallthrough }\n  - { lookup: mailboxes }\n  - { pool: legacy }";
    let running = w.start(&w.yaml(&lookups, routes)).await;
    let addr = running.addr("imap").unwrap();
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    pg.kill();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // alice's answer is past its TTL but within stale_for: she gets in.
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    // bob was never cached: a temporary failure, never an authentication failure, on
    // IMAP and on POP3.
    let r = served_by(addr, "bob").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    let mut pop = Client::connect(running.addr("pop3").unwrap()).await;
    pop.line().await;
    pop.send(b"USER bob\r\n").await;
    pop.line().await;
    pop.send(b"PASS password\r\n").await;
    let r = pop.line().await.unwrap();
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // erin's lookup says on_error: next: the next rule's lookup fails too (tempfail).
    let r = served_by(addr, "erin").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    let body = scrape(running.metrics.unwrap()).await;
    assert_eq!(
        value(&body, "cutover_lookup_up", &[("lookup", "mailboxes")]),
        0.0
    );
    let q = |result| {
        value(
            &body,
            "cutover_lookup_queries_total",
            &[("lookup", "mailboxes"), ("result", result)],
        )
    };
    assert!(q("error") + q("timeout") >= 2.0, "{body}");
    assert_eq!(
        value(
            &body,
            "cutover_lookup_cache_total",
            &[("lookup", "mailboxes"), ("result", "stale")]
        ),
        1.0
    );
    // The database is back: bob gets in, and the gauge says so.
    pg.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match served_by(addr, "bob").await {
            Ok(s) => {
                assert_eq!(s, "new-a");
                break;
            }
            Err(r) => {
                assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
                assert!(Instant::now() < deadline, "bob never got in");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let body = scrape(running.metrics.unwrap()).await;
    assert_eq!(
        value(&body, "cutover_lookup_up", &[("lookup", "mailboxes")]),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn on_error_next_goes_to_the_next_rule_when_the_database_is_down() {
    let w = world().await;
    // Nothing listens there: every query fails at once.
    let dead = dead_addr().await;
    let lookups = format!(
        "  mailboxes:\n    postgres: {{ url: \"postgres://cutover@{dead}/mail\", query: \"{QUERY}\" }}\n    on_error: next\n"
    );
    let running = w
        .start(&w.yaml(&lookups, "  - { lookup: mailboxes }\n  - { pool: legacy }"))
        .await;
    assert_eq!(
        served_by(running.addr("imap").unwrap(), "alice")
            .await
            .unwrap(),
        "green"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_stalled_query_hits_its_timeout_and_the_next_login_is_served() {
    let Some(pg) = Postgres::start() else { return };
    with_table(&pg);
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('slowuser', 'new', NULL), ('alice', 'new', NULL)",
    );
    let w = world().await;
    let query = "SELECT pool, server FROM mailbox_routes WHERE username = $1 AND (CASE WHEN $1 = 'slowuser' THEN pg_sleep(5) IS NOT NULL ELSE true END)";
    // One connection: the stalled query must not hold up the next user's.
    let lookups = format!(
        "  mailboxes:\n    postgres: {{ url: \"{}\", query: \"{query}\", connections: 1 }}\n    timeout: 300ms\n",
        pg.url()
    );
    let running = w
        .start(&w.yaml(&lookups, "  - { lookup: mailboxes }\n  - { pool: legacy }"))
        .await;
    let addr = running.addr("imap").unwrap();
    let started = Instant::now();
    let r = served_by(addr, "slowuser").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before the query ended"
    );
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    let body = scrape(running.metrics.unwrap()).await;
    assert_eq!(
        value(
            &body,
            "cutover_lookup_queries_total",
            &[("lookup", "mailboxes"), ("result", "timeout")]
        ),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn two_hundred_logins_of_one_user_make_one_query() {
    let Some(pg) = Postgres::start() else { return };
    with_table(&pg);
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('alice', 'new', NULL)",
    );
    // Every query the database answers is written down, with a little delay so that the
    // logins really overlap.
    pg.psql(
        "mail",
        "CREATE TABLE asked (username text, at timestamptz DEFAULT now());
         CREATE FUNCTION route_of(u text) RETURNS TABLE (pool text, server text) AS $$
           BEGIN
             INSERT INTO asked (username) VALUES (u);
             PERFORM pg_sleep(0.2);
             RETURN QUERY SELECT r.pool, r.server FROM mailbox_routes r WHERE r.username = u;
           END $$ LANGUAGE plpgsql VOLATILE",
    );
    let w = world().await;
    let lookups = pg_lookup(
        &pg,
        "SELECT pool, server FROM route_of($1)",
        "    timeout: 5s\n",
    );
    let running = w
        .start(&w.yaml(&lookups, "  - { lookup: mailboxes }\n  - { pool: legacy }"))
        .await;
    let addr = running.addr("imap").unwrap();
    let mut logins = Vec::new();
    for _ in 0..200 {
        logins.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.line().await;
            let r = c.cmd("a", "LOGIN alice password").await;
            r.last().is_some_and(|l| l.starts_with("a OK"))
        }));
    }
    let mut ok = 0;
    for l in logins {
        ok += usize::from(l.await.unwrap());
    }
    assert_eq!(ok, 200);
    assert_eq!(
        pg.psql(
            "mail",
            "SELECT count(*) FROM asked WHERE username = 'alice'"
        ),
        "1"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn redis_keys_route_users_as_strings_or_hashes() {
    let Some(redis) = Redis::start() else { return };
    let cli = |args: &[&str]| {
        let ok = std::process::Command::new("redis-cli")
            .args(["-h", redis.ip, "-p", &redis.port.to_string()])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "redis-cli {args:?}");
    };
    let w = world().await;
    cli(&["SET", "route:alice", "new"]);
    cli(&[
        "HSET",
        "route:bob",
        "pool",
        "new",
        "server",
        &w.new_b.addr.to_string(),
    ]);
    cli(&["SET", "migrated:carol", "yes"]);
    // A hash without pool or server fields is a row too: erin is migrated.
    cli(&["HSET", "migrated:erin", "at", "2026-11-30"]);
    let lookups = format!(
        "  routes:\n    redis: {{ url: \"{u}\", key: \"route:{{user}}\" }}\n  migrated:\n    redis: {{ url: \"{u}\", key: \"migrated:{{user}}\" }}\n",
        u = redis.url()
    );
    let routes =
        "  - { lookup: routes }\n  - { lookup: migrated, pool: new }\n  - { pool: legacy }";
    let running = w.start(&w.yaml(&lookups, routes)).await;
    let addr = running.addr("imap").unwrap();
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    assert_eq!(served_by(addr, "bob").await.unwrap(), "new-b");
    assert_eq!(served_by(addr, "carol").await.unwrap(), "new-a");
    assert_eq!(served_by(addr, "erin").await.unwrap(), "new-a");
    assert_eq!(served_by(addr, "dave").await.unwrap(), "green");
    // The admin endpoint routes through the proxy's caches.
    let (status, body) = cutover::http::request(
        running.admin.unwrap(),
        "GET",
        "/route?user=bob&protocol=imap",
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pool"], "new");
    assert_eq!(v["servers"][0], w.new_b.addr.to_string());
    assert_eq!(v["lookup"]["name"], "routes");
    assert_eq!(v["lookup"]["cache"], "hit");
    assert_eq!(v["lookup"]["row"]["server"], w.new_b.addr.to_string());
    running.shutdown().await;
}

#[tokio::test]
async fn forget_reaches_every_proxy_of_the_fleet() {
    let (Some(pg), Some(redis)) = (Postgres::start(), Redis::start()) else {
        return;
    };
    with_table(&pg);
    let w = world().await;
    let lookups = pg_lookup(&pg, QUERY, "    cache: { ttl: 1h, negative_ttl: 1h }\n");
    let yaml = format!(
        "{}\nstate: {{ redis: {{ url: \"{}\" }} }}\n",
        w.yaml(&lookups, "  - { lookup: mailboxes }\n  - { pool: legacy }"),
        redis.url()
    );
    let one = w
        .start(&yaml.replace("lookups:", "instance_name: one\nlookups:"))
        .await;
    let two = w
        .start(&yaml.replace("lookups:", "instance_name: two\nlookups:"))
        .await;
    let (a1, a2) = (one.addr("imap").unwrap(), two.addr("imap").unwrap());
    assert_eq!(served_by(a1, "gina").await.unwrap(), "green");
    assert_eq!(served_by(a2, "gina").await.unwrap(), "green");
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('gina', 'new', NULL)",
    );
    // Wait until both proxies listen on the control channel, then forget on one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while one.control.state.store_up() != Some(true) || two.control.state.store_up() != Some(true) {
        assert!(Instant::now() < deadline, "Redis connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    forget(&one, "gina").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if served_by(a2, "gina").await.unwrap() == "new-a" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other proxy still routes gina to legacy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_by(a1, "gina").await.unwrap(), "new-a");
    one.shutdown().await;
    two.shutdown().await;
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_server() {
    let c = certs();
    let Some(pg) = Postgres::start_tls(&c.join("backend.pem"), &c.join("backend-key.pem")) else {
        return;
    };
    with_table(&pg);
    pg.psql(
        "mail",
        "INSERT INTO mailbox_routes VALUES ('alice', 'new', NULL)",
    );
    let w = world().await;
    // The certificate names localhost: the URL says localhost, and where it listens.
    let url = |extra: &str| {
        format!(
            "postgres://cutover@localhost:{}/mail?hostaddr={}&sslmode=require{extra}",
            pg.port,
            common::servers::POSTGRES_IP
        )
    };
    let lookups = format!(
        "  trusted:\n    postgres: {{ url: \"{}\", query: \"{QUERY}\", ca_file: {} }}\n  untrusted:\n    postgres: {{ url: \"{}\", query: \"{QUERY}\" }}\n",
        url(""),
        c.join("ca.pem").display(),
        url(""),
    );
    let routes =
        "  - { users: [bob], lookup: untrusted }\n  - { lookup: trusted }\n  - { pool: legacy }";
    let running = w.start(&w.yaml(&lookups, routes)).await;
    let addr = running.addr("imap").unwrap();
    // The server refuses plaintext (pg_hba): this row could only come over TLS.
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    // Without the CA that signed the server's certificate, the system's roots do not
    // trust it: no answer, a temporary failure.
    let r = served_by(addr, "bob").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    running.shutdown().await;
}

#[tokio::test]
async fn redis_over_tls_verifies_the_server() {
    let c = certs();
    let Some(redis) = Redis::start_tls(&c.join("backend.pem"), &c.join("backend-key.pem")) else {
        return;
    };
    let ok = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(c.join("ca.pem"))
        .args(["-h", redis.ip, "-p", &redis.port.to_string()])
        .args(["--sni", "localhost", "SET", "route:alice", "new"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "redis-cli over TLS");
    let w = world().await;
    running_redis_tls(&w, &redis, &c).await;
}

/// Redis over TLS needs the name in the certificate to resolve to the server: the
/// server listens on 127.0.0.55 and the certificate says localhost (127.0.0.1), so the
/// lookup connects through a loopback forwarder on 127.0.0.1.
async fn running_redis_tls(w: &World, redis: &Redis, c: &std::path::Path) {
    let target: SocketAddr = format!("{}:{}", redis.ip, redis.port).parse().unwrap();
    let fwd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = fwd.local_addr().unwrap().port();
    let forwarder = tokio::spawn(async move {
        while let Ok((mut a, _)) = fwd.accept().await {
            tokio::spawn(async move {
                if let Ok(mut b) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    });
    let lookups = format!(
        "  routes:\n    redis: {{ url: \"rediss://localhost:{port}/0\", key: \"route:{{user}}\", ca_file: {ca} }}\n  untrusted:\n    redis: {{ url: \"rediss://localhost:{port}/0\", key: \"route:{{user}}\" }}\n",
        ca = c.join("ca.pem").display(),
    );
    let routes =
        "  - { users: [bob], lookup: untrusted }\n  - { lookup: routes }\n  - { pool: legacy }";
    let running = w.start(&w.yaml(&lookups, routes)).await;
    let addr = running.addr("imap").unwrap();
    assert_eq!(served_by(addr, "alice").await.unwrap(), "new-a");
    let r = served_by(addr, "bob").await.unwrap_err();
    assert!(r.starts_with("a NO [UNAVAILABLE]"), "{r}");
    running.shutdown().await;
    forwarder.abort();
}

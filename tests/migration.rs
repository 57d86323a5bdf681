//! Migration controls through the real proxy and fake backends: stages, reloads, moving
//! users, holds, kicks, fallback pools, user name normalization, stragglers and the
//! pop-before-smtp bridge.
mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cutover::config::{rfc3339, Config, Protocol};
use cutover::demo::FakeBackend;
use cutover::snapshot::Snapshot;

struct World {
    dir: common::TempDir,
    new: FakeBackend,
    green: FakeBackend,
    mauve: FakeBackend,
    pop_new: FakeBackend,
    pop_green: FakeBackend,
    smtp_new: FakeBackend,
    smtp_green: FakeBackend,
}

async fn world() -> World {
    let dir = common::TempDir::new("mig");
    World {
        dir,
        new: fake("new", Protocol::Imap, |_| {}).await,
        green: fake("green", Protocol::Imap, |_| {}).await,
        mauve: fake("mauve", Protocol::Imap, |_| {}).await,
        pop_new: fake("new", Protocol::Pop3, |_| {}).await,
        pop_green: fake("green", Protocol::Pop3, |_| {}).await,
        smtp_new: fake("new", Protocol::Smtp, |c| c.smtp_no_auth = true).await,
        smtp_green: fake("green", Protocol::Smtp, |c| c.smtp_no_auth = true).await,
    }
}

impl World {
    /// A full configuration with the given routes/stages section; extra top-level YAML.
    fn yaml(&self, routes: &str, extra: &str) -> String {
        let certs = certs();
        format!(
            r#"
tls:
  certificates: [{{ cert: {c}/proxy.pem, key: {c}/proxy-key.pem }}]
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
  - {{ name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit }}
  - {{ name: pop3, protocol: pop3, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
  - {{ name: compat, protocol: smtp, listen: "127.0.0.1:0", allow_plaintext_auth: true, relay: pop-before-smtp, window: 2s }}
pools:
  new:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{new}"] }}
    pop3: {{ servers: ["{pop_new}"] }}
    smtp: {{ servers: ["{smtp_new}"] }}
  legacy:
    health: {{ interval: 0s }}
    connect_timeout: 1s
    imap: {{ servers: ["{green}", "{mauve}"] }}
    pop3: {{ servers: ["{pop_green}"] }}
    smtp: {{ servers: ["{smtp_green}"], auth: pop-before-smtp }}
  empty:
    health: {{ interval: 0s }}
    connect_timeout: 1s
    imap: {{ servers: ["{dead}"] }}
    pop3: {{ servers: ["{dead}"] }}
    smtp: {{ servers: ["{dead}"] }}
admin: {{ listen: "127.0.0.1:0" }}
on_move: {{ action: kick, grace: 0s }}
shutdown: {{ drain_timeout: 1s }}
{extra}
{routes}
"#,
            c = certs.display(),
            new = self.new.addr,
            green = self.green.addr,
            mauve = self.mauve.addr,
            pop_new = self.pop_new.addr,
            pop_green = self.pop_green.addr,
            smtp_new = self.smtp_new.addr,
            smtp_green = self.smtp_green.addr,
            dead = "127.0.0.1:9",
        )
    }

    fn write(&self, yaml: &str) -> PathBuf {
        let p = self.dir.join("routes.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }

    async fn start(&self, yaml: &str) -> (cutover::server::Running, PathBuf) {
        let path = self.write(yaml);
        let cfg = Config::load(&path).expect("valid config");
        let snap = Arc::new(Snapshot::build(cfg).unwrap());
        let running = cutover::server::start(snap, cutover::backend::Backends::new())
            .await
            .unwrap();
        (running, path)
    }
}

async fn imap_login(addr: std::net::SocketAddr, user: &str, pass: &str) -> (Client, Vec<String>) {
    let mut c = Client::connect(addr).await;
    c.line().await;
    let r = c.cmd("a1", &format!("LOGIN {user} {pass}")).await;
    (c, r)
}

async fn subject(c: &mut Client) -> String {
    c.cmd("s", "SELECT INBOX").await;
    let r = c.cmd("f", "FETCH 1 BODY[]").await;
    r.into_iter()
        .find(|l| l.starts_with("Subject:"))
        .unwrap_or_default()
}

async fn served_by(addr: std::net::SocketAddr, user: &str) -> String {
    let (mut c, r) = imap_login(addr, user, "password").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    subject(&mut c).await
}

#[tokio::test]
async fn stage_switch_moves_an_idling_user_and_the_reconnect_lands_on_the_new_pool() {
    let w = world().await;
    let from = rfc3339::format(rfc3339::now() + 3);
    let routes = format!(
        "routes:\n  - {{ pool: legacy }}\nstages:\n  - name: wave-1\n    from: \"{from}\"\n    routes:\n      - {{ users: [bob], pool: new }}\n      - {{ pool: legacy }}\n"
    );
    let (running, _) = w.start(&w.yaml(&routes, "")).await;
    let addr = running.addr("imap").unwrap();
    let (mut c, r) = imap_login(addr, "bob", "password").await;
    assert!(r.last().unwrap().starts_with("a1 OK"));
    assert_eq!(subject(&mut c).await, "Subject: hello from green");
    c.send(b"i IDLE\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+ "));
    // The stage starts within ~3 s: the idling client gets an untagged BYE and EOF.
    let mut lines = Vec::new();
    while let Some(l) = tokio::time::timeout(Duration::from_secs(8), c.line())
        .await
        .expect("kicked in time")
    {
        lines.push(l);
    }
    assert!(lines.iter().any(|l| l.starts_with("* BYE")), "{lines:?}");
    assert_eq!(served_by(addr, "bob").await, "Subject: hello from new");
    assert_eq!(served_by(addr, "carol").await, "Subject: hello from green");
    running.shutdown().await;
}

#[tokio::test]
async fn invalid_reload_keeps_serving_and_valid_reload_moves_users() {
    let w = world().await;
    let (running, path) = w
        .start(&w.yaml("routes:\n  - { pool: legacy }\n", ""))
        .await;
    let addr = running.addr("imap").unwrap();
    let (mut held, _) = imap_login(addr, "alice", "password").await;
    assert_eq!(subject(&mut held).await, "Subject: hello from green");
    // Broken file: refused, old config stays, the open session is untouched.
    std::fs::write(&path, "routes: [ { pool: nowhere } ]\n").unwrap();
    let err = running.reload_from(&path).await.unwrap_err().to_string();
    assert!(
        err.contains("routes[0].pool") || err.contains("nowhere"),
        "{err}"
    );
    assert_eq!(served_by(addr, "alice").await, "Subject: hello from green");
    assert!(held
        .cmd("n", "NOOP")
        .await
        .last()
        .unwrap()
        .starts_with("n OK"));
    // Valid file sending alice to "new": her open session is kicked with BYE.
    std::fs::write(
        &path,
        w.yaml(
            "routes:\n  - { users: [alice], pool: new }\n  - { pool: legacy }\n",
            "",
        ),
    )
    .unwrap();
    let moved = running.reload_from(&path).await.unwrap();
    assert_eq!(moved, 1);
    let rest = held.until("* BYE").await;
    assert!(rest.last().unwrap().contains("moved"), "{rest:?}");
    assert!(held.closed().await);
    assert_eq!(served_by(addr, "alice").await, "Subject: hello from new");
    running.shutdown().await;
}

#[tokio::test]
async fn reload_under_a_stream_of_logins_loses_none() {
    let w = world().await;
    let (running, path) = w
        .start(&w.yaml("routes:\n  - { pool: legacy }\n", ""))
        .await;
    let addr = running.addr("imap").unwrap();
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (failures, done, stop) = (failures.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (mut c, r) = imap_login(addr, "bob", "password").await;
                if r.last().is_some_and(|l| l.starts_with("a1 OK")) {
                    c.cmd("z", "LOGOUT").await;
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for i in 0..10 {
        // Alternate between two valid configurations (legacy <-> new for carol only).
        let routes = if i % 2 == 0 {
            "routes:\n  - { users: [carol], pool: new }\n  - { pool: legacy }\n"
        } else {
            "routes:\n  - { pool: legacy }\n"
        };
        std::fs::write(&path, w.yaml(routes, "")).unwrap();
        running.reload_from(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(
        done.load(Ordering::Relaxed) > 50,
        "logins kept flowing: {}",
        done.load(Ordering::Relaxed)
    );
    running.shutdown().await;
}

#[tokio::test]
async fn fallback_on_unavailable_but_not_on_rejection_unless_asked() {
    let w = world().await;
    let routes = "routes:\n  - { users: [bob], pool: empty, fallback: legacy }\n  - { users: [erin], pool: new, fallback: legacy }\n  - { pool: legacy }\n";
    let (running, _) = w.start(&w.yaml(routes, "")).await;
    let addr = running.addr("imap").unwrap();
    // bob: "empty" has no live server -> legacy.
    assert_eq!(served_by(addr, "bob").await, "Subject: hello from green");
    // erin is unknown to "new", and this route does not fall back on a rejection.
    let (_, r) = imap_login(addr, "erin", "password").await;
    assert!(r.last().unwrap().contains("AUTHENTICATIONFAILED"), "{r:?}");
    assert!(!w.green.logins.lock().unwrap().iter().any(|u| u == "erin"));
    running.shutdown().await;
}

#[tokio::test]
async fn fallback_on_auth_failure_reaches_a_user_not_yet_provisioned() {
    // The "new" backend does not know carol yet; green does.
    let mut w = world().await;
    w.new = fake("new", Protocol::Imap, |c| {
        c.users.remove("carol");
    })
    .await;
    let routes = "routes:\n  - { users: [carol], pool: new, fallback: legacy, fallback_on_auth_failure: true }\n  - { pool: legacy }\n";
    let (running, _) = w.start(&w.yaml(routes, "")).await;
    let before = scrape_fallbacks(&running).await;
    assert_eq!(
        served_by(running.addr("imap").unwrap(), "carol").await,
        "Subject: hello from green"
    );
    assert!(scrape_fallbacks(&running).await > before);
    running.shutdown().await;
}

async fn scrape_fallbacks(running: &cutover::server::Running) -> f64 {
    let _ = running;
    let handle = cutover::metrics::install();
    let body = handle.render();
    metric(
        &body,
        "cutover_fallbacks_total",
        &[("reason", "auth_failed")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn user_names_are_normalized_for_routing_and_backend_login() {
    let w = world().await;
    let routes = "users:\n  local_domains: [example.net]\n  case_insensitive: true\nroutes:\n  - { users: [joeuser], pool: new }\n  - { pool: legacy }\n";
    let (running, _) = w.start(&w.yaml(routes, "")).await;
    assert_eq!(
        served_by(running.addr("imap").unwrap(), "JoeUser@example.net").await,
        "Subject: hello from new"
    );
    assert_eq!(
        w.new.logins.lock().unwrap().as_slice(),
        ["joeuser"],
        "the backend got the bare name"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn cohort_file_routes_its_users_and_is_reloaded() {
    let w = world().await;
    let cohort = w.dir.join("wave1.txt");
    std::fs::write(&cohort, "# wave 1\ncarol\n").unwrap();
    let routes = format!(
        "routes:\n  - {{ users_file: {}, pool: new }}\n  - {{ pool: legacy }}\n",
        cohort.display()
    );
    let (running, path) = w.start(&w.yaml(&routes, "")).await;
    let addr = running.addr("imap").unwrap();
    assert_eq!(served_by(addr, "carol").await, "Subject: hello from new");
    assert_eq!(served_by(addr, "bob").await, "Subject: hello from green");
    std::fs::write(&cohort, "carol\nbob\n").unwrap();
    running.reload_from(&path).await.unwrap();
    assert_eq!(served_by(addr, "bob").await, "Subject: hello from new");
    running.shutdown().await;
}

async fn admin(running: &cutover::server::Running, method: &str, path: &str) -> (u16, String) {
    cutover::http::request(running.admin.unwrap(), method, path, None)
        .await
        .unwrap()
}

#[tokio::test]
async fn hold_release_and_kick_through_the_admin_endpoint() {
    let w = world().await;
    let (running, _) = w
        .start(&w.yaml("routes:\n  - { pool: legacy }\n", ""))
        .await;
    let addr = running.addr("imap").unwrap();
    // Kick: an open session ends with BYE.
    let (mut open, _) = imap_login(addr, "bob", "password").await;
    let (status, body) = admin(&running, "POST", "/kick?user=bob").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"kicked\":1"), "{body}");
    let rest = open.until("* BYE").await;
    assert!(rest.last().unwrap().contains("administrator"));
    // Hold: a new login waits until released.
    assert_eq!(admin(&running, "POST", "/hold?user=bob").await.0, 200);
    assert!(admin(&running, "GET", "/holds").await.1.contains("bob"));
    let waiting = tokio::spawn(async move { served_by(addr, "bob").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "held login must wait");
    assert_eq!(admin(&running, "POST", "/release?user=bob").await.0, 200);
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("released")
        .unwrap();
    assert_eq!(got, "Subject: hello from green");
    assert_eq!(admin(&running, "POST", "/kick").await.0, 400);
    assert_eq!(admin(&running, "GET", "/nope").await.0, 404);
    running.shutdown().await;
}

/// The mailbox move recipe: hold, change the routes, release. A login that connected
/// (and waited) under the old configuration is routed by the one in force when its hold
/// ends, so it lands on the new pool, and is not moved again afterwards.
#[tokio::test]
async fn a_login_held_across_a_reload_lands_on_the_routes_in_force_at_release() {
    let w = world().await;
    let (running, path) = w
        .start(&w.yaml("routes:\n  - { pool: legacy }\n", ""))
        .await;
    let addr = running.addr("imap").unwrap();
    assert_eq!(admin(&running, "POST", "/hold?user=bob").await.0, 200);
    let mut c = Client::connect(addr).await;
    c.line().await;
    let waiting = tokio::spawn(async move {
        let r = c.cmd("a1", "LOGIN bob password").await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "held login must wait");
    std::fs::write(
        &path,
        w.yaml(
            "routes:\n  - { users: [bob], pool: new }\n  - { pool: legacy }\n",
            "",
        ),
    )
    .unwrap();
    running.reload_from(&path).await.unwrap();
    assert_eq!(admin(&running, "POST", "/release?user=bob").await.0, 200);
    let (mut c, r) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("released")
        .unwrap();
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    assert_eq!(subject(&mut c).await, "Subject: hello from new");
    // Routed by the configuration in force: nothing to settle, no kick (grace is 0s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.cmd("n", "NOOP").await.last().unwrap().starts_with("n OK"));
    running.shutdown().await;
}

#[tokio::test]
async fn a_held_login_times_out_with_a_temporary_failure() {
    let w = world().await;
    let yaml = w.yaml("routes:\n  - { pool: legacy }\n", "").replace(
        "admin: { listen: \"127.0.0.1:0\" }",
        "admin: { listen: \"127.0.0.1:0\", hold_max_wait: 300ms }",
    );
    let (running, _) = w.start(&yaml).await;
    admin(&running, "POST", "/hold?user=bob").await;
    let (_, r) = imap_login(running.addr("imap").unwrap(), "bob", "password").await;
    assert!(
        r.last().unwrap().starts_with("a1 NO [UNAVAILABLE]"),
        "{r:?}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn stragglers_list_legacy_and_plaintext_users() {
    let w = world().await;
    let routes = "routes:\n  - { users: [joeuser, alice], pool: new }\n  - { pool: legacy }\n";
    let (running, _) = w.start(&w.yaml(routes, "")).await;
    served_by(running.addr("imap").unwrap(), "bob").await; // legacy, plaintext
    served_by(running.addr("imap").unwrap(), "joeuser").await; // new, plaintext
                                                               // alice: new over TLS: not a straggler.
    let mut c = Client::connect_tls(running.addr("imaps").unwrap()).await;
    c.line().await;
    assert!(c
        .cmd("a", "LOGIN alice password")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    let (status, body) = admin(&running, "GET", "/stragglers?hours=1").await;
    assert_eq!(status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let users: Vec<(&str, Vec<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap(),
                r["why"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        users,
        vec![
            ("bob", vec!["legacy_pool", "no_tls"]),
            ("joeuser", vec!["no_tls"])
        ]
    );
    running.shutdown().await;
}

async fn smtp_mail(addr: std::net::SocketAddr) -> Vec<String> {
    let mut c = Client::connect(addr).await;
    c.line().await;
    c.send(b"EHLO me.example\r\n").await;
    c.until("250 ").await;
    c.send(b"MAIL FROM:<bob@example.net>\r\n").await;
    let mut out = vec![c.line().await.unwrap_or_default()];
    if out[0].starts_with("250") {
        c.send(b"RCPT TO:<x@example.org>\r\nDATA\r\n").await;
        out.push(c.line().await.unwrap_or_default());
        out.push(c.line().await.unwrap_or_default());
        c.send(b"Subject: bridged\r\n\r\nhi\r\n.\r\nQUIT\r\n").await;
        out.push(c.line().await.unwrap_or_default());
    }
    out
}

#[tokio::test]
async fn pop_before_smtp_bridge_accepts_within_the_window_only() {
    let w = world().await;
    let (running, _) = w
        .start(&w.yaml("routes:\n  - { pool: legacy }\n", ""))
        .await;
    let compat = running.addr("compat").unwrap();
    // No recent login from this address: refused.
    let r = smtp_mail(compat).await;
    assert!(r[0].starts_with("530 5.7.0"), "{r:?}");
    // A POP3 login from 127.0.0.1 opens the window.
    let mut p = Client::connect(running.addr("pop3").unwrap()).await;
    p.line().await;
    p.send(b"USER bob\r\nPASS password\r\n").await;
    p.line().await;
    assert!(p.line().await.unwrap().starts_with("+OK"));
    let r = smtp_mail(compat).await;
    assert!(
        r.iter().all(|l| l.starts_with('2') || l.starts_with('3')),
        "{r:?}"
    );
    let got = w.smtp_green.received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "relayed to bob's pool (legacy: green)");
    // After the 2 s window it is refused again.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = smtp_mail(compat).await;
    assert!(r[0].starts_with("530"), "{r:?}");
    assert_eq!(w.smtp_green.received.lock().unwrap().len(), 1);
    running.shutdown().await;
}

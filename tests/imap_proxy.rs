//! IMAP through the proxy, against in-process fake backends: routing, failover, recovery,
//! authentication failures, pipelining, STARTTLS on both sides, metrics.
mod common;

use std::time::Duration;

use common::*;
use cutover::config::Protocol;
use cutover::demo::FakeBackend;

struct Setup {
    proxy: Proxy,
    new: FakeBackend,
    green: FakeBackend,
    mauve: FakeBackend,
}

/// new (STARTTLS backend), green and mauve; `legacy` lists green then mauve unless
/// `legacy_servers` overrides it.
async fn setup(legacy_servers: Option<String>, health: &str) -> Setup {
    let new = fake("new", Protocol::Imap, |c| c.tls = Some(server_tls())).await;
    let green = fake("green", Protocol::Imap, |c| c.imap_plain = false).await;
    let mauve = fake("mauve", Protocol::Imap, |_| {}).await;
    let legacy =
        legacy_servers.unwrap_or_else(|| format!("\"{}\", \"{}\"", green.addr, mauve.addr));
    let yaml = format!(
        r#"
tls:
  certificates: [{{ cert: certs/proxy.pem, key: certs/proxy-key.pem }}]
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit }}
  - {{ name: plain, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
pools:
  new:
    imap: {{ servers: ["{new}"], tls: starttls, ca: certs/ca.pem }}
  legacy:
    connect_timeout: 1s
    login_timeout: 1s
    health: {health}
    imap: {{ servers: [{legacy}] }}
routes:
  - {{ users: [joeuser, alice], pool: new }}
  - {{ domains: [newdomain.test], pool: new }}
  - {{ percent: 30, pool: new }}
  - {{ pool: legacy }}
metrics: {{ listen: "127.0.0.1:0" }}
shutdown: {{ drain_timeout: 1s }}
"#,
        new = new.addr,
    );
    Setup {
        proxy: Proxy::start(&yaml).await,
        new,
        green,
        mauve,
    }
}

/// Logs in over implicit TLS and returns the subject of message 1 (names the backend).
async fn served_by(proxy: &Proxy, user: &str, pass: &str) -> Result<String, Vec<String>> {
    let mut c = Client::connect_tls(proxy.addr("imaps")).await;
    let greeting = c.line().await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let r = c.cmd("a1", &format!("LOGIN {user} {pass}")).await;
    if !r.last().unwrap().starts_with("a1 OK") {
        return Err(r);
    }
    Ok(fetch_subject(&mut c).await)
}

async fn fetch_subject(c: &mut Client) -> String {
    let r = c.cmd("s1", "SELECT INBOX").await;
    assert!(r.last().unwrap().starts_with("s1 OK"), "{r:?}");
    let r = c.cmd("f1", "FETCH 1 BODY[]").await;
    assert!(r.last().unwrap().starts_with("f1 OK"), "{r:?}");
    r.into_iter()
        .find(|l| l.starts_with("Subject:"))
        .unwrap_or_default()
}

#[tokio::test]
async fn routes_by_user_domain_and_percent() {
    let s = setup(None, "{ interval: 0s }").await;
    assert_eq!(
        served_by(&s.proxy, "joeuser", "password").await.unwrap(),
        "Subject: hello from new"
    );
    assert_eq!(
        served_by(&s.proxy, "bob", "password").await.unwrap(),
        "Subject: hello from green"
    );
    // A user of the new domain (the fake backends know only the demo users: the login is
    // rejected, but by "new").
    let _ = served_by(&s.proxy, "x@newdomain.test", "password").await;
    assert!(s.green.logins.lock().unwrap().iter().all(|u| u == "bob"));
    // Percent: pick a user in and one out of the 30% bucket; add them to the fakes.
    let inside = (0..)
        .map(|i| format!("p{i}"))
        .find(|u| cutover::config::bucket(u) < 30)
        .unwrap();
    let outside = (0..)
        .map(|i| format!("p{i}"))
        .find(|u| cutover::config::bucket(u) >= 30)
        .unwrap();
    for (u, want) in [(inside, "new"), (outside, "green")] {
        let r = served_by(&s.proxy, &u, "password").await.unwrap_err();
        assert!(r.last().unwrap().contains("AUTHENTICATIONFAILED"), "{r:?}");
        let pool = if want == "new" { "new" } else { "legacy" };
        let d = cutover::route::route(&s.proxy.snap.config, &u, Protocol::Imap, 0).unwrap();
        assert_eq!(d.pool, pool);
    }
    s.proxy.stop().await;
}

#[tokio::test]
async fn fails_over_when_a_server_refuses_connections() {
    let dead = dead_addr().await;
    let mauve_only = fake("mauve", Protocol::Imap, |_| {}).await;
    let s = setup(
        Some(format!("\"{dead}\", \"{}\"", mauve_only.addr)),
        "{ interval: 0s }",
    )
    .await;
    let before = scrape(s.proxy.metrics_addr()).await;
    assert_eq!(
        served_by(&s.proxy, "bob", "password").await.unwrap(),
        "Subject: hello from mauve"
    );
    let after = scrape(s.proxy.metrics_addr()).await;
    let d = |n, l: &[(&str, &str)]| {
        metric(&after, n, l).unwrap_or(0.0) - metric(&before, n, l).unwrap_or(0.0)
    };
    assert!(
        d(
            "cutover_failovers_total",
            &[("pool", "legacy"), ("protocol", "imap")]
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &after,
            "cutover_backend_up",
            &[("server", &dead.to_string())]
        ),
        Some(0.0)
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn fails_over_when_a_server_accepts_but_never_greets() {
    let (silent, _h) = silent_server().await;
    let mauve_only = fake("mauve", Protocol::Imap, |_| {}).await;
    let s = setup(
        Some(format!("\"{silent}\", \"{}\"", mauve_only.addr)),
        "{ interval: 0s }",
    )
    .await;
    let t = std::time::Instant::now();
    assert_eq!(
        served_by(&s.proxy, "bob", "password").await.unwrap(),
        "Subject: hello from mauve"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "waited for the login timeout"
    );
    // Marked down: the next login does not wait again.
    let t = std::time::Instant::now();
    assert_eq!(
        served_by(&s.proxy, "bob", "password").await.unwrap(),
        "Subject: hello from mauve"
    );
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "down server skipped"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn recovered_server_is_used_again() {
    // green starts dead; active checks every 100 ms bring it back once it listens.
    let green_socket = dead_socket();
    let green_addr = green_socket.local_addr().unwrap();
    let mauve_only = fake("mauve", Protocol::Imap, |_| {}).await;
    let s = setup(
        Some(format!("\"{green_addr}\", \"{}\"", mauve_only.addr)),
        "{ interval: 100ms, rise: 1, fall: 1 }",
    )
    .await;
    assert_eq!(
        served_by(&s.proxy, "bob", "password").await.unwrap(),
        "Subject: hello from mauve"
    );
    let _green = FakeBackend::serve_on(
        green_socket.listen(64).unwrap(),
        cutover::demo::FakeConfig::new("green", Protocol::Imap),
    )
    .unwrap();
    let mut landed = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        landed = served_by(&s.proxy, "bob", "password").await.unwrap();
        if landed.ends_with("green") {
            break;
        }
    }
    assert_eq!(landed, "Subject: hello from green");
    s.proxy.stop().await;
}

#[tokio::test]
async fn wrong_password_is_not_failed_over_and_client_may_retry() {
    let s = setup(None, "{ interval: 0s }").await;
    let mut c = Client::connect_tls(s.proxy.addr("imaps")).await;
    c.line().await;
    let r = c.cmd("a1", "LOGIN bob wrong").await;
    let last = r.last().unwrap();
    assert!(last.starts_with("a1 NO [AUTHENTICATIONFAILED]"), "{last}");
    assert!(
        s.mauve.logins.lock().unwrap().is_empty(),
        "no failover on a rejection"
    );
    let r = c.cmd("a2", "LOGIN bob password").await;
    assert!(r.last().unwrap().starts_with("a2 OK"), "{r:?}");
    assert_eq!(fetch_subject(&mut c).await, "Subject: hello from green");
    s.proxy.stop().await;
}

#[tokio::test]
async fn all_servers_down_is_a_temporary_failure() {
    let (a, b) = (dead_addr().await, dead_addr().await);
    let s = setup(Some(format!("\"{a}\", \"{b}\"")), "{ interval: 0s }").await;
    let r = served_by(&s.proxy, "bob", "password").await.unwrap_err();
    assert!(
        r.last().unwrap().starts_with("a1 NO [UNAVAILABLE]"),
        "{r:?}"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn starttls_listener_refuses_login_before_tls_and_pipelines_after_login() {
    let s = setup(None, "{ interval: 0s }").await;
    let mut c = Client::connect(s.proxy.addr("imap")).await;
    let greeting = c.line().await.unwrap();
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    let r = c.cmd("a0", "LOGIN joeuser password").await;
    assert!(r.last().unwrap().starts_with("a0 NO"), "{r:?}");
    let r = c.cmd("a1", "STARTTLS").await;
    assert!(r.last().unwrap().starts_with("a1 OK"));
    c.start_tls().await;
    let r = c.cmd("a2", "CAPABILITY").await;
    assert!(
        !r[0].contains("STARTTLS") && r[0].contains("AUTH=PLAIN"),
        "{r:?}"
    );
    // LOGIN with a literal, SELECT pipelined behind it in the same write.
    c.send(b"a3 LOGIN {7}\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+"));
    c.send(b"joeuser password\r\na4 SELECT INBOX\r\n").await;
    let r = c.until("a3 ").await;
    assert!(r.last().unwrap().starts_with("a3 OK [CAPABILITY"), "{r:?}");
    let r = c.until("a4 ").await;
    assert!(r.last().unwrap().starts_with("a4 OK"), "{r:?}");
    c.send(b"i1 IDLE\r\n").await;
    assert!(
        c.line().await.unwrap().starts_with("+ "),
        "IDLE continuation relayed"
    );
    c.send(b"DONE\r\n").await;
    assert!(c.line().await.unwrap().starts_with("i1 OK"));
    s.proxy.stop().await;
}

#[tokio::test]
async fn authenticate_plain_and_login_to_a_login_only_backend() {
    // green does not offer AUTH=PLAIN: the proxy must replay with LOGIN.
    let s = setup(None, "{ interval: 0s }").await;
    let mut c = Client::connect_tls(s.proxy.addr("imaps")).await;
    c.line().await;
    // "\0bob\0password"
    let r = c.cmd("a1", "AUTHENTICATE PLAIN AGJvYgBwYXNzd29yZA==").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    assert_eq!(fetch_subject(&mut c).await, "Subject: hello from green");
    let mut c = Client::connect_tls(s.proxy.addr("imaps")).await;
    c.line().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+"));
    c.send(b"AGpvZXVzZXIAcGFzc3dvcmQ=\r\n").await;
    let r = c.until("a1 ").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    assert_eq!(fetch_subject(&mut c).await, "Subject: hello from new");
    assert_eq!(s.new.logins.lock().unwrap().as_slice(), ["joeuser"]);
    s.proxy.stop().await;
}

#[tokio::test]
async fn metrics_count_logins_by_result() {
    let (a, b) = (dead_addr().await, dead_addr().await);
    let s = setup(None, "{ interval: 0s }").await;
    let down = setup(Some(format!("\"{a}\", \"{b}\"")), "{ interval: 0s }").await;
    let before = scrape(s.proxy.metrics_addr()).await;
    served_by(&s.proxy, "bob", "password").await.unwrap();
    served_by(&s.proxy, "bob", "nope").await.unwrap_err();
    served_by(&down.proxy, "bob", "password").await.unwrap_err();
    let after = scrape(s.proxy.metrics_addr()).await;
    let d = |r: &str| {
        let l = [("protocol", "imap"), ("pool", "legacy"), ("result", r)];
        metric(&after, "cutover_logins_total", &l).unwrap_or(0.0)
            - metric(&before, "cutover_logins_total", &l).unwrap_or(0.0)
    };
    assert!(d("ok") >= 1.0);
    assert!(d("auth_failed") >= 1.0);
    assert!(d("backend_unavailable") >= 1.0);
    assert!(!after.contains("bob"), "no user names in metrics");
    s.proxy.stop().await;
    down.proxy.stop().await;
}

#[tokio::test]
async fn logout_gets_the_backend_goodbye_then_the_close_plain_and_tls() {
    // The backend answers LOGOUT and closes at once: the proxy holds that last answer for
    // its close (one segment with the FIN on plain TCP). Every byte of it must still
    // arrive, followed by the close, on both kinds of listener.
    let s = setup(None, "{ interval: 0s }").await;
    for tls in [false, true] {
        let mut c = if tls {
            Client::connect_tls(s.proxy.addr("imaps")).await
        } else {
            Client::connect(s.proxy.addr("plain")).await
        };
        c.line().await.unwrap();
        let r = c.cmd("a1", "LOGIN bob password").await;
        assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
        // A pipelined command ahead of the LOGOUT is answered too.
        c.send(b"a2 NOOP\r\na3 LOGOUT\r\n").await;
        let r = c.until("a3 ").await;
        assert!(r.iter().any(|l| l.starts_with("a2 OK")), "{r:?}");
        assert!(r.iter().any(|l| l.starts_with("* BYE")), "{r:?}");
        assert!(r.last().unwrap().starts_with("a3 OK"), "{r:?}");
        assert!(
            c.closed().await,
            "the proxy closes after the backend's goodbye"
        );
    }
    s.proxy.stop().await;
}

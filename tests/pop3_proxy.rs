//! POP3 through the proxy, against in-process fake backends.
mod common;

use common::*;
use cutover::config::Protocol;

async fn setup(green_alive: bool) -> (Proxy, Vec<cutover::demo::FakeBackend>) {
    let new = fake("new", Protocol::Pop3, |c| c.tls = Some(server_tls())).await;
    let green = fake("green", Protocol::Pop3, |_| {}).await;
    let mauve = fake("mauve", Protocol::Pop3, |_| {}).await;
    let green_addr = if green_alive {
        green.addr
    } else {
        dead_addr().await
    };
    let yaml = format!(
        r#"
tls:
  certificates: [{{ cert: certs/proxy.pem, key: certs/proxy-key.pem }}]
listeners:
  - {{ name: pop3, protocol: pop3, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: pop3s, protocol: pop3, listen: "127.0.0.1:0", tls: implicit }}
pools:
  new:
    pop3: {{ servers: ["{new}"], tls: starttls, ca: certs/ca.pem }}
  legacy:
    connect_timeout: 1s
    health: {{ interval: 0s }}
    pop3: {{ servers: ["{green_addr}", "{mauve}"] }}
routes:
  - {{ users: [joeuser], pool: new }}
  - {{ pool: legacy }}
metrics: {{ listen: "127.0.0.1:0" }}
shutdown: {{ drain_timeout: 1s }}
"#,
        new = new.addr,
        mauve = mauve.addr,
    );
    (Proxy::start(&yaml).await, vec![new, green, mauve])
}

async fn retr_subject(c: &mut Client) -> String {
    c.send(b"RETR 1\r\n").await;
    let lines = c.until(".").await;
    lines
        .into_iter()
        .find(|l| l.starts_with("Subject:"))
        .unwrap_or_default()
}

#[tokio::test]
async fn pop3s_login_routes_to_new_over_backend_starttls() {
    let (proxy, _b) = setup(true).await;
    let mut c = Client::connect_tls(proxy.addr("pop3s")).await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    c.send(b"USER joeuser\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    c.send(b"PASS password\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"), "login ok");
    assert_eq!(retr_subject(&mut c).await, "Subject: hello from new");
    c.send(b"QUIT\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    proxy.stop().await;
}

#[tokio::test]
async fn stls_then_auth_plain_reaches_green_and_fails_over_to_mauve() {
    for (alive, expect) in [(true, "green"), (false, "mauve")] {
        let (proxy, _b) = setup(alive).await;
        let mut c = Client::connect(proxy.addr("pop3")).await;
        assert!(c.line().await.unwrap().starts_with("+OK"));
        // Before TLS, authentication is refused.
        c.send(b"USER bob\r\n").await;
        assert!(c.line().await.unwrap().starts_with("-ERR"));
        c.send(b"STLS\r\n").await;
        assert!(c.line().await.unwrap().starts_with("+OK"));
        c.start_tls().await;
        // AUTH PLAIN with initial response, "\0bob\0password".
        c.send(b"AUTH PLAIN AGJvYgBwYXNzd29yZA==\r\nSTAT\r\n").await;
        assert!(c.line().await.unwrap().starts_with("+OK"), "login ok");
        assert!(
            c.line().await.unwrap().starts_with("+OK 1 "),
            "pipelined STAT answered by the backend"
        );
        assert_eq!(
            retr_subject(&mut c).await,
            format!("Subject: hello from {expect}")
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn wrong_password_gets_err_and_may_retry() {
    let (proxy, b) = setup(true).await;
    let lbl = |r| [("protocol", "pop3"), ("pool", "legacy"), ("result", r)];
    let before = scrape(proxy.metrics_addr()).await;
    let mut c = Client::connect_tls(proxy.addr("pop3s")).await;
    c.line().await;
    c.send(b"USER bob\r\nPASS nope\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    let l = c.line().await.unwrap();
    assert!(l.starts_with("-ERR [AUTH]"), "{l}");
    c.send(b"USER bob\r\nPASS password\r\n").await;
    c.line().await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    assert_eq!(b[1].logins.lock().unwrap().as_slice(), ["bob"]);
    let m = scrape(proxy.metrics_addr()).await;
    // The recorder is process-wide and tests run in parallel: compare deltas.
    let delta = |r| {
        metric(&m, "cutover_logins_total", &lbl(r)).unwrap_or(0.0)
            - metric(&before, "cutover_logins_total", &lbl(r)).unwrap_or(0.0)
    };
    assert_eq!(delta("auth_failed"), 1.0);
    assert!(delta("ok") >= 1.0);
    proxy.stop().await;
}

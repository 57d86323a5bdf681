//! The PROXY protocol through the real proxy: headers from a trusted balancer name the
//! client for limits, throttles, the bridge, the admin API and backends; untrusted ones
//! are refused; backends that want one get a v2 header (probes a `LOCAL` one).
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use cutover::config::Protocol;
use cutover::proto::proxy::{self, Parsed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn yaml(backend: SocketAddr, pop: SocketAddr, smtp: SocketAddr, extra: &str) -> String {
    format!(
        r#"
proxy_protocol: {{ trusted: ["127.0.0.0/8"], timeout: 500ms }}
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true, proxy_protocol: required }}
  - {{ name: pop3, protocol: pop3, listen: "127.0.0.1:0", allow_plaintext_auth: true, proxy_protocol: required }}
  - {{ name: compat, protocol: smtp, listen: "127.0.0.1:0", allow_plaintext_auth: true, relay: pop-before-smtp, proxy_protocol: required }}
  - {{ name: direct, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true, proxy_protocol: optional }}
pools:
  p:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{backend}"] }}
    pop3: {{ servers: ["{pop}"] }}
    smtp: {{ servers: ["{smtp}"] }}
routes:
  - {{ pool: p }}
admin: {{ listen: "127.0.0.1:0" }}
metrics: {{ listen: "127.0.0.1:0" }}
shutdown: {{ drain_timeout: 1s }}
{extra}
"#
    )
}

/// A connection that first says, as a balancer would, that `client` is connecting.
async fn via_balancer(addr: SocketAddr, client: &str) -> Client {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let header = proxy::v2_header(client.parse().unwrap(), addr);
    s.write_all(&header).await.unwrap();
    Client::from_stream(s)
}

async fn admin(proxy: &Proxy, path: &str) -> String {
    let addr = proxy.running.as_ref().unwrap().admin.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// An IMAP backend that requires a PROXY header on every connection and records whom
/// each one names (`LOCAL` for the proxy's own probes).
async fn proxied_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let header = loop {
                    let mut chunk = [0u8; 512];
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    match proxy::parse(&buf) {
                        Parsed::NeedMore(_) => continue,
                        Parsed::Header(h) => break h,
                        other => {
                            rec.lock().unwrap().push(format!("refused: {other:?}"));
                            return;
                        }
                    }
                };
                let who = header.client.map_or("LOCAL".to_string(), |c| c.to_string());
                rec.lock().unwrap().push(who);
                let _ = s
                    .write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
                    .await;
                let mut rest = buf.split_off(header.len);
                loop {
                    while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
                        let line: Vec<u8> = rest.drain(..p + 2).collect();
                        let line = String::from_utf8_lossy(&line);
                        let tag = line.split(' ').next().unwrap_or("*").to_string();
                        let reply = if line.contains("LOGOUT") {
                            format!("* BYE\r\n{tag} OK bye\r\n")
                        } else {
                            format!("{tag} OK done\r\n")
                        };
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 512];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => rest.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn the_header_names_the_client_for_the_admin_api_and_the_backend() {
    let (backend, seen) = proxied_backend().await;
    let pop = fake("p", Protocol::Pop3, |_| {}).await;
    let smtp = fake("s", Protocol::Smtp, |_| {}).await;
    let extra = "instance_name: proxy-a";
    let yaml = yaml(backend, pop.addr, smtp.addr, extra).replace(
        "    health: { interval: 0s }\n    imap:",
        "    health: { interval: 0s }\n    proxy_protocol: v2\n    imap:",
    );
    let proxy = Proxy::start(&yaml).await;
    let mut c = via_balancer(proxy.addr("imap"), "192.0.2.7:40000").await;
    c.login_ok("bob").await;
    let sessions = admin(&proxy, "/sessions").await;
    assert!(
        sessions.contains("\"client\":\"192.0.2.7:40000\""),
        "{sessions}"
    );
    assert!(sessions.contains("\"instance\":\"proxy-a\""), "{sessions}");
    assert!(
        !sessions.contains("127.0.0.1"),
        "the balancer is not the client: {sessions}"
    );
    // The backend was told the client's address, not the proxy's.
    assert_eq!(seen.lock().unwrap().as_slice(), ["192.0.2.7:40000"]);
    let r = c.cmd("b", "NOOP").await;
    assert_eq!(r, ["b OK done"]);
    proxy.stop().await;
}

#[tokio::test]
async fn health_probes_send_a_local_header() {
    let (backend, seen) = proxied_backend().await;
    let pop = fake("p", Protocol::Pop3, |_| {}).await;
    let smtp = fake("s", Protocol::Smtp, |_| {}).await;
    let yaml = yaml(backend, pop.addr, smtp.addr, "").replace(
        "    health: { interval: 0s }\n    imap:",
        "    health: { interval: 100ms }\n    proxy_protocol: v2\n    imap:",
    );
    let proxy = Proxy::start(&yaml).await;
    for _ in 0..50 {
        if !seen.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = seen.lock().unwrap().first().cloned();
    assert_eq!(first.as_deref(), Some("LOCAL"));
    proxy.stop().await;
}

#[tokio::test]
async fn headers_from_untrusted_addresses_are_refused() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let pop = fake("p", Protocol::Pop3, |_| {}).await;
    let smtp = fake("s", Protocol::Smtp, |_| {}).await;
    let yaml = yaml(backend.addr, pop.addr, smtp.addr, "")
        .replace("trusted: [\"127.0.0.0/8\"]", "trusted: [\"10.0.0.0/8\"]");
    let proxy = Proxy::start(&yaml).await;
    // Required: closed before any greeting.
    let mut c = via_balancer(proxy.addr("imap"), "192.0.2.7:1").await;
    assert!(c.closed().await);
    // Optional: a direct client is served at once...
    let mut c = Client::connect(proxy.addr("direct")).await;
    c.login_ok("bob").await;
    // ... but one that sends a header, claiming someone else's address, is closed.
    let mut c = via_balancer(proxy.addr("direct"), "192.0.2.7:1").await;
    let greeting = c.line().await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    assert!(c.closed().await);
    let body = scrape(proxy.metrics_addr()).await;
    let untrusted = metric(
        &body,
        "cutover_connections_refused_total",
        &[("listener", "imap"), ("reason", "proxy_untrusted")],
    );
    assert_eq!(untrusted, Some(1.0), "{body}");
    let screened = metric(
        &body,
        "cutover_connections_refused_total",
        &[("listener", "direct"), ("reason", "proxy_untrusted")],
    );
    assert_eq!(screened, Some(1.0));
    proxy.stop().await;
}

#[tokio::test]
async fn per_address_limits_count_the_clients_behind_the_balancer() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let pop = fake("p", Protocol::Pop3, |_| {}).await;
    let smtp = fake("s", Protocol::Smtp, |_| {}).await;
    let extra = "limits: { max_connections_per_ip: 1 }";
    let proxy = Proxy::start(&yaml(backend.addr, pop.addr, smtp.addr, extra)).await;
    let addr = proxy.addr("imap");
    let mut a = via_balancer(addr, "192.0.2.1:1000").await;
    a.login_ok("bob").await;
    // Another client behind the same balancer: admitted.
    let mut b = via_balancer(addr, "192.0.2.2:1000").await;
    b.login_ok("bob").await;
    // The same client again: over its own limit.
    let mut again = via_balancer(addr, "192.0.2.1:1001").await;
    let l = again.line().await.unwrap();
    assert!(l.starts_with("* BYE [UNAVAILABLE]"), "{l}");
    proxy.stop().await;
}

#[tokio::test]
async fn the_bridge_tells_clients_apart_behind_a_balancer() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let pop = fake("p", Protocol::Pop3, |_| {}).await;
    let smtp = fake("s", Protocol::Smtp, |c| c.smtp_no_auth = true).await;
    let proxy = Proxy::start(&yaml(backend.addr, pop.addr, smtp.addr, "")).await;
    // A POP3 login from 192.0.2.7 opens the window for 192.0.2.7 only.
    let mut p = via_balancer(proxy.addr("pop3"), "192.0.2.7:5000").await;
    assert!(p.line().await.unwrap().starts_with("+OK"));
    p.send(b"USER bob\r\n").await;
    assert!(p.line().await.unwrap().starts_with("+OK"));
    p.send(b"PASS password\r\n").await;
    assert!(p.line().await.unwrap().starts_with("+OK"), "POP3 login");
    let mail = |client: &'static str| {
        let addr = proxy.addr("compat");
        async move {
            let mut s = via_balancer(addr, client).await;
            s.line().await;
            s.send(b"EHLO c\r\n").await;
            s.until("250 ").await;
            s.send(b"MAIL FROM:<bob@example.net>\r\n").await;
            s.line().await.unwrap()
        }
    };
    let same = mail("192.0.2.7:6000").await;
    assert!(same.starts_with("250"), "bridged: {same}");
    let other = mail("192.0.2.8:6000").await;
    assert!(other.starts_with("530 5.7.0"), "not bridged: {other}");
    proxy.stop().await;
}

#[test]
fn a_listener_that_takes_headers_needs_a_trusted_network() {
    let yaml = r#"
listeners:
  - { name: imap, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true, proxy_protocol: required }
pools:
  p:
    imap: { servers: ["127.0.0.1:1"] }
routes:
  - { pool: p }
"#;
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let err = cutover::config::Config::from_text(yaml, &base.join("t.yaml"), base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("listeners[0].proxy_protocol"), "{err}");
    assert!(err.contains("trusted"), "{err}");
}

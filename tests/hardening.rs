//! Hostile input and faults: STARTTLS injection on both sides, malicious backends, limits,
//! password spraying, drain, and backends that die mid-session.
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cutover::config::Protocol;

fn proxy_yaml(imap_pool: &str, extra: &str) -> String {
    format!(
        r#"
tls:
  certificates: [{{ cert: certs/proxy.pem, key: certs/proxy-key.pem }}]
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit }}
  - {{ name: plain, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
pools:
  p:
    connect_timeout: 1s
    login_timeout: 2s
    health: {{ interval: 0s }}
    {imap_pool}
routes:
  - {{ pool: p }}
metrics: {{ listen: "127.0.0.1:0" }}
shutdown: {{ drain_timeout: 1s }}
{extra}
"#
    )
}

async fn imap_proxy_for(backend: SocketAddr, tls: &str, extra: &str) -> Proxy {
    let pool = format!("imap: {{ servers: [\"{backend}\"], tls: {tls}, ca: certs/ca.pem }}");
    Proxy::start(&proxy_yaml(&pool, extra)).await
}

async fn login_over_tls(proxy: &Proxy, user: &str, pass: &str) -> (Client, Vec<String>) {
    let mut c = Client::connect_tls(proxy.addr("imaps")).await;
    c.line().await;
    let r = c.cmd("a1", &format!("LOGIN {user} {pass}")).await;
    (c, r)
}

// ---------------------------------------------------------------- client-side STARTTLS

#[tokio::test]
async fn imap_command_pipelined_after_starttls_is_never_executed_inside_tls() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(backend.addr, "none", "").await;
    let mut c = Client::connect(proxy.addr("imap")).await;
    c.line().await;
    c.send(b"A STARTTLS\r\nXYZQW NOOP\r\n").await;
    assert!(c.line().await.unwrap().starts_with("A OK"));
    c.start_tls().await;
    let r = c.cmd("B", "CAPABILITY").await;
    assert!(
        r.iter().all(|l| !l.starts_with("XYZQW")),
        "injected command answered: {r:?}"
    );
    assert!(
        r[0].starts_with("* CAPABILITY") && !r[0].contains("STARTTLS"),
        "fresh caps: {r:?}"
    );
    // STARTTLS twice is refused.
    let r = c.cmd("C", "STARTTLS").await;
    assert!(
        r.last().unwrap().starts_with("C BAD") || r.last().unwrap().starts_with("C NO"),
        "{r:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn imap_injection_split_across_writes_gets_no_answer_inside_tls() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(backend.addr, "none", "").await;
    let mut c = Client::connect(proxy.addr("imap")).await;
    c.line().await;
    c.send(b"A STARTTLS\r\n").await;
    c.send(b"XYZQW NOOP\r\n").await;
    assert!(c.line().await.unwrap().starts_with("A OK"));
    // Either the handshake fails (the injected bytes arrived where a ClientHello was
    // expected) or it succeeds and the injected command is never answered.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = tokio::net::TcpStream::connect(proxy.addr("imap"))
        .await
        .unwrap();
    drop(tcp);
    let _ = name;
    let answered = tokio::time::timeout(Duration::from_secs(3), async {
        let mut raw = Vec::new();
        // Whatever the proxy sends now is TLS or nothing; it must not be a tagged reply.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(l) = c.line().await {
                raw.push(l)
            }
        })
        .await;
        raw.iter().any(|l| l.starts_with("XYZQW"))
    })
    .await
    .unwrap_or(false);
    assert!(!answered);
    proxy.stop().await;
}

#[tokio::test]
async fn plaintext_sent_to_an_implicit_tls_port_is_never_parsed() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(backend.addr, "none", "").await;
    let mut c = Client::connect(proxy.addr("imaps")).await;
    c.send(b"a1 LOGIN bob password\r\n").await;
    assert!(c.closed().await);
    assert!(backend.logins.lock().unwrap().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn pop3_and_smtp_discard_bytes_pipelined_after_starttls() {
    let pop = fake("b", Protocol::Pop3, |_| {}).await;
    let smtp = fake("b", Protocol::Smtp, |_| {}).await;
    let yaml = format!(
        r#"
tls:
  certificates: [{{ cert: certs/proxy.pem, key: certs/proxy-key.pem }}]
listeners:
  - {{ name: pop3, protocol: pop3, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: smtp, protocol: smtp, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: smtps, protocol: smtp, listen: "127.0.0.1:0", tls: implicit }}
pools:
  p:
    health: {{ interval: 0s }}
    pop3: {{ servers: ["{}"] }}
    smtp: {{ servers: ["{}"] }}
routes: [{{ pool: p }}]
"#,
        pop.addr, smtp.addr
    );
    let proxy = Proxy::start(&yaml).await;
    // POP3: STLS\r\nCAPA\r\n in one write: CAPA is not answered inside TLS.
    let mut c = Client::connect(proxy.addr("pop3")).await;
    c.line().await;
    c.send(b"STLS\r\nCAPA\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    c.start_tls().await;
    c.send(b"NOOP\r\n").await;
    let l = c.line().await.unwrap();
    assert!(
        l.starts_with("-ERR"),
        "the first answer inside TLS is NOOP's, not CAPA's: {l}"
    );
    c.send(b"STLS\r\n").await;
    assert!(c.line().await.unwrap().starts_with("-ERR"), "STLS twice");
    // SMTP: STARTTLS\r\nRSET\r\n after EHLO; the pre-TLS EHLO is forgotten.
    let mut c = Client::connect(proxy.addr("smtp")).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.until("250 ").await;
    c.send(b"STARTTLS\r\nRSET\r\n").await;
    assert!(c.line().await.unwrap().starts_with("220"));
    c.start_tls().await;
    c.send(b"AUTH PLAIN AGJvYgBwYXNzd29yZA==\r\n").await;
    let l = c.line().await.unwrap();
    assert!(
        l.starts_with("503"),
        "EHLO forgotten after STARTTLS, RSET not answered: {l}"
    );
    c.send(b"STARTTLS\r\n").await;
    let l = c.line().await.unwrap();
    assert!(l.starts_with("5"), "STARTTLS twice: {l}");
    // STARTTLS on an implicit-TLS SMTP port is refused.
    let mut c = Client::connect_tls(proxy.addr("smtps")).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    let ehlo = c.until("250 ").await;
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")));
    c.send(b"STARTTLS\r\n").await;
    assert!(c.line().await.unwrap().starts_with("5"));
    proxy.stop().await;
}

// ---------------------------------------------------------------- malicious backends

const CAPS_TLS: &str = "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] evil ready\r\n";

async fn expect_unavailable_and_no_credentials(backend: Scripted) {
    let proxy = imap_proxy_for(backend.addr, "starttls", "").await;
    let (_c, r) = login_over_tls(&proxy, "bob", "s3cret").await;
    assert!(
        r.last().unwrap().starts_with("a1 NO [UNAVAILABLE]"),
        "{r:?}"
    );
    let got = backend.received.lock().unwrap().clone();
    assert!(
        !got.iter().any(|l| l.contains("s3cret")
            || l.to_ascii_uppercase().contains("LOGIN ")
            || l.to_ascii_uppercase().contains("AUTHENTICATE")),
        "credentials reached a backend that is not safe: {got:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn backend_refusing_starttls_is_unavailable_never_used_in_plaintext() {
    for answer in ["BAD no tls for you", "NO not today"] {
        let b = scripted(CAPS_TLS, move |l, _| {
            Reply::Send(format!("{} {answer}\r\n", tag(l)).into_bytes())
        })
        .await;
        expect_unavailable_and_no_credentials(b).await;
    }
}

#[tokio::test]
async fn backend_hiding_starttls_or_sending_preauth_is_unavailable() {
    let hidden = scripted(
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n",
        |l, _| Reply::Send(format!("{} OK done\r\n", tag(l)).into_bytes()),
    )
    .await;
    expect_unavailable_and_no_credentials(hidden).await;
    let preauth = scripted(
        "* PREAUTH [CAPABILITY IMAP4rev1] welcome root\r\n",
        |l, _| Reply::Send(format!("{} OK done\r\n", tag(l)).into_bytes()),
    )
    .await;
    expect_unavailable_and_no_credentials(preauth).await;
}

#[tokio::test]
async fn bytes_injected_after_backend_starttls_ok_are_discarded_and_caps_reread() {
    // After "OK begin" the evil backend appends a fake CAPABILITY offering AUTH=PLAIN;
    // inside TLS it really offers only LOGIN. The proxy must use LOGIN.
    let b = scripted(CAPS_TLS, |l, tls| {
        let t = tag(l);
        let upper = l.to_ascii_uppercase();
        if upper.contains("STARTTLS") {
            Reply::StartTls(
                format!("{t} OK begin\r\n* CAPABILITY IMAP4REV1 AUTH=PLAIN\r\n").into_bytes(),
            )
        } else if upper.contains("CAPABILITY") && tls {
            Reply::Send(format!("* CAPABILITY IMAP4rev1\r\n{t} OK done\r\n").into_bytes())
        } else if upper.starts_with(&format!("{t} LOGIN")) {
            Reply::Send(format!("{t} OK [CAPABILITY IMAP4rev1 IDLE] in\r\n").into_bytes())
        } else if upper.contains("AUTHENTICATE") {
            Reply::Send(format!("{t} NO used the injected capability\r\n").into_bytes())
        } else {
            Reply::Send(format!("{t} OK done\r\n").into_bytes())
        }
    })
    .await;
    let proxy = imap_proxy_for(b.addr, "starttls", "").await;
    let (_c, r) = login_over_tls(&proxy, "bob", "s3cret").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    let got = b.received.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|l| l.to_ascii_uppercase().contains(" LOGIN ")),
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|l| l.to_ascii_uppercase().contains("AUTHENTICATE")),
        "{got:?}"
    );
    proxy.stop().await;
}

/// An older backend: bare greeting; `CAPABILITY` answers with PLAIN, and SASL-IR while
/// `sasl_ir` is set; a one-line `AUTHENTICATE PLAIN` is refused once SASL-IR is gone.
fn legacy_backend(sasl_ir: Arc<AtomicBool>) -> impl Fn(&str, bool) -> Reply + Send + Sync {
    move |l, _| {
        let t = tag(l);
        let upper = l.to_ascii_uppercase();
        let ir = sasl_ir.load(Ordering::SeqCst);
        let reply = if upper.ends_with(" CAPABILITY") {
            let extra = if ir { " SASL-IR" } else { "" };
            format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN{extra}\r\n{t} OK done\r\n")
        } else if upper.contains(" AUTHENTICATE PLAIN ") && !ir {
            format!("{t} BAD no initial response here\r\n")
        } else if upper.contains(" LOGIN ") || upper.contains(" AUTHENTICATE PLAIN") {
            format!("{t} OK in\r\n")
        } else if upper.ends_with(" LOGOUT") {
            format!("* BYE bye\r\n{t} OK out\r\n")
        } else {
            format!("{t} OK done\r\n")
        };
        Reply::Send(reply.into_bytes())
    }
}

#[tokio::test]
async fn backend_capabilities_are_remembered_and_relearned_when_they_change() {
    let sasl_ir = Arc::new(AtomicBool::new(true));
    let b = scripted("* OK ready\r\n", legacy_backend(sasl_ir.clone())).await;
    let proxy = imap_proxy_for(b.addr, "none", "").await;
    let received = |b: &Scripted| std::mem::take(&mut *b.received.lock().unwrap());
    let login = |user: &'static str| {
        let proxy = &proxy;
        async move {
            let (mut c, r) = login_over_tls(proxy, user, "pw").await;
            assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
            c.cmd("a2", "LOGOUT").await;
        }
    };
    // First login: the server's list is read once.
    login("ann").await;
    let first = received(&b);
    assert!(first[0].ends_with(" CAPABILITY"), "{first:?}");
    assert!(first[1].contains(" AUTHENTICATE PLAIN "), "{first:?}");
    // Second login: remembered, no CAPABILITY round trip.
    login("bob").await;
    let second = received(&b);
    assert!(
        second.iter().all(|l| !l.ends_with(" CAPABILITY")),
        "{second:?}"
    );
    assert!(second[0].contains(" AUTHENTICATE PLAIN "), "{second:?}");
    // The server drops SASL-IR: the one-line PLAIN is refused, the list read again and
    // the login made under it; the client never sees the stale attempt.
    sasl_ir.store(false, Ordering::SeqCst);
    login("cat").await;
    let third = received(&b);
    assert!(third[0].contains(" AUTHENTICATE PLAIN "), "{third:?}");
    assert!(third[1].ends_with(" CAPABILITY"), "{third:?}");
    assert!(third[2].contains(" LOGIN \"cat\" \"pw\""), "{third:?}");
    // And the new list is what the next login uses.
    login("dan").await;
    let fourth = received(&b);
    assert!(fourth[0].contains(" LOGIN \"dan\" \"pw\""), "{fourth:?}");
    assert!(
        fourth.iter().all(|l| !l.ends_with(" CAPABILITY")),
        "{fourth:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn untagged_alerts_and_referrals_never_reach_the_client() {
    let b = scripted("* OK [ALERT] pwned-before-login\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n", |l, _| {
        let t = tag(l);
        Reply::Send(format!("* OK [ALERT] pwned-during-login\r\n{t} NO [REFERRAL imap://evil.example/] go there\r\n").into_bytes())
    })
    .await;
    let proxy = imap_proxy_for(b.addr, "none", "").await;
    let (_c, r) = login_over_tls(&proxy, "bob", "pw").await;
    let all = r.join("\n");
    assert!(r.last().unwrap().starts_with("a1 NO"), "{r:?}");
    assert!(
        !all.contains("pwned") && !all.contains("REFERRAL") && !all.contains("evil"),
        "{all}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_backend_certificate_the_pool_ca_does_not_trust_gets_no_credentials() {
    let untrusted = cutover::tls::server_config(&[cutover::config::CertFiles {
        cert: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/untrusted.pem").into(),
        key: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/untrusted-key.pem").into(),
    }])
    .unwrap();
    let backend = fake("evil", Protocol::Imap, |c| c.tls = Some(untrusted)).await;
    let proxy = imap_proxy_for(backend.addr, "starttls", "").await;
    let before = scrape(proxy.metrics_addr()).await;
    let (_c, r) = login_over_tls(&proxy, "bob", "password").await;
    assert!(
        r.last().unwrap().starts_with("a1 NO [UNAVAILABLE]"),
        "{r:?}"
    );
    assert!(backend.logins.lock().unwrap().is_empty());
    let after = scrape(proxy.metrics_addr()).await;
    let server = backend.addr.to_string();
    let l = [("reason", "tls"), ("server", server.as_str())];
    assert!(
        metric(&after, "cutover_backend_connect_failures_total", &l).unwrap_or(0.0)
            > metric(&before, "cutover_backend_connect_failures_total", &l).unwrap_or(0.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn credentials_with_syntax_characters_reach_the_backend_as_one_login() {
    let b = scripted("* OK [CAPABILITY IMAP4rev1] hi\r\n", |l, _| {
        Reply::Send(format!("{} NO [AUTHENTICATIONFAILED] nope\r\n", tag(l)).into_bytes())
    })
    .await;
    let proxy = imap_proxy_for(b.addr, "none", "").await;
    let mut c = Client::connect_tls(proxy.addr("imaps")).await;
    c.line().await;
    // Password: a"b\c {5} then CR LF and a command, as a literal.
    let pw = b"a\"b\\c {5}\r\nC9 LOGOUT";
    c.send(format!("a1 LOGIN bob {{{}}}\r\n", pw.len()).as_bytes())
        .await;
    assert!(c.line().await.unwrap().starts_with('+'));
    c.send(pw).await;
    c.send(b"\r\n").await;
    let r = c.until("a1 ").await;
    assert!(r.last().unwrap().starts_with("a1 NO"), "{r:?}");
    let got = b.received.lock().unwrap().clone();
    // Exactly one command arrived, and the password is inside it whole (as a literal).
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("a\"b\\c {5}\r\nC9 LOGOUT"), "{got:?}");
    proxy.stop().await;
}

// ---------------------------------------------------------------- limits and spraying

#[tokio::test]
async fn connections_over_the_per_address_limit_get_a_protocol_goodbye() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(
        backend.addr,
        "none",
        "limits: { max_connections_per_ip: 2 }",
    )
    .await;
    let mut a = Client::connect(proxy.addr("plain")).await;
    let mut b = Client::connect(proxy.addr("plain")).await;
    assert!(a.line().await.unwrap().starts_with("* OK"));
    assert!(b.line().await.unwrap().starts_with("* OK"));
    let mut c = Client::connect(proxy.addr("plain")).await;
    let l = c.line().await.unwrap();
    assert!(
        l.starts_with("* BYE [UNAVAILABLE] Too many connections"),
        "{l}"
    );
    assert!(c.closed().await);
    let m = scrape(proxy.metrics_addr()).await;
    assert!(
        metric(
            &m,
            "cutover_connections_refused_total",
            &[("listener", "plain"), ("reason", "max_per_ip")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut d = Client::connect(proxy.addr("plain")).await;
    assert!(
        d.line().await.unwrap().starts_with("* OK"),
        "a freed place is reused"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn idle_and_oversized_clients_are_cut_off_in_protocol() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(
        backend.addr,
        "none",
        "limits: { preauth_timeout: 300ms, max_line: 1024 }",
    )
    .await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    let t = Instant::now();
    let l = c.line().await.unwrap();
    assert!(l.starts_with("* BYE"), "{l}");
    assert!(c.closed().await);
    assert!(t.elapsed() < Duration::from_secs(3));
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    c.send(&vec![b'a'; 5000]).await;
    let l = c.line().await.unwrap();
    assert!(l.starts_with("* BAD") || l.starts_with("* BYE"), "{l}");
    assert!(c.closed().await);
    proxy.stop().await;
}

#[tokio::test]
async fn password_spraying_is_slowed_then_refused_but_other_users_are_not() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let extra = "auth_throttle: { ip_failures: 100, user_failures: 3, window: 1m, block: 3s, delay: 100ms, max_delay: 400ms }\nlimits: { max_auth_failures: 10 }";
    let proxy = imap_proxy_for(backend.addr, "none", extra).await;
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.line().await;
    let mut took = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let r = c.cmd(&format!("a{i}"), "LOGIN bob wrong").await;
        assert!(r.last().unwrap().contains("NO"), "{r:?}");
        took.push(t.elapsed());
    }
    assert!(
        took[0] >= Duration::from_millis(100) && took[1] >= Duration::from_millis(200),
        "{took:?}"
    );
    assert!(took[1] > took[0], "growing delay: {took:?}");
    // bob is now blocked: even the right password is refused without reaching the backend.
    let r = c.cmd("b", "LOGIN bob password").await;
    assert!(
        r.last().unwrap().contains("Too many failed logins"),
        "{r:?}"
    );
    assert!(!backend.logins.lock().unwrap().contains(&"bob".to_string()));
    // alice, from the same address, is not slowed.
    let mut d = Client::connect(proxy.addr("plain")).await;
    d.line().await;
    let t = Instant::now();
    assert!(d
        .cmd("a", "LOGIN alice password")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let m = scrape(proxy.metrics_addr()).await;
    assert!(
        metric(
            &m,
            "cutover_connections_refused_total",
            &[("reason", "rate_limited")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // The block ends.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut e = Client::connect(proxy.addr("plain")).await;
    e.login_ok("bob").await;
    proxy.stop().await;
}

// ---------------------------------------------------------------- drain and deaths

#[tokio::test]
async fn drain_says_goodbye_before_login_and_after_the_grace_period() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(backend.addr, "none", "").await;
    let addr = proxy.addr("plain");
    let mut pre = Client::connect(addr).await;
    pre.line().await;
    let mut relayed = Client::connect(addr).await;
    relayed.login_ok("bob").await;
    relayed.send(b"i IDLE\r\n").await;
    relayed.line().await;
    let stopping = tokio::spawn(proxy.stop());
    let l = pre.line().await.unwrap();
    assert!(l.starts_with("* BYE"), "pre-auth client told at once: {l}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections while draining"
    );
    let t = Instant::now();
    let rest = relayed.until("* BYE").await;
    assert!(rest.last().unwrap().contains("shutting down"));
    assert!(t.elapsed() < Duration::from_secs(3));
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_dying_backend_says_goodbye_to_its_clients_promptly_and_spreads_a_crowd() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let proxy = imap_proxy_for(backend.addr, "none", "").await;
    let spread_yaml = proxy_yaml(
        &format!(
            "disconnect_spread: 2s\n    imap: {{ servers: [\"{}\"] }}",
            backend.addr
        ),
        "",
    );
    let crowd_proxy = Proxy::start(&spread_yaml).await;
    let mut clients = Vec::new();
    for _ in 0..12 {
        let mut c = Client::connect(crowd_proxy.addr("plain")).await;
        c.login_ok("bob").await;
        clients.push(c);
    }
    let t = Instant::now();
    backend.stop();
    // Each client watched on its own: which sessions get the prompt closes depends on
    // their order and ids, not on the order of this list. Each idles between responses:
    // it hears the BYE, then the close, both spread alike.
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let bye = c.line().await;
                let at = t.elapsed();
                assert_eq!(
                    bye.as_deref(),
                    Some("* BYE [UNAVAILABLE] Lost the connection to the mail server, please reconnect")
                );
                assert!(c.closed().await);
                at
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for w in watchers {
        closed_at.push(w.await.unwrap());
    }
    closed_at.sort();
    assert!(
        closed_at[0] < Duration::from_millis(500),
        "the first closes are prompt: {closed_at:?}"
    );
    assert!(
        *closed_at.last().unwrap() < Duration::from_secs(3),
        "bounded by the spread: {closed_at:?}"
    );
    assert!(
        *closed_at.last().unwrap() > Duration::from_millis(500),
        "not all at once: {closed_at:?}"
    );
    proxy.stop().await;
    crowd_proxy.stop().await;
}

#[tokio::test]
async fn logouts_are_not_mistaken_for_a_dying_backend() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let yaml = proxy_yaml(
        &format!(
            "disconnect_spread: 5s\n    imap: {{ servers: [\"{}\"] }}",
            backend.addr
        ),
        "",
    );
    let proxy = Proxy::start(&yaml).await;
    let t = Instant::now();
    for _ in 0..10 {
        let mut c = Client::connect(proxy.addr("plain")).await;
        c.login_ok("bob").await;
        c.send(b"z LOGOUT\r\n").await;
        // The client waits for the server to close, as many do.
        assert!(c.closed().await);
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "logouts were delayed: {:?}",
        t.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tls_handshakes_have_their_own_timeout_and_a_bound_per_worker() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let extra = "workers: 1\nlimits: { tls_handshake_timeout: 1s, preauth_timeout: 60s }";
    let proxy = imap_proxy_for(backend.addr, "none", extra).await;
    // Says nothing after connecting: closed by the handshake timeout, not preauth's.
    let t = Instant::now();
    let mut silent = Client::connect(proxy.addr("imaps")).await;
    assert!(silent.closed().await);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Trickles a ClientHello a byte at a time: closed by the same timeout.
    let mut trickle = tokio::net::TcpStream::connect(proxy.addr("imaps"))
        .await
        .unwrap();
    let t = Instant::now();
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let mut closed = false;
    for b in hello.iter().cycle().take(40) {
        use tokio::io::AsyncWriteExt;
        if trickle.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed, "still open after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let body = scrape(proxy.metrics_addr()).await;
    let timeouts = metric(
        &body,
        "cutover_tls_handshakes_total",
        &[("listener", "imaps"), ("result", "timeout")],
    );
    assert_eq!(timeouts, Some(2.0), "{body}");
    proxy.stop().await;

    // Two handshake slots on the one worker, both taken by clients that say nothing:
    // a third client's handshake waits for a slot, and gets one when they leave.
    let extra = "workers: 1\nlimits: { tls_handshake_timeout: 20s, tls_handshakes_per_worker: 2 }";
    let proxy = imap_proxy_for(backend.addr, "none", extra).await;
    let addr = proxy.addr("imaps");
    let hogs = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::spawn(async move {
        let mut c = Client::connect_tls(addr).await;
        c.line().await
    });
    let waited = tokio::time::timeout(Duration::from_millis(700), &mut third).await;
    assert!(
        waited.is_err(),
        "the handshake got a slot while both were taken"
    );
    drop(hogs);
    let greeting = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the handshake got a slot once the others left")
        .unwrap();
    assert!(greeting.is_some_and(|g| g.starts_with("* OK")));
    // Plaintext listeners never wait for handshake slots.
    let mut plain = Client::connect(proxy.addr("plain")).await;
    assert!(plain.line().await.is_some_and(|g| g.starts_with("* OK")));
    proxy.stop().await;
}

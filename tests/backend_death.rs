//! A backend that dies mid-session (issue 17): the client gets the protocol's goodbye at a
//! response boundary (IMAP `* BYE [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, SMTP
//! `421 4.4.2`), is closed without a word inside a response, and the end is counted in
//! `cutover_backend_disconnects_total` by how the connection ended.
//!
//! The backends are scripted: each answers the proxy's lines and, at a chosen line, sends
//! some bytes and dies (a FIN, or a reset).
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a scripted backend dies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Death {
    /// Close: the proxy reads EOF.
    Close,
    /// Reset (SO_LINGER 0), a moment after its last bytes so that they are relayed.
    Reset,
}

/// What a scripted backend does with one line (without its CRLF).
enum Act {
    Send(String),
    /// Send, then die.
    Die(String, Death),
    /// Nothing (DATA content, say).
    Quiet,
}

/// A backend on 127.0.0.1 that greets, then answers each line by `script`.
async fn backend(
    greeting: &'static str,
    script: impl Fn(&str) -> Act + Send + Sync + 'static,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                if sock.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line: Vec<u8> = buf.drain(..p + 2).collect();
                        let line = String::from_utf8_lossy(&line[..p]).into_owned();
                        match script(&line) {
                            Act::Send(s) => {
                                if sock.write_all(s.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Act::Quiet => {}
                            Act::Die(s, death) => {
                                let _ = sock.write_all(s.as_bytes()).await;
                                let _ = sock.flush().await;
                                if death == Death::Reset {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                    let _ = sock.set_zero_linger();
                                }
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A proxy with a plaintext listener (named after its protocol), every route to pool `pool`
/// (a name of its own per test: the metrics registry is shared by the tests of this file).
async fn proxy(pool: &str, protocol: &str, server: SocketAddr, extra_pool: &str) -> Proxy {
    let yaml = format!(
        r#"
listeners:
  - {{ name: {protocol}, protocol: {protocol}, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
pools:
  {pool}:
    connect_timeout: 1s
    login_timeout: 2s
    health: {{ interval: 0s }}
    {extra_pool}
    {protocol}: {{ servers: ["{server}"] }}
routes:
  - {{ pool: {pool} }}
metrics: {{ listen: "127.0.0.1:0" }}
shutdown: {{ drain_timeout: 1s }}
"#
    );
    Proxy::start(&yaml).await
}

/// These tests end sessions of one server one after the other: without this, the fourth
/// within 2 s would be taken for a crowd and delayed (tests/hardening.rs tests the spread).
const NO_SPREAD: &str = "disconnect_spread: 0s";

/// Every line up to the proxy's close.
async fn rest(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(l) = c.line().await {
        out.push(l);
    }
    out
}

async fn disconnects(p: &Proxy, pool: &str, protocol: &str, reason: &str) -> f64 {
    // The count follows the client's close by a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let body = scrape(p.metrics_addr()).await;
        let v = metric(
            &body,
            "cutover_backend_disconnects_total",
            &[("pool", pool), ("protocol", protocol), ("reason", reason)],
        )
        .unwrap_or(-1.0);
        if v > 0.0 || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const IMAP_BYE: &str =
    "* BYE [UNAVAILABLE] Lost the connection to the mail server, please reconnect";

/// An IMAP backend: logins succeed; NOOP answers and dies (FIN), CHECK answers and is
/// reset, FETCH dies inside a literal, IDLE dies idling, STATUS dies with half a line,
/// EXAMINE says its own BYE and closes.
fn imap_script(l: &str) -> Act {
    let t = tag(l).to_string();
    let upper = l.to_ascii_uppercase();
    let verb = upper.split(' ').nth(1).unwrap_or("");
    match verb {
        "CAPABILITY" => Act::Send(format!(
            "* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR IDLE\r\n{t} OK done\r\n"
        )),
        "AUTHENTICATE" | "LOGIN" => Act::Send(format!("{t} OK [CAPABILITY IMAP4rev1 IDLE] in\r\n")),
        "NOOP" => Act::Die(format!("* 3 EXISTS\r\n{t} OK done\r\n"), Death::Close),
        "CHECK" => Act::Die(format!("{t} OK done\r\n"), Death::Reset),
        "FETCH" => Act::Die("* 1 FETCH (BODY[] {20}\r\nhello".to_string(), Death::Close),
        "IDLE" => Act::Die("+ idling\r\n".to_string(), Death::Close),
        "STATUS" => Act::Die("* STATUS INBOX (MESS".to_string(), Death::Reset),
        "EXAMINE" => Act::Die("* BYE Server shutting down.\r\n".to_string(), Death::Close),
        "LOGOUT" => Act::Die(format!("* BYE bye\r\n{t} OK out\r\n"), Death::Close),
        _ => Act::Send(format!("{t} OK done\r\n")),
    }
}

async fn imap_session(p: &Proxy) -> Client {
    let mut c = Client::connect(p.addr("imap")).await;
    c.login_ok("bob").await;
    c
}

#[tokio::test]
async fn imap_gets_a_bye_between_responses_but_not_inside_a_literal() {
    let b = backend(
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n",
        imap_script,
    )
    .await;
    let p = proxy("imap1", "imap", b, NO_SPREAD).await;

    // Between responses: the NOOP's answer, then the BYE, then the close.
    let mut c = imap_session(&p).await;
    c.send(b"a2 NOOP\r\n").await;
    assert_eq!(rest(&mut c).await, ["* 3 EXISTS", "a2 OK done", IMAP_BYE]);
    assert_eq!(disconnects(&p, "imap1", "imap", "eof").await, 1.0);

    // A literal in flight: what came of it, and the close (no BYE inside the literal).
    let mut c = imap_session(&p).await;
    c.send(b"a2 FETCH 1 BODY[]\r\n").await;
    // The partial literal has no line end: a BYE behind it would read "hello* BYE ...".
    let lines = rest(&mut c).await;
    assert_eq!(
        lines,
        ["* 1 FETCH (BODY[] {20}"],
        "no BYE inside the literal"
    );
    assert_eq!(disconnects(&p, "imap1", "imap", "eof").await, 2.0);

    // Half a line, then a reset: closed without a word.
    let mut c = imap_session(&p).await;
    c.send(b"a2 STATUS INBOX (MESSAGES)\r\n").await;
    assert_eq!(rest(&mut c).await, Vec::<String>::new());
    assert_eq!(disconnects(&p, "imap1", "imap", "reset").await, 1.0);

    // The answer, then a reset: the BYE.
    let mut c = imap_session(&p).await;
    c.send(b"a2 CHECK\r\n").await;
    assert_eq!(rest(&mut c).await, ["a2 OK done", IMAP_BYE]);
    assert_eq!(disconnects(&p, "imap1", "imap", "reset").await, 2.0);

    // IDLE: the BYE under the idling client.
    let mut c = imap_session(&p).await;
    c.send(b"a2 IDLE\r\n").await;
    assert_eq!(rest(&mut c).await, ["+ idling", IMAP_BYE]);

    // The backend's own BYE: no second one; counted as a goodbye.
    let mut c = imap_session(&p).await;
    c.send(b"a2 EXAMINE INBOX\r\n").await;
    assert_eq!(rest(&mut c).await, ["* BYE Server shutting down."]);
    assert_eq!(disconnects(&p, "imap1", "imap", "goodbye").await, 1.0);

    // LOGOUT: the backend closes as asked; nothing added, nothing counted.
    let mut c = imap_session(&p).await;
    c.send(b"a2 LOGOUT\r\n").await;
    assert_eq!(rest(&mut c).await, ["* BYE bye", "a2 OK out"]);
    assert_eq!(
        disconnects(&p, "imap1", "imap", "eof").await,
        3.0,
        "IDLE counted, LOGOUT not"
    );
    p.stop().await;
}

const POP3_ERR: &str = "-ERR [SYS/TEMP] Lost the connection to the mail server, please reconnect";

/// A POP3 backend: USER/PASS logins; STAT answers and dies, RETR dies mid-message, LIST
/// answers (multi-line) and is reset, NOOP dies without answering.
fn pop3_script(l: &str) -> Act {
    let upper = l.to_ascii_uppercase();
    let verb = upper.split(' ').next().unwrap_or("");
    match verb {
        "CAPA" => Act::Send("+OK\r\nUSER\r\n.\r\n".into()),
        "USER" => Act::Send("+OK\r\n".into()),
        "PASS" => Act::Send("+OK logged in\r\n".into()),
        "STAT" => Act::Die("+OK 1 120\r\n".into(), Death::Close),
        "RETR" => Act::Die(
            "+OK 120 octets\r\nSubject: x\r\n\r\nhel".into(),
            Death::Close,
        ),
        "TOP" => Act::Die("+OK\r\nSubject: x\r\n\r\n".into(), Death::Reset),
        "LIST" => Act::Die("+OK 1 messages\r\n1 120\r\n.\r\n".into(), Death::Reset),
        "NOOP" => Act::Die(String::new(), Death::Close),
        "QUIT" => Act::Die("+OK bye\r\n".into(), Death::Close),
        _ => Act::Send("-ERR unknown\r\n".into()),
    }
}

async fn pop3_session(p: &Proxy) -> Client {
    let mut c = Client::connect(p.addr("pop3")).await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    c.send(b"USER bob\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"));
    c.send(b"PASS password\r\n").await;
    assert!(c.line().await.unwrap().starts_with("+OK"), "logged in");
    c
}

#[tokio::test]
async fn pop3_gets_an_err_between_commands_but_not_inside_a_multi_line_answer() {
    let b = backend("+OK ready\r\n", pop3_script).await;
    let p = proxy("pop1", "pop3", b, NO_SPREAD).await;

    let mut c = pop3_session(&p).await;
    c.send(b"STAT\r\n").await;
    assert_eq!(rest(&mut c).await, ["+OK 1 120", POP3_ERR]);
    assert_eq!(disconnects(&p, "pop1", "pop3", "eof").await, 1.0);

    // Mid-RETR: the message so far, then the close (an -ERR would read as its content).
    let mut c = pop3_session(&p).await;
    c.send(b"RETR 1\r\n").await;
    assert_eq!(rest(&mut c).await, ["+OK 120 octets", "Subject: x", ""]);
    assert_eq!(disconnects(&p, "pop1", "pop3", "eof").await, 2.0);

    // Mid-TOP, reset.
    let mut c = pop3_session(&p).await;
    c.send(b"TOP 1 0\r\n").await;
    assert_eq!(rest(&mut c).await, ["+OK", "Subject: x", ""]);
    assert_eq!(disconnects(&p, "pop1", "pop3", "reset").await, 1.0);

    // A whole multi-line answer, then a reset: between commands again.
    let mut c = pop3_session(&p).await;
    c.send(b"LIST\r\n").await;
    assert_eq!(
        rest(&mut c).await,
        ["+OK 1 messages", "1 120", ".", POP3_ERR]
    );
    assert_eq!(disconnects(&p, "pop1", "pop3", "reset").await, 2.0);

    // Dies without answering: the -ERR answers the NOOP.
    let mut c = pop3_session(&p).await;
    c.send(b"NOOP\r\n").await;
    assert_eq!(rest(&mut c).await, [POP3_ERR]);

    // QUIT: nothing added.
    let mut c = pop3_session(&p).await;
    c.send(b"QUIT\r\n").await;
    assert_eq!(rest(&mut c).await, ["+OK bye"]);
    assert_eq!(disconnects(&p, "pop1", "pop3", "eof").await, 3.0);
    p.stop().await;
}

const SMTP_421: &str = "421 4.4.2 Lost the connection to the mail server, try again later";

/// An SMTP backend: AUTH PLAIN logins; MAIL and RCPT accepted, DATA goes ahead and the
/// first content line kills it; NOOP answers and dies; RSET dies without answering (reset).
fn smtp_script(l: &str) -> Act {
    let upper = l.to_ascii_uppercase();
    let verb = upper.split([' ', ':']).next().unwrap_or("");
    match verb {
        "EHLO" => Act::Send("250-b.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n".into()),
        "AUTH" => Act::Send("235 2.7.0 ok\r\n".into()),
        "MAIL" | "RCPT" => Act::Send("250 2.1.0 ok\r\n".into()),
        "DATA" => Act::Send("354 go ahead\r\n".into()),
        "SUBJECT" => Act::Die(String::new(), Death::Close),
        "NOOP" => Act::Die("250 2.0.0 ok\r\n".into(), Death::Close),
        "RSET" => Act::Die(String::new(), Death::Reset),
        "VRFY" => Act::Die("421 4.3.2 shutting down\r\n".into(), Death::Close),
        "QUIT" => Act::Die("221 2.0.0 bye\r\n".into(), Death::Close),
        _ => Act::Quiet,
    }
}

async fn smtp_session(p: &Proxy) -> Client {
    let mut c = Client::connect(p.addr("smtp")).await;
    assert!(c.line().await.unwrap().starts_with("220 "));
    c.send(b"EHLO client.test\r\n").await;
    c.until("250 ").await;
    // \0bob\0password
    c.send(b"AUTH PLAIN AGJvYgBwYXNzd29yZA==\r\n").await;
    let r = c.line().await.unwrap();
    assert!(r.starts_with("235"), "{r}");
    c
}

#[tokio::test]
async fn smtp_gets_a_421_between_commands_but_not_mid_data() {
    let b = backend("220 b.test ESMTP\r\n", smtp_script).await;
    let p = proxy("smtp1", "smtp", b, NO_SPREAD).await;

    // Mid-DATA: the content goes nowhere, the client is closed without a reply.
    let mut c = smtp_session(&p).await;
    c.send(b"MAIL FROM:<bob@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
        .await;
    assert!(c.line().await.unwrap().starts_with("250"));
    assert!(c.line().await.unwrap().starts_with("250"));
    assert!(c.line().await.unwrap().starts_with("354"));
    c.send(b"Subject: dies\r\n").await;
    assert_eq!(rest(&mut c).await, Vec::<String>::new());
    assert_eq!(disconnects(&p, "smtp1", "smtp", "eof").await, 1.0);

    // Between commands: the reply, then the 421.
    let mut c = smtp_session(&p).await;
    c.send(b"NOOP\r\n").await;
    assert_eq!(rest(&mut c).await, ["250 2.0.0 ok", SMTP_421]);
    assert_eq!(disconnects(&p, "smtp1", "smtp", "eof").await, 2.0);

    // Waiting for a reply, reset: the 421 is the reply.
    let mut c = smtp_session(&p).await;
    c.send(b"RSET\r\n").await;
    assert_eq!(rest(&mut c).await, [SMTP_421]);
    assert_eq!(disconnects(&p, "smtp1", "smtp", "reset").await, 1.0);

    // The backend's own 421: no second one.
    let mut c = smtp_session(&p).await;
    c.send(b"VRFY bob\r\n").await;
    assert_eq!(rest(&mut c).await, ["421 4.3.2 shutting down"]);
    assert_eq!(disconnects(&p, "smtp1", "smtp", "goodbye").await, 1.0);

    // QUIT: nothing added, nothing counted.
    let mut c = smtp_session(&p).await;
    c.send(b"QUIT\r\n").await;
    assert_eq!(rest(&mut c).await, ["221 2.0.0 bye"]);
    assert_eq!(disconnects(&p, "smtp1", "smtp", "eof").await, 2.0);
    p.stop().await;
}

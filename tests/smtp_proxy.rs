//! SMTP submission through the proxy, against in-process fake backends: AUTH replay to the
//! new servers, pop-before-smtp to the legacy hosts, failover, rejections.
mod common;

use common::*;
use cutover::config::Protocol;
use cutover::demo::FakeBackend;

struct Setup {
    proxy: Proxy,
    new_smtp: FakeBackend,
    green_smtp: FakeBackend,
    mauve_smtp: FakeBackend,
    _others: Vec<FakeBackend>,
}

async fn setup(green_pop_alive: bool) -> Setup {
    let new_smtp = fake("new", Protocol::Smtp, |c| c.tls = Some(server_tls())).await;
    let green_pop = fake("green", Protocol::Pop3, |_| {}).await;
    let mauve_pop = fake("mauve", Protocol::Pop3, |_| {}).await;
    let green_smtp = fake("green", Protocol::Smtp, |c| c.smtp_no_auth = true).await;
    let mauve_smtp = fake("mauve", Protocol::Smtp, |c| c.smtp_no_auth = true).await;
    let green_pop_addr = if green_pop_alive {
        green_pop.addr
    } else {
        dead_addr().await
    };
    let yaml = format!(
        r#"
tls:
  certificates: [{{ cert: certs/proxy.pem, key: certs/proxy-key.pem }}]
listeners:
  - {{ name: submission, protocol: smtp, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: submissions, protocol: smtp, listen: "127.0.0.1:0", tls: implicit }}
pools:
  new:
    smtp: {{ servers: ["{new}"], tls: starttls, ca: certs/ca.pem }}
  legacy:
    connect_timeout: 1s
    health: {{ interval: 0s }}
    pop3: {{ servers: ["{green_pop_addr}", "{mauve_pop}"] }}
    smtp: {{ servers: ["{green_smtp}", "{mauve_smtp}"], auth: pop-before-smtp }}
routes:
  - {{ users: [joeuser], pool: new }}
  - {{ pool: legacy }}
shutdown: {{ drain_timeout: 1s }}
"#,
        new = new_smtp.addr,
        mauve_pop = mauve_pop.addr,
        green_smtp = green_smtp.addr,
        mauve_smtp = mauve_smtp.addr,
    );
    Setup {
        proxy: Proxy::start(&yaml).await,
        new_smtp,
        green_smtp,
        mauve_smtp,
        _others: vec![green_pop, mauve_pop],
    }
}

/// EHLO over implicit TLS, AUTH PLAIN; returns the AUTH reply line.
async fn auth(c: &mut Client, plain_b64: &str) -> String {
    assert!(c.line().await.unwrap().starts_with("220 "));
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = c.until("250 ").await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH PLAIN")), "{ehlo:?}");
    c.send(format!("AUTH PLAIN {plain_b64}\r\n").as_bytes())
        .await;
    c.line().await.unwrap()
}

async fn send_mail(c: &mut Client) {
    // Pipelined transaction in one write.
    c.send(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
        .await;
    assert!(c.line().await.unwrap().starts_with("250"));
    assert!(c.line().await.unwrap().starts_with("250"));
    assert!(c.line().await.unwrap().starts_with("354"));
    c.send(b"Subject: test\r\n\r\nhello\r\n.\r\nQUIT\r\n").await;
    assert!(c.line().await.unwrap().starts_with("250"));
    assert!(c.line().await.unwrap().starts_with("221"));
}

const JOE: &str = "AGpvZXVzZXIAcGFzc3dvcmQ="; // \0joeuser\0password
const BOB: &str = "AGJvYgBwYXNzd29yZA=="; // \0bob\0password
const BOB_WRONG: &str = "AGJvYgB3cm9uZw=="; // \0bob\0wrong

#[tokio::test]
async fn joeuser_submits_through_new_with_auth_replay() {
    let s = setup(true).await;
    let mut c = Client::connect_tls(s.proxy.addr("submissions")).await;
    assert!(auth(&mut c, JOE).await.starts_with("235 2.7.0"));
    send_mail(&mut c).await;
    let got = s.new_smtp.received.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].user.as_deref(), Some("joeuser"));
    assert_eq!(got[0].from, "FROM:<sender@example.net>");
    assert!(s.green_smtp.received.lock().unwrap().is_empty());
    s.proxy.stop().await;
}

#[tokio::test]
async fn bob_submits_to_green_by_pop_before_smtp() {
    let s = setup(true).await;
    let mut c = Client::connect(s.proxy.addr("submission")).await;
    assert!(c.line().await.unwrap().starts_with("220 "));
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = c.until("250 ").await;
    assert!(ehlo.iter().any(|l| l.contains("STARTTLS")));
    assert!(
        !ehlo.iter().any(|l| l.contains("AUTH")),
        "no AUTH before TLS: {ehlo:?}"
    );
    c.send(b"MAIL FROM:<x@y>\r\n").await;
    assert!(c.line().await.unwrap().starts_with("530 5.7.0"));
    c.send(b"STARTTLS\r\n").await;
    assert!(c.line().await.unwrap().starts_with("220"));
    c.start_tls().await;
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = c.until("250 ").await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH PLAIN")), "{ehlo:?}");
    c.send(format!("AUTH PLAIN {BOB}\r\n").as_bytes()).await;
    assert!(c.line().await.unwrap().starts_with("235"));
    send_mail(&mut c).await;
    let got = s.green_smtp.received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered by green");
    assert_eq!(got[0].user, None, "legacy hosts get no AUTH");
    s.proxy.stop().await;
}

#[tokio::test]
async fn wrong_password_gets_535_and_nothing_is_relayed() {
    let s = setup(true).await;
    let mut c = Client::connect_tls(s.proxy.addr("submissions")).await;
    let r = auth(&mut c, BOB_WRONG).await;
    assert!(r.starts_with("535 5.7.8"), "{r}");
    c.send(b"MAIL FROM:<x@y>\r\n").await;
    assert!(
        c.line().await.unwrap().starts_with("530"),
        "still unauthenticated"
    );
    assert!(s.green_smtp.received.lock().unwrap().is_empty());
    assert!(s.mauve_smtp.received.lock().unwrap().is_empty());
    s.proxy.stop().await;
}

#[tokio::test]
async fn green_pop3_down_sends_bobs_mail_through_mauve() {
    let s = setup(false).await;
    let mut c = Client::connect_tls(s.proxy.addr("submissions")).await;
    assert!(auth(&mut c, BOB).await.starts_with("235"));
    send_mail(&mut c).await;
    assert!(
        s.green_smtp.received.lock().unwrap().is_empty(),
        "green's SMTP is not used without its POP3 check"
    );
    assert_eq!(s.mauve_smtp.received.lock().unwrap().len(), 1);
    s.proxy.stop().await;
}

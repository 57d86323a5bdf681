//! OAuth logins through the proxy with scripted backends that take OAUTHBEARER and
//! XOAUTH2: the client's message reaches the backend exactly, the GS2 identity routes the
//! login, tokens verified in cutover (Ed25519 keys minted here, a JWKS file) pass or are
//! refused before any backend sees them, and a pop-before-smtp pool refuses tokens.
mod common;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;

/// An IMAP backend that takes any OAuth message and logs in, and records the lines.
async fn oauth_backend(name: &'static str) -> Scripted {
    let greeting: &'static str = Box::leak(
        format!("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER AUTH=XOAUTH2] {name}\r\n")
            .into_boxed_str(),
    );
    scripted(greeting, move |line, _| {
        let tag = tag(line).to_string();
        if line.contains(" AUTHENTICATE ") {
            Reply::Send(
                format!("{tag} OK [CAPABILITY IMAP4rev1 {name}] Logged in\r\n").into_bytes(),
            )
        } else {
            Reply::Send(format!("{tag} BAD what\r\n").into_bytes())
        }
    })
    .await
}

fn yaml(new: &Scripted, old: &Scripted, oauth: &str) -> String {
    format!(
        r#"
tls:
  certificates: [{{ cert: certs/proxy.pem, key: certs/proxy-key.pem }}]
listeners:
  - {{ name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit, sasl: [plain, login, oauthbearer, xoauth2] }}
  - {{ name: smtps, protocol: smtp, listen: "127.0.0.1:0", tls: implicit, sasl: [plain, oauthbearer, xoauth2] }}
pools:
  new:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{new}"] }}
    smtp: {{ servers: ["127.0.0.1:9"] }}
  legacy:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{old}"] }}
    pop3: {{ servers: ["127.0.0.1:9"] }}
    smtp: {{ servers: ["127.0.0.1:9"], auth: pop-before-smtp }}
routes:
  - {{ users: [alice@example.net], pool: new }}
  - {{ pool: legacy }}
metrics: {{ listen: "127.0.0.1:0" }}
auth_throttle: {{ delay: 1ms, max_delay: 5ms }}
{oauth}
"#,
        new = new.addr,
        old = old.addr,
    )
}

fn bearer(user: Option<&str>, token: &str) -> Vec<u8> {
    let authzid = user.map(|u| format!("a={u}")).unwrap_or_default();
    format!("n,{authzid},\x01host=mx.example\x01auth=Bearer {token}\x01\x01").into_bytes()
}

async fn authenticate(proxy: &Proxy, mechanism: &str, message: &[u8]) -> Vec<String> {
    let mut c = Client::connect_tls(proxy.addr("imaps")).await;
    c.line().await;
    c.cmd(
        "a",
        &format!("AUTHENTICATE {mechanism} {}", STANDARD.encode(message)),
    )
    .await
}

#[tokio::test]
async fn messages_reach_the_backend_exactly_and_the_claimed_identity_routes() {
    let (new, old) = (oauth_backend("new").await, oauth_backend("old").await);
    let proxy = Proxy::start(&yaml(&new, &old, "")).await;
    let alice = bearer(Some("alice@example.net"), "opaque-token-1");
    let r = authenticate(&proxy, "OAUTHBEARER", &alice).await;
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    let got = new.received.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![format!(
            "C1 AUTHENTICATE OAUTHBEARER {}",
            STANDARD.encode(&alice)
        )]
    );
    let bob = b"user=bob@example.net\x01auth=Bearer opaque-token-2\x01\x01";
    let r = authenticate(&proxy, "XOAUTH2", bob).await;
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    let got = old.received.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![format!("C1 AUTHENTICATE XOAUTH2 {}", STANDARD.encode(bob))]
    );
    // Without verification a message that names no one cannot be routed.
    let r = authenticate(&proxy, "OAUTHBEARER", &bearer(None, "t")).await;
    assert!(r.last().unwrap().starts_with("a NO"), "{r:?}");
    let body = scrape(proxy.metrics_addr()).await;
    let n = |m: &str, r: &str| {
        metric(
            &body,
            "cutover_logins_by_mechanism_total",
            &[("protocol", "imap"), ("mechanism", m), ("result", r)],
        )
    };
    // The recorder is shared by every test of this file: at least these.
    for (m, r) in [
        ("oauthbearer", "ok"),
        ("xoauth2", "ok"),
        ("oauthbearer", "auth_failed"),
    ] {
        assert!(n(m, r).is_some_and(|v| v >= 1.0), "{m} {r}: {body}");
    }
    proxy.stop().await;
}

/// A signing key, its JWKS file, and tokens.
struct Issuer {
    key: Ed25519KeyPair,
    dir: TempDir,
}

impl Issuer {
    fn new() -> Issuer {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let dir = TempDir::new("oauth");
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "k1", "alg": "EdDSA",
            "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref()),
        }]});
        std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
        Issuer { key, dir }
    }

    fn token(&self, email: &str, aud: &str, exp_in: i64) -> String {
        let now = cutover::config::rfc3339::now();
        self.token_with(serde_json::json!({
            "iss": "https://issuer.test", "aud": aud, "email": email,
            "iat": now, "exp": now + exp_in,
        }))
    }

    fn token_with(&self, claims: serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn config(&self) -> String {
        self.config_with("")
    }

    fn config_with(&self, more: &str) -> String {
        format!(
            "oauth: {{ jwks_file: {}, issuer: \"https://issuer.test\", audience: mail, claim: email{more} }}",
            self.dir.join("jwks.json").display()
        )
    }
}

#[tokio::test]
async fn a_token_without_expiry_is_refused_unless_the_config_allows_it() {
    let (new, old) = (oauth_backend("new").await, oauth_backend("old").await);
    let issuer = Issuer::new();
    let forever = bearer(
        Some("alice@example.net"),
        &issuer.token_with(serde_json::json!({
            "iss": "https://issuer.test", "aud": "mail", "email": "alice@example.net",
        })),
    );
    let proxy = Proxy::start(&yaml(&new, &old, &issuer.config())).await;
    let r = authenticate(&proxy, "OAUTHBEARER", &forever).await;
    assert_eq!(
        r.last().unwrap(),
        "a NO [AUTHENTICATIONFAILED] Invalid or expired token"
    );
    assert!(new.received.lock().unwrap().is_empty());
    proxy.stop().await;
    let lenient = issuer.config_with(", require_exp: false");
    let proxy = Proxy::start(&yaml(&new, &old, &lenient)).await;
    let r = authenticate(&proxy, "OAUTHBEARER", &forever).await;
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    assert_eq!(new.received.lock().unwrap().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn verified_tokens_pass_and_bad_ones_never_reach_a_backend() {
    let (new, old) = (oauth_backend("new").await, oauth_backend("old").await);
    let issuer = Issuer::new();
    let proxy = Proxy::start(&yaml(&new, &old, &issuer.config())).await;
    let good = issuer.token("alice@example.net", "mail", 300);
    let r = authenticate(
        &proxy,
        "OAUTHBEARER",
        &bearer(Some("alice@example.net"), &good),
    )
    .await;
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    // No GS2 identity: the token's claim is the user (and routes the login).
    let r = authenticate(&proxy, "OAUTHBEARER", &bearer(None, &good)).await;
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    let received = new.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    // The backend got the verified identity in the message (Dovecot requires `a=`).
    let replayed = received[1].rsplit(' ').next().unwrap_or_default();
    let replayed = STANDARD.decode(replayed).unwrap();
    assert!(
        replayed.starts_with(b"n,a=alice@example.net,\x01"),
        "{:?}",
        String::from_utf8_lossy(&replayed)
    );
    let refused = [
        bearer(
            Some("alice@example.net"),
            &issuer.token("alice@example.net", "mail", -3600),
        ),
        bearer(
            Some("alice@example.net"),
            &issuer.token("alice@example.net", "other", 300),
        ),
        bearer(Some("alice@example.net"), &format!("{good}x")),
        // Someone else's token under alice's name.
        bearer(
            Some("alice@example.net"),
            &issuer.token("mallory@example.net", "mail", 300),
        ),
    ];
    for (i, m) in refused.iter().enumerate() {
        let r = authenticate(&proxy, "OAUTHBEARER", m).await;
        assert_eq!(
            r.last().unwrap(),
            "a NO [AUTHENTICATIONFAILED] Invalid or expired token",
            "case {i}"
        );
    }
    assert_eq!(
        new.received.lock().unwrap().len(),
        2,
        "no refused token reached a backend"
    );
    assert!(old.received.lock().unwrap().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn a_pop_before_smtp_pool_refuses_tokens_with_a_clear_reply() {
    let (new, old) = (oauth_backend("new").await, oauth_backend("old").await);
    let proxy = Proxy::start(&yaml(&new, &old, "")).await;
    let mut c = Client::connect_tls(proxy.addr("smtps")).await;
    c.line().await;
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = c.until("250 ").await;
    assert!(
        ehlo.last().unwrap().contains("OAUTHBEARER XOAUTH2"),
        "{ehlo:?}"
    );
    let msg = STANDARD.encode(b"user=bob@example.net\x01auth=Bearer t\x01\x01");
    c.send(format!("AUTH XOAUTH2 {msg}\r\n").as_bytes()).await;
    let r = c.line().await.unwrap();
    assert!(
        r.starts_with("535 5.7.8") && r.contains("OAuth is not accepted"),
        "{r}"
    );
    proxy.stop().await;
}

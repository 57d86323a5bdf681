//! Fuzz entry points: stable functions that take one byte string each, as a fuzzer hands
//! it over, and panic when an invariant breaks (the rustls `internal::fuzzing` pattern).
//!
//! The cargo-fuzz targets in `fuzz/fuzz_targets/` are one line each around these, and
//! `tests/fuzz_corpus.rs` replays `fuzz/corpus/*/`, `fuzz/regressions/*/` and a few
//! thousand deterministic pseudo-random inputs through them, so `cargo test` on the
//! stable toolchain exercises every target without a fuzzer. Not part of the API: the
//! module is hidden and may change with the machines it drives.
//!
//! # Input format (every protocol target)
//! ```text
//!   [settings byte] chunk0 0xFF chunk1 0xFF chunk2 ...      (0xFF 0x00 = one 0xFF data byte)
//! ```
//! * The first byte is a **settings byte** (listener TLS mode, whether plaintext auth is
//!   allowed, login outcomes, backend TLS mode, which credentials...; see each function).
//!   For [`imap_server`] and [`imap_backend`] it is also the settings byte that
//!   [`crate::proto::imap::fuzz_server`] / [`crate::proto::imap::fuzz_backend`] read.
//! * The rest is split into **chunks** at every `0xFF` byte, as separate reads from the
//!   peer, except that `0xFF 0x00` stands for one `0xFF` data byte, so every byte value
//!   can still reach the machines and every list of chunks can be written. The fuzzer
//!   thus chooses the read boundaries, and a seed file is a readable transcript: a
//!   printable settings byte followed by the protocol bytes.
//!
//! [`split`] implements the scheme; [`join`] is its inverse (used to write seeds).
//!
//! # What each protocol target checks
//! Each calls the protocol module's own fuzz body (which has its own invariants, see
//! [`crate::proto::imap::fuzz_server`] and the others), then drives the same machine
//! again with the generic drivers of [`crate::proto::drive`] set up from the settings
//! byte; they check the [`crate::proto`] input contract for any [`PreAuth`] or
//! [`BackendLogin`] machine:
//! * `receive` never consumes more than it was given, nothing while a login or a TLS
//!   handshake is pending, and nothing after `Close` / `Done`; no action after them;
//!   `Login` is the last action until `login_done` (the doc of [`crate::proto::Action::Login`]);
//! * every reply is non-empty and ends with CRLF; one step's output is bounded;
//! * credentials handed out hold a non-empty user name without NUL, CR or LF;
//! * when no byte is consumed and nothing is pending, the driver's buffer holds at most
//!   `max_line + max_literal` bytes (the bound [`Limits`] promises the driver);
//! * `timed_out` / `shutting_down` end in `Close`;
//! * the transcript (every action, in order) and the bytes left for the relay after a
//!   successful login are the same whether the chunks arrive as split or as one read
//!   (with the buffer kept across STARTTLS for that comparison, since the real driver
//!   discards it there and a split decides what was "pipelined");
//! * backend side: at most one `Done`; POP3 and SMTP commands are exactly one CRLF line
//!   each, so no credential can add a command.

use crate::proto::drive::{self, BackendDriver, ServerDriver};
use crate::proto::{
    self, BackendLogin, BackendPolicy, BackendTls, ClientInfo, Credentials, Limits, ListenerTls,
    LoginOutcome, Mechanism, PreAuth, ServerPolicy,
};

/// The byte that separates chunks (reads) in a fuzz input; followed by `0x00`, it is one
/// `0xFF` data byte instead.
pub const SEPARATOR: u8 = 0xFF;

/// xorshift64*: the deterministic generator behind the pseudo-random inputs the tests
/// feed the machines (no dependency; a seed gives the same inputs on every run).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Splits a fuzz input (without its settings byte) into chunks: `SEPARATOR 0x00` is one
/// `0xFF` data byte, any other [`SEPARATOR`] ends a chunk. Always at least one chunk;
/// chunks may be empty (an empty read is harmless and worth exercising).
pub fn split(data: &[u8]) -> Vec<Vec<u8>> {
    let mut chunks = vec![Vec::new()];
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        i += 1;
        if b != SEPARATOR {
            chunks.last_mut().expect("never empty").push(b);
        } else if data.get(i) == Some(&0) {
            chunks.last_mut().expect("never empty").push(SEPARATOR);
            i += 1;
        } else {
            chunks.push(Vec::new());
        }
    }
    chunks
}

/// The inverse of [`split`]: writes each `0xFF` data byte as `SEPARATOR 0x00` and puts
/// one [`SEPARATOR`] between chunks.
pub fn join<C: AsRef<[u8]>>(chunks: &[C]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        for &b in chunk.as_ref() {
            out.push(b);
            if b == SEPARATOR {
                out.push(0);
            }
        }
    }
    out
}

/// The settings byte and the chunks of a protocol fuzz input.
fn settings_and_chunks(data: &[u8]) -> (u8, Vec<Vec<u8>>) {
    match data.split_first() {
        Some((&sel, rest)) => (sel, split(rest)),
        None => (0, Vec::new()),
    }
}

fn refs(chunks: &[Vec<u8>]) -> Vec<&[u8]> {
    chunks.iter().map(Vec::as_slice).collect()
}

/// The chunks with the settings byte put back in front of the first one, as the IMAP
/// fuzz bodies expect.
fn with_settings(sel: u8, chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = chunks.to_vec();
    match out.first_mut() {
        Some(first) => first.insert(0, sel),
        None => out.push(vec![sel]),
    }
    out
}

// ---------------------------------------------------------------------------------------
// Settings shared by the client-facing targets.

/// Listener TLS mode from the settings byte: `sel % 3` (0 plaintext, 1 STARTTLS,
/// 2 implicit), as the IMAP fuzz body reads it.
fn listener_tls(sel: u8) -> ListenerTls {
    match sel % 3 {
        0 => ListenerTls::None,
        1 => ListenerTls::StartTls,
        _ => ListenerTls::Implicit,
    }
}

/// Backend TLS mode from the settings byte: `sel % 3` (0 plaintext, 1 STARTTLS,
/// 2 implicit).
fn backend_tls(sel: u8) -> BackendTls {
    match sel % 3 {
        0 => BackendTls::None,
        1 => BackendTls::StartTls,
        _ => BackendTls::Implicit,
    }
}

/// A server policy from the settings byte: TLS mode (`sel % 3`), plaintext auth allowed
/// (bit 2), and small limits (so that every bound is reached) unless bit 6 asks for the
/// defaults.
fn server_policy(sel: u8, small: Limits) -> ServerPolicy {
    ServerPolicy {
        tls: listener_tls(sel),
        allow_plaintext_auth: sel & 0x04 != 0,
        limits: if sel & 0x40 != 0 {
            Limits::default()
        } else {
            small
        },
        hostname: "fuzz.example".into(),
        // Every mechanism: OAuth responses are longer and have their own bound.
        mechanisms: crate::proto::Mechanisms::default()
            .with(crate::proto::Mechanism::OAuthBearer)
            .with(crate::proto::Mechanism::XOAuth2),
    }
}

/// The outcome of the `n`-th login (0-based) of a session: a rotation through every
/// outcome, starting at `(sel >> 3) % 6`, so that some sessions log in successfully
/// (and hand leftover bytes to the relay) after some failures.
fn login_outcome(sel: u8, n: usize) -> LoginOutcome {
    match ((sel >> 3) as usize + n) % 6 {
        0 => LoginOutcome::AuthFailed { response: None },
        5 => LoginOutcome::Challenged {
            challenge: "eyJzdGF0dXMiOiI0MDEifQ==\r\nA1 OK injected".into(),
            response: Some("[AUTHENTICATIONFAILED] token\r\n* BYE injected".into()),
        },
        1 => LoginOutcome::Unavailable,
        2 => LoginOutcome::AuthFailed {
            response: Some("[AUTHENTICATIONFAILED] nope\r\nA1 OK injected".into()),
        },
        3 => LoginOutcome::Refused {
            reason: "no route for this user",
        },
        _ => LoginOutcome::Ok {
            capabilities: Some("IMAP4rev1 IDLE LITERAL+ \r\n* BYE injected".into()),
        },
    }
}

// ---------------------------------------------------------------------------------------
// The generic drivers of `proto::drive`, set up from the settings byte.

/// Drives `make()`'s machine with [`ServerDriver`] as the session does (buffer discarded
/// at STARTTLS, logins answered by [`login_outcome`], an open session ended with
/// `timed_out`, or `shutting_down` when bit 7 of `sel` is set), then checks that the
/// transcript does not depend on the read boundaries.
fn check_server<M: PreAuth>(make: impl Fn() -> M, sel: u8, limits: &Limits, chunks: &[&[u8]]) {
    let driver = || {
        let mut logins = 0;
        ServerDriver::new(make(), move |_| {
            logins += 1;
            login_outcome(sel, logins - 1)
        })
        .max_buffer(limits.max_line.max(limits.max_sasl_token + 128) + limits.max_literal)
    };
    driver().feed_all(chunks).end(sel & 0x80 != 0);
    drive::assert_split_invariant(driver, chunks);
}

/// Drives `make()`'s backend machine with [`BackendDriver`] as `backend/` does, then
/// checks split invariance. `one_line` asserts that every `Send` is exactly one
/// CRLF-terminated line (POP3, SMTP; IMAP literals may hold CRLF); `password` (when
/// given) must never be sent verbatim when it holds CR or LF.
fn check_backend<M: BackendLogin>(
    make: impl Fn() -> M,
    chunks: &[&[u8]],
    max_buffer: usize,
    one_line: bool,
    password: Option<&[u8]>,
) {
    let driver = || {
        BackendDriver::new(make())
            .max_buffer(max_buffer)
            .on_send(move |bytes| {
                if one_line {
                    let ends = bytes.iter().filter(|b| matches!(b, b'\r' | b'\n')).count();
                    assert_eq!(ends, 2, "more than one line in one command");
                    if let Some(pw) =
                        password.filter(|pw| pw.iter().any(|b| matches!(b, b'\r' | b'\n')))
                    {
                        assert!(
                            !bytes.windows(pw.len()).any(|w| w == pw),
                            "password with a line end sent verbatim"
                        );
                    }
                }
            })
    };
    driver().feed_all(chunks);
    drive::assert_backend_split_invariant(driver, chunks);
}

/// Credentials for the backend targets, picked by `n % 6`: plain ones, a user name with
/// a space and a password with CRLF (must be refused or encoded, never sent raw), a
/// password long enough that `AUTH PLAIN <ir>` exceeds 255 octets, NUL and 8-bit bytes,
/// IMAP specials. Mechanism from `plain`.
fn backend_credentials(n: u8, plain: bool) -> Option<Credentials> {
    let (user, password): (&str, Vec<u8>) = match n % 6 {
        0 => return None,
        1 => ("joe", b"s3cret".to_vec()),
        2 => ("jo e", b"p\r\nQUIT".to_vec()),
        3 => ("joe@example.net", vec![b'x'; 200]),
        4 => ("j\u{e9}", b"pa\0ss\xc3\xa9\xff".to_vec()),
        _ => ("jo\"e\\", b"{5}\r\n\"a\\".to_vec()),
    };
    let mechanism = if plain {
        Mechanism::Plain
    } else {
        Mechanism::Login
    };
    Some(Credentials::password(user.into(), password, mechanism))
}

fn backend_policy(sel: u8, forward: bool) -> BackendPolicy {
    BackendPolicy {
        tls: backend_tls(sel),
        forward_client: forward.then(|| ClientInfo {
            ip: std::net::IpAddr::from([192, 0, 2, 1]),
            port: 4321,
        }),
        helo: "fuzz.example".into(),
        known_capabilities: None,
    }
}

// ---------------------------------------------------------------------------------------
// Entry points.

/// IMAP client-facing machine. Settings byte: as [`crate::proto::imap::fuzz_server`]
/// reads it (`% 3` listener TLS, bit 2 plaintext auth, bit 3 Unavailable instead of
/// AuthFailed), and for the generic driver also `(sel >> 3) % 5` the login outcome
/// rotation (successful logins included), bit 6 default limits, bit 7 `shutting_down`
/// instead of `timed_out` at the end.
pub fn imap_server(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    let first = with_settings(sel, &chunks);
    proto::imap::fuzz_server(&refs(&first));
    let small = Limits {
        max_line: 200,
        max_literal: 100,
        max_auth_failures: 3,
        max_commands: 40,
        max_sasl_token: 300,
    };
    let policy = server_policy(sel, small);
    let limits = policy.limits.clone();
    check_server(
        || proto::imap::ServerMachine::new(policy.clone()),
        sel,
        &limits,
        &refs(&chunks),
    );
}

/// IMAP backend-facing machine. Settings byte: as [`crate::proto::imap::fuzz_backend`]
/// reads it (`% 3` backend TLS, bit 2 probe instead of login, bit 3 ID forwarding), and
/// for the generic driver the same three, plus `1 + (sel >> 4) % 5` the credentials when
/// not probing (see [`backend_credentials`]).
pub fn imap_backend(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    let first = with_settings(sel, &chunks);
    proto::imap::fuzz_backend(&refs(&first));
    let creds = if sel & 0x04 != 0 {
        None
    } else {
        backend_credentials(1 + (sel >> 4) % 5, sel & 0x40 != 0)
    };
    let policy = backend_policy(sel, sel & 0x08 != 0);
    check_backend(
        || proto::imap::BackendMachine::new(policy.clone(), creds.clone()),
        &refs(&chunks),
        proto::imap::BACKEND_MAX_LINE + proto::imap::BACKEND_MAX_LITERAL,
        false,
        None,
    );
}

/// POP3 client-facing machine: [`crate::proto::pop3::fuzz_server`] on the chunks, then
/// the generic driver with the settings byte read as for [`imap_server`] (the POP3 body
/// has no settings of its own).
pub fn pop3_server(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    let chunks = refs(&chunks);
    proto::pop3::fuzz_server(&chunks);
    let small = Limits {
        max_line: 64,
        max_literal: 96,
        max_auth_failures: 3,
        max_commands: 40,
        max_sasl_token: 300,
    };
    let policy = server_policy(sel, small);
    let limits = policy.limits.clone();
    check_server(
        || proto::pop3::ServerMachine::new(policy.clone()),
        sel,
        &limits,
        &chunks,
    );
}

/// POP3 backend-facing machine (`pop3` has no fuzz body of its own for it). Settings
/// byte: `% 3` backend TLS, `(sel >> 2) % 6` the credentials (0 = health probe; others
/// include a user name with a space, a password with CRLF, one that forces `AUTH PLAIN`
/// without initial response, NUL and 8-bit bytes), bit 5 SASL PLAIN as the client's
/// mechanism, bit 7 client address forwarding. Every command must be one CRLF line.
pub fn pop3_backend(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    let creds = backend_credentials(sel >> 2, sel & 0x20 != 0);
    let password = creds
        .as_ref()
        .and_then(|c| c.secret().map(|s| s.expose().to_vec()));
    let policy = backend_policy(sel, sel & 0x80 != 0);
    check_backend(
        || proto::pop3::BackendMachine::new(policy.clone(), creds.clone()),
        &refs(&chunks),
        64 * 1024,
        true,
        password.as_deref(),
    );
}

/// SMTP client-facing machine: [`crate::proto::smtp::fuzz_server`] on the chunks, then
/// the generic driver with the settings byte read as for [`imap_server`].
pub fn smtp_server(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    smtp_server_chunks(sel, &refs(&chunks));
}

fn smtp_server_chunks(sel: u8, chunks: &[&[u8]]) {
    proto::smtp::fuzz_server(chunks);
    let small = Limits {
        max_line: 64,
        max_literal: 48,
        max_auth_failures: 3,
        max_commands: 30,
        max_sasl_token: 300,
    };
    let policy = server_policy(sel, small);
    let limits = policy.limits.clone();
    check_server(
        || {
            proto::smtp::ServerMachine::new(
                policy.clone(),
                vec![
                    "SIZE 1000".into(),
                    "PIPELINING".into(),
                    "8BITMIME".into(),
                    "AUTH PLAIN".into(),
                    "STARTTLS".into(),
                    "CHUNKING".into(),
                ],
            )
        },
        sel,
        &limits,
        chunks,
    );
}

/// What [`smtp_server_alphabet`] maps a byte below 0x80 to: the letters of the verbs and
/// extensions, base64, address punctuation, digits and line ends (repeated, so that
/// lines end often).
pub const SMTP_ALPHABET: &[u8] =
    b"EHLOSTARTLSAUTHPLAINGMFRCPDQVYBXehlotsa :<>@.=+/-_\r\n\r\n\r\n\n0123456789AGpvZQBzM2NyZXQ";

/// What [`smtp_server_alphabet`] maps a byte of 0x80 or more to: whole words, so that
/// commands and SASL exchanges form quickly.
pub const SMTP_WORDS: &[&[u8]] = &[
    b"EHLO client.example\r\n",
    b"HELO x\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n",
    b"AUTH PLAIN ",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN am9l\r\n",
    b"am9l\r\n",
    b"czNjcmV0\r\n",
    b"AGpvZQBzM2NyZXQ=",
    b"YWRtaW4Aam9lAHB3\r\n",
    b"=\r\n",
    b"*\r\n",
    b"MAIL FROM:<joe@example.net>\r\n",
    b"RCPT TO:<you@example.net>\r\n",
    b"DATA\r\n",
    b"BDAT 5 LAST\r\n",
    b"BDAT 3\r\n",
    b"NOOP\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"VRFY joe\r\n",
    b"HELP\r\n",
    b"\r\n",
    b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
];

/// The SMTP client-facing target on input mapped into an SMTP alphabet first (the
/// smtp-proto fuzz pattern): each data byte below 0x80 becomes one [`SMTP_ALPHABET`]
/// character, each byte from 0x80 one [`SMTP_WORDS`] entry, so random bytes make
/// near-valid sessions. Settings byte and chunking as for [`smtp_server`]; the mapping
/// applies to each chunk.
pub fn smtp_server_alphabet(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    let mapped: Vec<Vec<u8>> = chunks.iter().map(|c| smtp_map(c)).collect();
    smtp_server_chunks(sel, &refs(&mapped));
}

fn smtp_map(chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len() * 2);
    for &b in chunk {
        if b < 0x80 {
            out.push(SMTP_ALPHABET[b as usize % SMTP_ALPHABET.len()]);
        } else {
            out.extend_from_slice(SMTP_WORDS[(b - 0x80) as usize % SMTP_WORDS.len()]);
        }
    }
    out
}

/// SMTP backend-facing machine: [`crate::proto::smtp::fuzz_backend`] on the chunks
/// (every mode), then the generic driver with a mode from the settings byte: `% 3`
/// backend TLS, `(sel >> 2) % 8`: 0 probe, 1 bridged (pop-before-smtp), others
/// [`backend_credentials`]; bit 5 PLAIN as the client's mechanism, bit 7 XCLIENT.
pub fn smtp_backend(data: &[u8]) {
    let (sel, chunks) = settings_and_chunks(data);
    let chunks = refs(&chunks);
    proto::smtp::fuzz_backend(&chunks);
    let which = (sel >> 2) % 8;
    let creds = backend_credentials(which.saturating_sub(1), sel & 0x20 != 0);
    let password = creds
        .as_ref()
        .and_then(|c| c.secret().map(|s| s.expose().to_vec()));
    let policy = backend_policy(sel, sel & 0x80 != 0);
    let creds = match (which, creds) {
        (0, _) => None,
        (_, None) => Some(Credentials::bridged("joe".into())),
        (_, some) => some,
    };
    check_backend(
        || proto::smtp::BackendMachine::new(policy.clone(), creds.clone()),
        &chunks,
        64 * 1024,
        true,
        password.as_deref(),
    );
}

/// The configuration loader on arbitrary text (invalid UTF-8 replaced): it must return
/// a configuration or an error, never panic, and the error must render. No settings
/// byte, no chunks. Relative paths resolve against the crate's directory, so seeds that
/// name `certs/*.pem` get past the file checks and reach the later validation.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = base.join("fuzz.yaml");
    match crate::config::Config::from_text(&text, &file, base) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
        }
        Err(e) => {
            let _ = e.to_string();
            let _ = format!("{e:?}");
        }
    }
}

/// The PROXY protocol header parser ([`crate::proto::proxy`]) on arbitrary bytes, as the
/// front of a connection from a load balancer. No settings byte, no chunks. Checks: a
/// header never claims more bytes than it was given nor more than the bounds; every
/// shorter prefix of a header asks for more bytes (so a header split over reads is read
/// whole, and nothing is taken for something else); "more" always means more than given;
/// a header's addresses written as v2 parse back to the same addresses.
pub fn proxy_header(data: &[u8]) {
    use crate::proto::proxy::{self, Parsed};
    match proxy::parse(data) {
        Parsed::Header(h) => {
            assert!(h.len <= data.len() && h.len <= proxy::MAX_V2, "{h:?}");
            for cut in 0..h.len {
                assert!(
                    matches!(proxy::parse(&data[..cut]), Parsed::NeedMore(_)),
                    "a prefix of {cut} bytes of a {}-byte header",
                    h.len
                );
            }
            if let (Some(client), Some(destination)) = (h.client, h.destination) {
                let again = proxy::v2_header(client, destination);
                let Parsed::Header(back) = proxy::parse(&again) else {
                    panic!("re-encoded header does not parse");
                };
                // IPv4-mapped IPv6 and IPv4 are one address: the encoder writes a mapped
                // pair as IPv4 (`proxy::v2_header`).
                let canonical = |a: Option<std::net::SocketAddr>| {
                    a.map(|a| std::net::SocketAddr::new(a.ip().to_canonical(), a.port()))
                };
                assert_eq!(
                    (canonical(back.client), canonical(back.destination)),
                    (canonical(h.client), canonical(h.destination))
                );
            }
        }
        Parsed::NeedMore(n) => assert!(n > data.len(), "asks for {n} with {}", data.len()),
        Parsed::NotProxy | Parsed::Invalid(_) => {}
    }
    let _ = proxy::screen(data);
}

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// OAuth SASL messages and bearer tokens: `data[0]` picks the mechanism (bit 0), the rest
/// is a client message. Parsing never panics; a parsed message has a valid user name and
/// a b64token; its token, checked against a fixed key set, is never accepted (no input can
/// carry a valid signature of a key nobody holds) and never panics, whatever its header,
/// claims or size.
pub fn oauth_message(data: &[u8]) {
    use crate::proto::sasl::{parse_oauth, valid_user};
    use crate::proto::Mechanism;
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let mechanism = if sel & 1 == 0 {
        Mechanism::OAuthBearer
    } else {
        Mechanism::XOAuth2
    };
    let token = match parse_oauth(mechanism, msg) {
        Ok(m) => {
            if let Some(u) = &m.user {
                assert!(valid_user(u.as_bytes()).is_some(), "{u:?}");
            }
            assert!(!m.token.is_empty());
            m.token.to_vec()
        }
        // Also as a bare token: the verifier sees every shape of input.
        Err(_) => msg.to_vec(),
    };
    static KEYS: std::sync::OnceLock<Option<crate::oauth::Jwks>> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        // An Ed25519 public key whose private key nobody has (the base point's encoding).
        let jwks = br#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"WAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#;
        crate::oauth::Jwks::parse(jwks).ok()
    });
    if let Some(keys) = keys {
        let settings = crate::oauth::OAuthSettings::new(
            crate::oauth::JwksSource::File("fuzz.jwks".into()),
            "email",
        );
        let text = String::from_utf8_lossy(&token);
        let verified =
            crate::oauth::Verifier::verify_with_keys(keys, &settings, &text, 1_700_000_000);
        assert!(verified.is_err(), "a token nobody could sign was accepted");
    }
}

/// The relay's session tracker ([`crate::proto::boundary`]) on arbitrary traffic, as it
/// follows every relayed session: `data[0]` picks the protocol (IMAP, POP3, SMTP: the
/// byte mod 3), the rest is chunks (the format above), each one read from one side: the
/// chunk's first byte says whose (bit 0 set: the client's), the rest is what was read.
/// Checks: no panic, and the same traffic fed one byte at a time stands where it does
/// when fed in the fuzzer's reads, after every read (the module's promise: the answer
/// does not depend on how the stream was split into reads).
pub fn boundary(data: &[u8]) {
    use crate::proto::boundary::Tracker;
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let new = match sel % 3 {
        0 => Tracker::imap,
        1 => Tracker::pop3,
        _ => Tracker::smtp,
    };
    let feed = |t: &mut Tracker, client: bool, bytes: &[u8]| {
        if client {
            t.client_sent(bytes)
        } else {
            t.backend_sent(bytes)
        }
    };
    let (mut reads, mut bytewise) = (new(), new());
    for chunk in split(rest) {
        let Some((&side, bytes)) = chunk.split_first() else {
            continue;
        };
        let client = side & 1 == 1;
        feed(&mut reads, client, bytes);
        for b in bytes.chunks(1) {
            feed(&mut bytewise, client, b);
        }
        assert_eq!(
            reads.standing(),
            bytewise.standing(),
            "after a read of {} bytes from the {}",
            bytes.len(),
            if client { "client" } else { "backend" }
        );
    }
}

/// Every entry point by its fuzz target name, for the corpus replay test and tools.
pub const TARGETS: &[(&str, Target)] = &[
    ("imap_server", imap_server),
    ("imap_backend", imap_backend),
    ("pop3_server", pop3_server),
    ("pop3_backend", pop3_backend),
    ("smtp_server", smtp_server),
    ("smtp_server_alphabet", smtp_server_alphabet),
    ("smtp_backend", smtp_backend),
    ("config", config),
    ("proxy_header", proxy_header),
    ("oauth_message", oauth_message),
    ("boundary", boundary),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_round_trip() {
        assert_eq!(split(b""), vec![Vec::<u8>::new()]);
        assert_eq!(split(b"ab\xffcd"), vec![b"ab".to_vec(), b"cd".to_vec()]);
        assert_eq!(split(b"a\xff\x00b"), vec![b"a\xffb".to_vec()]);
        let empty = Vec::<u8>::new;
        assert_eq!(split(b"\xff"), vec![empty(), empty()]);
        assert_eq!(split(b"\xff\xff"), vec![empty(), empty(), empty()]);
        let chunks = vec![
            b"x\xff".to_vec(),
            empty(),
            b"\xff\x00y".to_vec(),
            vec![0xff],
        ];
        assert_eq!(split(&join(&chunks)), chunks);
    }

    #[test]
    fn entry_points_accept_empty_and_tiny_inputs() {
        for (_, f) in TARGETS {
            f(b"");
            f(b"\x00");
            f(b"\xff");
            f(b"1\xff\xff\x00\xff");
        }
    }
}

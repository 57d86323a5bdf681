//! Fuzz bodies for the SMTP machines. They panic (assert) when an invariant breaks, which
//! is what a fuzzer wants; the machines themselves never panic on input. A stable test
//! below runs them on a few thousand inputs from a deterministic generator, so CI covers
//! them without a fuzzing toolchain.

use super::{BackendMachine, BackendMode, ServerMachine};
use crate::proto::{
    Action, BackendAction, BackendLogin, BackendPolicy, BackendResult, BackendTls, ClientInfo,
    Credentials, Limits, ListenerTls, LoginOutcome, Mechanism, PreAuth, Secret, ServerPolicy,
};

fn server_policies() -> Vec<ServerPolicy> {
    let small = Limits {
        max_line: 40,
        max_literal: 30,
        max_auth_failures: 3,
        max_commands: 24,
    };
    vec![
        ServerPolicy {
            tls: ListenerTls::StartTls,
            allow_plaintext_auth: false,
            limits: small.clone(),
            hostname: "mx.example".into(),
        },
        ServerPolicy {
            tls: ListenerTls::Implicit,
            allow_plaintext_auth: false,
            limits: Limits::default(),
            hostname: "mx.example".into(),
        },
        ServerPolicy {
            tls: ListenerTls::None,
            allow_plaintext_auth: true,
            limits: Limits {
                max_auth_failures: 5,
                ..small
            },
            hostname: "mx.example".into(),
        },
    ]
}

/// One thing the machine did, as the transcript records it.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Send(Vec<u8>),
    StartTls,
    Login(String, Vec<u8>, Mechanism),
    Close,
}

/// Checks that `bytes` is one or more well-formed reply lines: `ddd` then `-` (more lines
/// of the same reply follow) or space, printable ASCII, CRLF.
fn check_reply(bytes: &[u8]) {
    assert!(bytes.ends_with(b"\r\n"), "reply without CRLF: {bytes:?}");
    let lines: Vec<&[u8]> = bytes[..bytes.len() - 2].split(|b| *b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(line.len() >= 4, "short reply line {line:?}");
        assert!(line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert_eq!(line[..3], lines[0][..3], "code changes inside a reply");
        let sep = if i + 1 == lines.len() { b' ' } else { b'-' };
        assert_eq!(line[3], sep, "{line:?}");
        assert!(
            line[4..].iter().all(|b| *b == b' ' || b.is_ascii_graphic()),
            "unprintable reply text {line:?}"
        );
        assert!(line.len() <= 512, "reply line too long");
    }
}

/// Runs one server session the way the driver does, except that STARTTLS keeps the
/// buffer (so the transcript cannot depend on read boundaries), and checks invariants.
fn run_server(policy: ServerPolicy, chunks: &[&[u8]]) -> (Vec<Event>, Vec<u8>) {
    let max_commands = policy.limits.max_commands;
    let mut sm = ServerMachine::new(
        policy,
        vec![
            "SIZE 1000".into(),
            "PIPELINING".into(),
            "AUTH PLAIN".into(),
            "XCLIENT ADDR".into(),
        ],
    );
    let mut events = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut closed = false;
    let mut logins = 0u32;
    let mut calls = 0usize;

    let mut drain = |sm: &mut ServerMachine, events: &mut Vec<Event>, closed: &mut bool| {
        while let Some(action) = sm.poll_action() {
            assert!(!*closed, "action after Close: {action:?}");
            assert!(!sm.is_authenticated(), "logins are always refused here");
            match action {
                Action::Send(bytes) => {
                    check_reply(&bytes);
                    events.push(Event::Send(bytes));
                }
                Action::StartTls => {
                    assert!(!sm.is_tls_active());
                    assert_eq!(sm.receive(b"NOOP\r\n"), 0, "consumed before the handshake");
                    events.push(Event::StartTls);
                    sm.tls_established();
                    assert!(sm.is_tls_active());
                    assert_eq!(sm.client_name(), None);
                }
                Action::Login(creds) => {
                    let Credentials {
                        user,
                        secret,
                        mechanism,
                    } = creds;
                    assert!(!user.is_empty());
                    assert!(!user.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')));
                    assert_eq!(sm.receive(b"NOOP\r\n"), 0, "consumed during login");
                    logins += 1;
                    assert!(logins <= max_commands, "a login per AUTH command at most");
                    events.push(Event::Login(user, secret.expose().to_vec(), mechanism));
                    let outcome = if logins % 4 == 0 {
                        LoginOutcome::Unavailable
                    } else {
                        LoginOutcome::AuthFailed { response: None }
                    };
                    sm.login_done(outcome);
                }
                Action::Close => {
                    *closed = true;
                    events.push(Event::Close);
                }
            }
        }
        if let Some(name) = sm.client_name() {
            assert!(!name.is_empty() && name.len() <= 255);
            assert!(name.bytes().all(|b| b.is_ascii_graphic()));
        }
    };

    drain(&mut sm, &mut events, &mut closed);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while !closed {
            let discarding = sm.is_discarding();
            let n = sm.receive(&buf);
            calls += 1;
            assert!(n <= buf.len(), "consumed more than given");
            assert!(calls <= 1_000_000, "no progress bound");
            if n > 0 && !discarding && !sm.is_discarding() {
                // Never past the end of the first line: an LF may only end what was eaten.
                let eaten = &buf[..n];
                let lfs = eaten.iter().filter(|b| **b == b'\n').count();
                assert!(
                    lfs == 0 || (lfs == 1 && eaten[n - 1] == b'\n'),
                    "consumed past a line end"
                );
                assert!(lfs == 1 || n == buf.len(), "partial line consumed");
            }
            buf.drain(..n);
            drain(&mut sm, &mut events, &mut closed);
            if n == 0 {
                break;
            }
        }
    }
    let commands = events
        .iter()
        .filter(|e| matches!(e, Event::Send(_)))
        .count();
    assert!(
        commands <= (max_commands as usize + 2) * 3 + 2,
        "more replies than commands allow"
    );
    // What is left unread after the machine closed on its own is never used (the driver
    // closes the connection), and how much of it there is may depend on the reads.
    let leftover = if closed { Vec::new() } else { buf };
    if !closed {
        sm.timed_out();
        drain(&mut sm, &mut events, &mut closed);
        assert!(closed, "timed_out must close");
    }
    assert_eq!(sm.receive(b"NOOP\r\n"), 0, "consumed after Close");
    (events, leftover)
}

/// Drives a [`ServerMachine`] through `chunks` (each appended to a driver-like buffer,
/// `receive` called while it consumes), answering every Login with a failure (now and
/// then Unavailable) and every StartTls with `tls_established`, under three policies
/// (STARTTLS listener with small limits, implicit TLS, plaintext with plaintext auth).
///
/// Asserts: nothing is consumed past the end of the first line (outside the documented
/// discard states) or beyond the input; nothing is consumed while a login or handshake
/// is pending or after Close; no action follows Close; every reply is well-formed
/// printable ASCII; logins carry a clean user name; the client name is clean; the
/// transcript is the same when the chunks are fed as one.
pub fn fuzz_server(chunks: &[&[u8]]) {
    let whole = chunks.concat();
    for policy in server_policies() {
        let split = run_server(policy.clone(), chunks);
        let joined = run_server(policy, &[&whole]);
        assert_eq!(split, joined, "transcript depends on read boundaries");
    }
}

/// Drives a [`BackendMachine`] in each mode (and with STARTTLS required, XCLIENT on)
/// through `chunks` as backend output, calling `tls_established` on StartTls.
///
/// Asserts: consumption never exceeds the input and stops once Done; exactly one Done at
/// most, nothing after it; every Send is one CRLF-terminated line; the password never
/// appears in clear in what is sent; the transcript does not depend on read boundaries.
pub fn fuzz_backend(chunks: &[&[u8]]) {
    let whole = chunks.concat();
    for (tls, mode) in [
        (BackendTls::None, BackendMode::Probe),
        (BackendTls::StartTls, BackendMode::Probe),
        (BackendTls::None, BackendMode::NoAuth),
        (BackendTls::None, auth_mode()),
        (BackendTls::StartTls, auth_mode()),
    ] {
        let policy = BackendPolicy {
            tls,
            forward_client: Some(ClientInfo {
                ip: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
                port: 2525,
            }),
            helo: "client.example".into(),
        };
        let split = run_backend(policy.clone(), mode.clone(), chunks);
        let joined = run_backend(policy, mode, &[&whole]);
        assert_eq!(split, joined, "transcript depends on read boundaries");
    }
}

const FUZZ_PASSWORD: &[u8] = b"pa\r\nss";

fn auth_mode() -> BackendMode {
    BackendMode::Auth(Credentials {
        user: "joe".into(),
        secret: Secret::new(FUZZ_PASSWORD.to_vec()),
        mechanism: Mechanism::Plain,
    })
}

fn run_backend(policy: BackendPolicy, mode: BackendMode, chunks: &[&[u8]]) -> (String, usize) {
    let mut m = BackendMachine::new(policy, mode);
    let mut log = String::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut done: Option<BackendResult> = None;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let n = m.receive(&buf);
            assert!(n <= buf.len());
            if done.is_some() {
                assert_eq!(n, 0, "consumed after Done");
            }
            buf.drain(..n);
            while let Some(action) = m.poll_action() {
                assert!(done.is_none(), "action after Done: {action:?}");
                match action {
                    BackendAction::Send(bytes) => {
                        assert!(bytes.ends_with(b"\r\n"));
                        let ends = bytes.iter().filter(|b| matches!(b, b'\r' | b'\n')).count();
                        assert_eq!(ends, 2, "one line per Send");
                        assert!(!bytes
                            .windows(FUZZ_PASSWORD.len())
                            .any(|w| w == FUZZ_PASSWORD));
                        log.push_str(&String::from_utf8_lossy(&bytes));
                    }
                    BackendAction::StartTls => {
                        log.push_str("[TLS]");
                        m.tls_established();
                    }
                    BackendAction::Done(result) => {
                        log.push_str(&format!("[{result:?}]"));
                        done = Some(result);
                    }
                }
            }
            if n == 0 {
                break;
            }
        }
    }
    (log, buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::Rng;

    /// Bytes an SMTP client sends: verb letters, digits, base64, punctuation, CR, LF.
    const CLIENT_ALPHABET: &[u8] =
        b"EHLOHELOSTARTTLSAUTHPLAINLOGINMAILFROMRCPTTODATABDATLASTNOOPRSETQUITHELPVRFY\
          ehlotsa   :<>@.=*+/\r\n\r\n\r\n0123456789AGpvZQBzM2NyZXQ";

    /// Bytes a backend sends: reply digits, separators, keywords, CR, LF.
    const BACKEND_ALPHABET: &[u8] = b"0123452345 -\r\n\r\nAUTHPLAINLOGINSTARTTLSXCLIENTADDR=";

    const CLIENT_PREFIXES: &[&str] = &["", "EHLO c\r\n", "STARTTLS\r\nEHLO c\r\n"];

    const BACKEND_PREFIXES: &[&str] = &[
        "",
        "220 mx\r\n",
        "220 mx\r\n250-mx\r\n250-STARTTLS\r\n250-XCLIENT ADDR\r\n250 AUTH PLAIN LOGIN\r\n",
    ];

    const CLIENT_TOKENS: &[&str] = &[
        "EHLO c.example\r\n",
        "HELO x\r\n",
        "EHLO\r\n",
        "STARTTLS\r\n",
        "AUTH PLAIN\r\n",
        "AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n",
        "AUTH PLAIN ",
        "AUTH LOGIN\r\n",
        "AUTH LOGIN am9l\r\n",
        "am9l\r\n",
        "czNjcmV0\r\n",
        "AGpvZQBzM2NyZXQ=",
        "YWRtaW4Aam9lAHB3\r\n",
        "=\r\n",
        "*\r\n",
        "MAIL FROM:<a@b>\r\n",
        "RCPT TO:<c@d>\r\n",
        "DATA\r\n",
        "BDAT 5 LAST\r\n",
        "BDAT 3\r\n",
        "NOOP\r\n",
        "RSET\r\n",
        "QUIT\r\n",
        "VRFY joe\r\n",
        "\r\n",
        "\n",
        "\r",
        " ",
        "x",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ];

    const BACKEND_TOKENS: &[&str] = &[
        "220 mx ESMTP\r\n",
        "220-mx\r\n",
        "220 go\r\n",
        "250-mx\r\n",
        "250 mx\r\n",
        "250-STARTTLS\r\n",
        "250-AUTH PLAIN LOGIN\r\n",
        "250-AUTH=LOGIN\r\n",
        "250 AUTH LOGIN\r\n",
        "250-XCLIENT ADDR PORT\r\n",
        "250 SIZE 100\r\n",
        "334 VXNlcm5hbWU6\r\n",
        "334 \r\n",
        "235 2.7.0 ok\r\n",
        "535 5.7.8 no\r\n",
        "454 4.7.0 later\r\n",
        "421 bye\r\n",
        "500 what\r\n",
        "\n",
        "2",
        "-",
    ];

    fn input(
        rng: &mut Rng,
        kind: usize,
        alphabet: &[u8],
        prefixes: &[&str],
        tokens: &[&str],
    ) -> Vec<u8> {
        let len = rng.below(160);
        match kind {
            0 => (0..len).map(|_| rng.next_u64() as u8).collect(),
            1 => (0..len).map(|_| *rng.pick(alphabet)).collect(),
            _ => {
                let mut out = Vec::new();
                // Often start where the interesting states begin.
                out.extend_from_slice(rng.pick(prefixes).as_bytes());
                for _ in 0..rng.below(24) {
                    out.extend_from_slice(rng.pick(tokens).as_bytes());
                    if rng.below(10) == 0 {
                        out.push(*rng.pick(alphabet));
                    }
                }
                out
            }
        }
    }

    fn cuts<'a>(rng: &mut Rng, data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = (0..rng.below(5))
            .map(|_| rng.below(data.len() + 1))
            .collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for p in points {
            chunks.push(&data[start..p]);
            start = p;
        }
        chunks.push(&data[start..]);
        chunks
    }

    #[test]
    fn fuzz_server_on_generated_inputs() {
        let mut rng = Rng(0x5eed_cafe_f00d_0001);
        for i in 0..3000 {
            let data = input(
                &mut rng,
                i % 3,
                CLIENT_ALPHABET,
                CLIENT_PREFIXES,
                CLIENT_TOKENS,
            );
            let chunks = cuts(&mut rng, &data);
            fuzz_server(&chunks);
        }
    }

    #[test]
    fn fuzz_server_reaches_deep_states() {
        // A sanity check that the generator is useful: some sessions get to a login.
        let mut rng = Rng(7);
        let mut logins = 0;
        let mut tls = 0;
        for _ in 0..300 {
            let data = input(&mut rng, 2, CLIENT_ALPHABET, CLIENT_PREFIXES, CLIENT_TOKENS);
            for policy in server_policies() {
                let (events, _) = run_server(policy, &[&data]);
                logins += events
                    .iter()
                    .filter(|e| matches!(e, Event::Login(..)))
                    .count();
                tls += events
                    .iter()
                    .filter(|e| matches!(e, Event::StartTls))
                    .count();
            }
        }
        assert!(logins > 100, "{logins}");
        assert!(tls > 60, "{tls}");
    }

    #[test]
    fn fuzz_backend_on_generated_inputs() {
        let mut rng = Rng(0xbac0_0e1d_0000_0002);
        for i in 0..2000 {
            let data = input(
                &mut rng,
                i % 3,
                BACKEND_ALPHABET,
                BACKEND_PREFIXES,
                BACKEND_TOKENS,
            );
            let chunks = cuts(&mut rng, &data);
            fuzz_backend(&chunks);
        }
    }

    /// A longer run of both targets: `cargo test --lib smtp::fuzz -- --ignored`, with
    /// `CUTOVER_FUZZ_SEED` / `CUTOVER_FUZZ_ITERATIONS` to explore further.
    #[test]
    #[ignore]
    fn fuzz_long() {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let mut rng = Rng(env("CUTOVER_FUZZ_SEED", 0x0123_4567_89ab_cdef) | 1);
        for i in 0..env("CUTOVER_FUZZ_ITERATIONS", 100_000) as usize {
            let data = input(
                &mut rng,
                i % 3,
                CLIENT_ALPHABET,
                CLIENT_PREFIXES,
                CLIENT_TOKENS,
            );
            fuzz_server(&cuts(&mut rng, &data));
            let data = input(
                &mut rng,
                i % 3,
                BACKEND_ALPHABET,
                BACKEND_PREFIXES,
                BACKEND_TOKENS,
            );
            fuzz_backend(&cuts(&mut rng, &data));
        }
    }

    #[test]
    fn fuzz_known_inputs() {
        fuzz_server(&[b""]);
        fuzz_server(&[b"EHLO c\r\nSTARTTLS\r\nEHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n"]);
        fuzz_server(&[b"AUTH PL", b"AIN\r\n\r\n", b"BDAT 4\r\nab", b"cdNOOP\r\n"]);
        fuzz_server(&[&[b'A'; 9000][..], b"\r\n", &[b'N'; 100][..]]);
        fuzz_backend(&[b"220 a\r\n250-a\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n220 x\r\n"]);
        fuzz_backend(&[b"220 a\r\n250-a\r\n250 AUTH LOGIN\r\n334 a\r\n334 b\r\n235 c\r\n"]);
    }
}

//! Fuzz bodies for the SMTP machines. They panic (assert) when an invariant breaks, which
//! is what a fuzzer wants; the machines themselves never panic on input. A stable test
//! below runs them on a few thousand inputs from a deterministic generator, so CI covers
//! them without a fuzzing toolchain.

use super::{BackendMachine, ServerMachine};
use crate::proto::drive::{
    assert_backend_split_invariant, assert_split_invariant, BackendDriver, Consumed, ServerDriver,
};
use crate::proto::{
    BackendPolicy, BackendTls, ClientInfo, Credentials, Limits, ListenerTls, LoginOutcome,
    Mechanism, PreAuth, ServerPolicy,
};

fn server_policies() -> Vec<ServerPolicy> {
    let small = Limits {
        max_line: 40,
        max_literal: 30,
        max_auth_failures: 3,
        max_commands: 24,
        max_sasl_token: 32 * 1024,
    };
    vec![
        ServerPolicy {
            tls: ListenerTls::StartTls,
            allow_plaintext_auth: false,
            limits: small.clone(),
            hostname: "mx.example".into(),
            mechanisms: Default::default(),
        },
        ServerPolicy {
            tls: ListenerTls::Implicit,
            allow_plaintext_auth: false,
            limits: Limits::default(),
            hostname: "mx.example".into(),
            mechanisms: Default::default(),
        },
        ServerPolicy {
            tls: ListenerTls::None,
            allow_plaintext_auth: true,
            limits: Limits {
                max_auth_failures: 5,
                ..small
            },
            hostname: "mx.example".into(),
            mechanisms: Default::default(),
        },
    ]
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

/// The generic driver ([`crate::proto::drive`]) with SMTP's own checks: well-formed
/// replies, at most one reply per command (and a few for the greeting and limits), one
/// login per AUTH at most, a clean client name, and nothing consumed past the end of the
/// first line outside the documented discard states. Logins fail (now and then
/// Unavailable).
fn driver<'a>(policy: ServerPolicy) -> ServerDriver<'a, ServerMachine> {
    let max_commands = policy.limits.max_commands as usize;
    let machine = ServerMachine::new(
        policy,
        vec![
            "SIZE 1000".into(),
            "PIPELINING".into(),
            "AUTH PLAIN".into(),
            "XCLIENT ADDR".into(),
        ],
    );
    let mut logins = 0;
    let mut replies = 0;
    let mut was_discarding = false;
    ServerDriver::new(machine, move |_| {
        logins += 1;
        assert!(logins <= max_commands, "a login per AUTH command at most");
        if logins % 4 == 0 {
            LoginOutcome::Unavailable
        } else {
            LoginOutcome::AuthFailed { response: None }
        }
    })
    .on_send(move |sm: &ServerMachine, bytes| {
        check_reply(bytes);
        replies += 1;
        assert!(
            replies <= (max_commands + 2) * 3 + 2,
            "more replies than commands allow"
        );
        assert!(!sm.is_authenticated(), "logins are always refused here");
    })
    .on_consumed(move |sm: &ServerMachine, c: Consumed<'_>| {
        if !was_discarding && !sm.is_discarding() {
            // Never past the end of the first line: an LF may only end what was eaten.
            let n = c.bytes.len();
            let lfs = c.bytes.iter().filter(|b| **b == b'\n').count();
            assert!(
                lfs == 0 || (lfs == 1 && c.bytes[n - 1] == b'\n'),
                "consumed past a line end"
            );
            assert!(lfs == 1 || c.left.is_empty(), "partial line consumed");
        }
        was_discarding = sm.is_discarding();
        if let Some(name) = sm.client_name() {
            assert!(!name.is_empty() && name.len() <= 255);
            assert!(name.bytes().all(|b| b.is_ascii_graphic()));
        }
    })
}

/// Drives a [`ServerMachine`] through `chunks` under three policies (STARTTLS listener
/// with small limits, implicit TLS, plaintext with plaintext auth) with [`driver`]'s
/// checks, and asserts the transcript is the same when the chunks are fed as one.
pub fn fuzz_server(chunks: &[&[u8]]) {
    for policy in server_policies() {
        assert_split_invariant(|| driver(policy.clone()), chunks);
    }
}

/// Drives a [`BackendMachine`] in each mode (probe, bridged, password; with STARTTLS
/// required, XCLIENT on) through `chunks` as backend output.
///
/// Asserts what the generic driver does, and: every Send is one CRLF-terminated line; the
/// password never appears in clear in what is sent; the transcript does not depend on
/// read boundaries.
pub fn fuzz_backend(chunks: &[&[u8]]) {
    let password = || {
        Some(Credentials::password(
            "joe".into(),
            FUZZ_PASSWORD.to_vec(),
            Mechanism::Plain,
        ))
    };
    for (tls, creds) in [
        (BackendTls::None, None),
        (BackendTls::StartTls, None),
        (BackendTls::None, Some(Credentials::bridged("joe".into()))),
        (BackendTls::None, password()),
        (BackendTls::StartTls, password()),
    ] {
        let policy = BackendPolicy {
            tls,
            forward_client: Some(ClientInfo {
                ip: std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
                port: 2525,
            }),
            helo: "client.example".into(),
            known_capabilities: None,
        };
        let make = || {
            BackendDriver::new(BackendMachine::new(policy.clone(), creds.clone())).on_send(
                |bytes| {
                    let ends = bytes.iter().filter(|b| matches!(b, b'\r' | b'\n')).count();
                    assert_eq!(ends, 2, "one line per Send");
                    assert!(!bytes
                        .windows(FUZZ_PASSWORD.len())
                        .any(|w| w == FUZZ_PASSWORD));
                },
            )
        };
        assert_backend_split_invariant(make, chunks);
    }
}

const FUZZ_PASSWORD: &[u8] = b"pa\r\nss";

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
                let mut d = driver(policy);
                d.feed(&data);
                logins += d.transcript().logins.len();
                tls += d.transcript().starttls;
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

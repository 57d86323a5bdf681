//! IMAP before login, sans-IO: the client-facing [`ServerMachine`] and the
//! backend-facing [`BackendMachine`].
//!
//! * `syntax`: literal markers, the token reader, tags, quoting (lines are framed by
//!   [`crate::proto::line`]);
//! * `server`: [`ServerMachine`], the not-authenticated state as a server would speak it;
//! * `client`: [`BackendMachine`], greeting, STARTTLS, capabilities, ID and the login
//!   replay towards one backend.
//!
//! [`fuzz_server`] and [`fuzz_backend`] drive the machines the way the drivers do and
//! check their invariants; the fuzz targets and a stable test call them.

mod client;
mod server;
mod syntax;

pub use client::{
    BackendMachine, MAX_LINE as BACKEND_MAX_LINE, MAX_LITERAL as BACKEND_MAX_LITERAL,
};
pub use server::ServerMachine;

use super::drive::{BackendDriver, ServerDriver};
use super::{
    BackendPolicy, BackendTls, ClientInfo, Credentials, Limits, ListenerTls, LoginOutcome,
    Mechanism, ServerPolicy,
};

/// Most bytes the fuzz drivers accept from one drain of a machine's actions.
const FUZZ_MAX_OUTPUT: usize = 4096;

/// Fuzz body for the client-facing machine: feeds `chunks` to a [`ServerMachine`] through
/// the generic driver ([`super::drive`], which checks the input contract), STARTTLS
/// discarding what was pipelined behind it, as the session does. The first byte is not
/// input: it picks the listener's TLS mode (`% 3`), whether plaintext auth is allowed
/// (bit 2), and the login outcome (bit 3: `Unavailable` instead of `AuthFailed`). Limits
/// are small so that every bound is reached.
///
/// Panics if an invariant breaks: the driver's, output of one step over
/// `FUZZ_MAX_OUTPUT` (4096) bytes, or a login whose password holds NUL.
pub fn fuzz_server(chunks: &[&[u8]]) {
    let sel = chunks.first().and_then(|c| c.first()).copied().unwrap_or(0);
    let limits = Limits {
        max_line: 200,
        max_literal: 100,
        max_auth_failures: 3,
        max_commands: 40,
        max_sasl_token: 32 * 1024,
    };
    let policy = ServerPolicy {
        tls: match sel % 3 {
            0 => ListenerTls::None,
            1 => ListenerTls::StartTls,
            _ => ListenerTls::Implicit,
        },
        allow_plaintext_auth: sel & 4 != 0,
        limits: limits.clone(),
        hostname: "fuzz.example".into(),
        mechanisms: Default::default(),
    };
    let answer = |creds: &Credentials| {
        assert!(!creds.secret().is_some_and(|s| s.expose().contains(&0)));
        match sel & 8 {
            0 => LoginOutcome::AuthFailed { response: None },
            _ => LoginOutcome::Unavailable,
        }
    };
    let mut d = ServerDriver::new(ServerMachine::new(policy), answer)
        .max_step_output(FUZZ_MAX_OUTPUT)
        .max_buffer(limits.max_line + limits.max_literal);
    for (i, chunk) in chunks.iter().enumerate() {
        d.feed(if i == 0 {
            chunk.get(1..).unwrap_or_default()
        } else {
            chunk
        });
    }
}

/// Drives a [`BackendMachine`] with `chunks` from a fake backend through the generic
/// driver, as `backend/` would. The first byte is not input: it picks the TLS mode, probe
/// or login, ID forwarding and a remembered capability list. The password holds bytes
/// that need a literal.
///
/// Panics if an invariant breaks: the driver's, or a command over `FUZZ_MAX_OUTPUT`
/// (4096) bytes.
pub fn fuzz_backend(chunks: &[&[u8]]) {
    let sel = chunks.first().and_then(|c| c.first()).copied().unwrap_or(0);
    let policy = BackendPolicy {
        tls: match sel % 3 {
            0 => BackendTls::None,
            1 => BackendTls::StartTls,
            _ => BackendTls::Implicit,
        },
        forward_client: (sel & 8 != 0).then(|| ClientInfo {
            ip: std::net::IpAddr::from([192, 0, 2, 1]),
            port: 4321,
        }),
        helo: "fuzz.example".into(),
        known_capabilities: (sel & 16 != 0).then(|| "IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+".into()),
    };
    let creds = (sel & 4 == 0).then(|| {
        Credentials::password(
            "jo\"e".into(),
            b"p\r\n{5}\xc3\xa9".to_vec(),
            Mechanism::Login,
        )
    });
    let mut d = BackendDriver::new(BackendMachine::new(policy, creds))
        .on_send(|bytes| assert!(bytes.len() <= FUZZ_MAX_OUTPUT))
        .max_buffer(BACKEND_MAX_LINE + BACKEND_MAX_LITERAL);
    for (i, chunk) in chunks.iter().enumerate() {
        d.feed(if i == 0 {
            chunk.get(1..).unwrap_or_default()
        } else {
            chunk
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::Rng;

    /// A configuration byte, then protocol lines (some of them damaged) and random
    /// bytes, cut into random chunks.
    fn random_chunks(rng: &mut Rng, dict: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut input = vec![rng.next_u64() as u8];
        for _ in 0..rng.below(16) {
            let start = input.len();
            match rng.below(10) {
                0 => input.extend((0..rng.below(12)).map(|_| rng.next_u64() as u8)),
                _ => input.extend_from_slice(dict[rng.below(dict.len())]),
            }
            let added = input.len() - start;
            if added > 0 && rng.below(6) == 0 {
                let at = start + rng.below(added);
                match rng.below(3) {
                    0 => input[at] = rng.next_u64() as u8,
                    1 => input.truncate(at),
                    _ => {
                        input.remove(at);
                    }
                }
            }
        }
        let mut chunks = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(40));
            chunks.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        chunks
    }

    const CLIENT_DICT: &[&[u8]] = &[
        b"a1 LOGIN joe s3cret\r\n",
        b"a2 LOGIN {3}\r\njoe {6}\r\ns3cret\r\n",
        b"a3 login {3+}\r\njoe \"p\\\"w\"\r\n",
        b"a4 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n",
        b"a5 AUTHENTICATE PLAIN\r\n",
        b"a5 AUTHENTICATE PLAIN =\r\n",
        b"AGpvZQBzM2NyZXQ=\r\n",
        b"*\r\n",
        b"a6 AUTHENTICATE LOGIN\r\n",
        b"am9l\r\n",
        b"czNjcmV0\r\n",
        b"a7 STARTTLS\r\n",
        b"a8 CAPABILITY\r\n",
        b"a9 NOOP\r\n",
        b"b1 ID (\"name\" \"x\" \"v\" NIL)\r\n",
        b"b2 ID NIL\r\n",
        b"b3 LOGOUT\r\n",
        b"b4 LOGIN {150}\r\n",
        b"b5 LOGIN {150+}\r\n",
        b"b6 LOGIN joe {4294967296}\r\n",
        b"b7 SELECT INBOX\r\n",
        b"b8 ID (\"a\" {2+}\r\nxy)\r\n",
        b"b9 FOO {5+}\r\nc1 NOOP\r\n",
        b"{3}\r\n",
        b"\r\n",
        b"\n",
        b"c2 LOGIN ",
        b"\"quoted\" ",
    ];

    const SERVER_DICT: &[&[u8]] = &[
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR LITERAL+ ID] hi\r\n",
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LITERAL- ID] hi\r\n",
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n",
        b"* OK hi\r\n",
        b"* PREAUTH hi\r\n",
        b"* BYE hi\r\n",
        b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN ID\r\n",
        b"* CAPABILITY IMAP4rev1 STARTTLS ID\r\n",
        b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n",
        b"C1 OK done\r\n",
        b"C2 OK done\r\n",
        b"C3 OK done\r\n",
        b"C4 OK done\r\n",
        b"C3 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n",
        b"C4 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n",
        b"C3 NO [AUTHENTICATIONFAILED] no\r\n",
        b"C4 NO [UNAVAILABLE] later\r\n",
        b"C3 BAD what\r\n",
        b"C2 NO no\r\n",
        b"+ \r\n",
        b"+\r\n",
        b"* ID (\"name\" {5}\r\nhello)\r\n",
        b"* 1 FETCH (BODY[] {70000}\r\n",
        b"* OK [ALERT] hi {5}\r\n",
        b"\r\n",
    ];

    /// A plausible backend conversation: a greeting, then for each of our tags some
    /// untagged data, maybe a continuation, and a tagged reply (mostly OK); a few lines
    /// damaged.
    fn backend_chunks(rng: &mut Rng) -> Vec<Vec<u8>> {
        const GREETINGS: &[&[u8]] = &[
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR LITERAL+ ID] hi\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LITERAL- ID] hi\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=LOGIN] hi\r\n",
            b"* OK hi\r\n",
            b"* PREAUTH hi\r\n",
        ];
        const UNTAGGED: &[&[u8]] = &[
            b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN ID\r\n",
            b"* CAPABILITY IMAP4rev1 STARTTLS ID LITERAL+\r\n",
            b"* CAPABILITY IMAP4rev1 STARTTLS\r\n",
            b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n",
            b"* ID (\"name\" {5}\r\nhello)\r\n",
            b"* OK [ALERT] hi {5}\r\n",
        ];
        const RARE: &[&[u8]] = &[
            b"* 1 FETCH (BODY[] {70000}\r\n",
            b"* BYE going\r\n",
            b"+ \r\n",
        ];
        const TAGGED: &[&str] = &[
            "OK done",
            "OK done",
            "OK done",
            "OK [CAPABILITY IMAP4rev1 IDLE] done",
            "NO [AUTHENTICATIONFAILED] no",
            "NO [UNAVAILABLE] later",
            "BAD what",
        ];
        let mut input = vec![rng.next_u64() as u8];
        input.extend_from_slice(GREETINGS[rng.below(GREETINGS.len())]);
        for tag in 1..=5 {
            for _ in 0..rng.below(3) {
                input.extend_from_slice(UNTAGGED[rng.below(UNTAGGED.len())]);
            }
            if rng.below(3) == 0 {
                input.extend_from_slice(b"+ \r\n");
            }
            if rng.below(20) == 0 {
                input.extend_from_slice(RARE[rng.below(RARE.len())]);
            }
            let reply = format!("C{tag} {}\r\n", TAGGED[rng.below(TAGGED.len())]);
            input.extend_from_slice(reply.as_bytes());
            if rng.below(12) == 0 {
                let at = 1 + rng.below(input.len() - 1);
                input[at] = rng.next_u64() as u8;
            }
        }
        input.extend_from_slice(b"* 2 EXISTS\r\n");
        let mut chunks = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(40));
            chunks.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        chunks
    }

    #[test]
    fn fuzz_server_on_random_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let chunks = random_chunks(&mut rng, CLIENT_DICT);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            fuzz_server(&refs);
        }
    }

    #[test]
    fn fuzz_backend_on_random_input() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for i in 0..3000 {
            let chunks = match i % 4 {
                0 => random_chunks(&mut rng, SERVER_DICT),
                _ => backend_chunks(&mut rng),
            };
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            fuzz_backend(&refs);
        }
    }

    #[test]
    fn fuzz_drivers_accept_empty_input() {
        fuzz_server(&[]);
        fuzz_server(&[b""]);
        fuzz_backend(&[]);
        fuzz_backend(&[b""]);
    }
}

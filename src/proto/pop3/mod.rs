//! POP3 before login, sans-IO: the client-facing [`ServerMachine`] (RFC 1939 AUTHORIZATION
//! state, RFC 2449 CAPA and response codes, RFC 2595 STLS, RFC 5034 SASL AUTH) and the
//! backend-facing [`BackendMachine`] (greeting, CAPA, STLS, login replay or health probe).
//!
//! Both machines read one CRLF line per `receive` call (a bare LF is accepted as the end
//! of a line too, as most servers do) and never consume past it, so the driver's buffer
//! keeps whatever a peer pipelined. Neither one does I/O, reads a clock or panics on input.
//!
//! A pop-before-smtp check logs in with a [`BackendMachine`] and then writes [`QUIT`].

mod client;
mod server;

pub use client::BackendMachine;
pub use server::ServerMachine;

use super::drive::{assert_split_invariant, Consumed, ServerDriver};
use super::{LoginOutcome, ServerPolicy};

/// The bytes that end a POP3 session politely; the driver sends them after a
/// pop-before-smtp verification login (the probe sends them itself).
pub const QUIT: &[u8] = b"QUIT\r\n";

/// Longest text taken from a peer and put into a reply or a result (backend rejection
/// texts, capability lines): longer texts are cut at a character boundary.
const MAX_TEXT: usize = 256;

/// The RFC 2449 response code at the start of `text` (`[SYS/TEMP] ...` gives `SYS/TEMP`),
/// if it is well formed: `[` resp-level *("/" resp-level) `]`, resp-level = 1*(ALPHA / "-").
fn resp_code(text: &str) -> Option<&str> {
    let rest = text.strip_prefix('[')?;
    let end = rest.find(']')?;
    let code = &rest[..end];
    let well_formed = code.split('/').all(|level| {
        !level.is_empty() && level.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
    });
    well_formed.then_some(code)
}

/// Whether `code` is `want` or one of its sub-codes (`SYS/TEMP/FOO` is a `SYS/TEMP`).
fn code_is(code: &str, want: &str) -> bool {
    code.len() >= want.len()
        && code.is_char_boundary(want.len())
        && code[..want.len()].eq_ignore_ascii_case(want)
        && (code.len() == want.len() || code.as_bytes()[want.len()] == b'/')
}

/// Longest reply the client-facing machine may queue in one `Send`.
const MAX_SEND: usize = 2 * MAX_TEXT + 64;

/// Fuzz body for the client-facing machine: feeds `chunks` as successive reads to
/// [`ServerMachine`]s under a few policies (small limits, so that every bound is reached)
/// through the generic driver ([`super::drive`]), answering every Login with `AuthFailed`.
/// Panics if an invariant breaks: the driver's, consumption past one command line,
/// unbounded replies, or a transcript that depends on how the input was split.
pub fn fuzz_server(chunks: &[&[u8]]) {
    use super::{Limits, ListenerTls};
    let limits = Limits {
        max_line: 64,
        max_literal: 96,
        max_auth_failures: 3,
        max_commands: 40,
        max_sasl_token: 32 * 1024,
    };
    let policies = [
        (ListenerTls::StartTls, false),
        (ListenerTls::None, true),
        (ListenerTls::Implicit, false),
    ];
    for (tls, allow_plaintext_auth) in policies {
        let policy = ServerPolicy {
            tls,
            allow_plaintext_auth,
            limits: limits.clone(),
            hostname: "fuzz.example".into(),
            mechanisms: Default::default(),
        };
        let driver = || {
            checked(ServerDriver::new(
                ServerMachine::new(policy.clone()),
                |_| LoginOutcome::AuthFailed { response: None },
            ))
        };
        driver().feed_all(chunks);
        assert_split_invariant(driver, chunks);
    }
}

/// The generic driver with POP3's own checks: bounded replies, one line per `receive`.
fn checked(driver: ServerDriver<'_, ServerMachine>) -> ServerDriver<'_, ServerMachine> {
    driver
        .on_send(|_, bytes| assert!(bytes.len() <= MAX_SEND, "reply too long"))
        .on_consumed(one_line_at_most)
}

/// POP3 machines consume one command line at most per `receive`: a single LF, at the very
/// end. Only a line too long to be a command may be swallowed otherwise, and then the
/// machine closes.
fn one_line_at_most(_: &ServerMachine, c: Consumed<'_>) {
    match c.bytes.iter().position(|&b| b == b'\n') {
        Some(i) => assert_eq!(i + 1, c.bytes.len(), "consumed past a line end"),
        None => assert!(c.closed, "consumed a partial line without closing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_codes() {
        assert_eq!(resp_code("[SYS/TEMP] busy"), Some("SYS/TEMP"));
        assert_eq!(resp_code("[IN-USE] locked"), Some("IN-USE"));
        assert_eq!(resp_code("[AUTH]"), Some("AUTH"));
        assert_eq!(resp_code("[] x"), None);
        assert_eq!(resp_code("[SYS//TEMP] x"), None);
        assert_eq!(resp_code("[SYS TEMP] x"), None);
        assert_eq!(resp_code("[AUTH x"), None);
        assert_eq!(resp_code("AUTH] x"), None);
        assert!(code_is("SYS/TEMP", "SYS/TEMP"));
        assert!(code_is("sys/temp/quota", "SYS/TEMP"));
        assert!(!code_is("SYS/TEMPX", "SYS/TEMP"));
        assert!(!code_is("SYS", "SYS/TEMP"));
        assert!(!code_is("SYS/PERM", "SYS/TEMP"));
    }

    #[test]
    fn quit_bytes() {
        assert_eq!(QUIT, b"QUIT\r\n");
    }

    use crate::fuzzing::Rng;

    const TOKENS: &[&[u8]] = &[
        b"USER joe\r\n",
        b"USER \r\n",
        b"PASS two words\r\n",
        b"PASS\r\n",
        b"AUTH\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH PLAIN AGpvZQBwdw==\r\n",
        b"AUTH PLAIN =\r\n",
        b"auth login\r\n",
        b"AUTH LOGIN am9l\r\n",
        b"AUTH XOAUTH2\r\n",
        b"AGpvZQBwdw==\r\n",
        b"am9l\r\n",
        b"cHc=\r\n",
        b"*\r\n",
        b"=\r\n",
        b"!!\r\n",
        b"STLS\r\n",
        b"stls extra\r\n",
        b"CAPA\r\n",
        b"NOOP\r\n",
        b"APOP joe 0123\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b"AUTH ",
        b"QUIT\r\n",
    ];

    fn random_input(rng: &mut Rng) -> Vec<u8> {
        let mut input = Vec::new();
        for _ in 0..rng.below(24) {
            match rng.below(10) {
                0 => {
                    for _ in 0..1 + rng.below(8) {
                        input.push(rng.next_u64() as u8);
                    }
                }
                1 => input.extend(std::iter::repeat_n(b'A', 40 + rng.below(200))),
                _ => {
                    // QUIT ends most runs early: keep it rare.
                    let mut t = TOKENS[rng.below(TOKENS.len())];
                    if t == b"QUIT\r\n" && rng.below(4) != 0 {
                        t = b"CAPA\r\n";
                    }
                    input.extend_from_slice(t);
                }
            }
        }
        input
    }

    #[test]
    fn fuzz_server_on_random_inputs() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let input = random_input(&mut rng);
            let mut chunks = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(16));
                chunks.push(&rest[..n]);
                rest = &rest[n..];
            }
            fuzz_server(&chunks);
        }
    }

    #[test]
    fn fuzz_server_edge_inputs() {
        fuzz_server(&[]);
        fuzz_server(&[b""]);
        fuzz_server(&[&[0u8; 300]]);
        fuzz_server(&[b"AUTH PLAIN\r\n", &[b'A'; 200], b"\r\n"]);
        fuzz_server(&[b"STLS\r\nCAPA\r\nUSER a\r\nPASS b\r\n"]);
        let many: Vec<u8> = b"NOOP\r\n".repeat(100);
        fuzz_server(&[&many]);
        let fails: Vec<u8> = b"USER a\r\nPASS b\r\n".repeat(10);
        fuzz_server(&[&fails]);
    }
}

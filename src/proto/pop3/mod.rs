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

use super::{Action, Credentials, LoginOutcome, PreAuth, ServerPolicy};

/// The bytes that end a POP3 session politely; the driver sends them after a
/// pop-before-smtp verification login (the probe sends them itself).
pub const QUIT: &[u8] = b"QUIT\r\n";

/// Longest text taken from a peer and put into a reply or a result (backend rejection
/// texts, capability lines): longer texts are cut at a character boundary.
const MAX_TEXT: usize = 256;

/// What [`next_line`] found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// No line end within the limit yet: wait for more bytes.
    Incomplete,
    /// `limit` bytes or more without a line end.
    TooLong,
    /// A complete line: its content without CRLF (or LF), and the bytes it occupies.
    Complete {
        /// The line without its terminator.
        line: &'a [u8],
        /// Bytes to consume, terminator included.
        len: usize,
    },
}

/// Finds the first line of `input`; `limit` counts the terminator. The decision depends
/// only on the first `limit` bytes, so it is the same however the input was split.
fn next_line(input: &[u8], limit: usize) -> Line<'_> {
    // A zero limit (a misconfiguration) must not turn an empty buffer into an error.
    let limit = limit.max(1);
    let window = &input[..input.len().min(limit)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let line = &input[..i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Line::Complete { line, len: i + 1 }
        }
        None if input.len() >= limit => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// Makes peer text safe to put on one protocol line or in a log: lossy UTF-8, control
/// characters (CR and LF included) turned into spaces, trimmed, at most [`MAX_TEXT`] bytes.
fn sanitize(raw: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end().to_owned()
}

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

/// Most actions one event may produce (greeting; or a reply, a Login, the reply to its
/// outcome and a Close).
const MAX_ACTIONS_PER_EVENT: usize = 4;
/// Longest reply the client-facing machine may queue in one `Send`.
const MAX_SEND: usize = 2 * MAX_TEXT + 64;

/// Drives a [`ServerMachine`] the way the session driver does: one buffer, chunks appended
/// as they "arrive", `receive` called while it consumes, actions drained after each event.
/// Logins are answered by `login`; on StartTls the buffer is discarded when
/// `discard_on_tls` (as the driver does) and otherwise kept as if it had come through TLS.
/// Returns the transcript (replies verbatim, other actions as `<...>`) and the input never
/// consumed (after hand-off: what the relay would send to the backend first). Asserts the input contract and output bounds along the way.
fn drive_server(
    policy: ServerPolicy,
    chunks: &[&[u8]],
    login: &mut dyn FnMut(&Credentials) -> LoginOutcome,
    discard_on_tls: bool,
) -> (String, Vec<u8>) {
    let mut run = ServerRun {
        machine: ServerMachine::new(policy),
        buf: Vec::new(),
        transcript: String::new(),
        closed: false,
        login,
        discard_on_tls,
    };
    run.pump();
    for chunk in chunks {
        // Bytes keep arriving after hand-off or Close; they stay in the buffer (relayed to
        // the backend, or dropped with the connection).
        run.buf.extend_from_slice(chunk);
        while !run.finished() {
            let used = run.machine.receive(&run.buf);
            assert!(used <= run.buf.len(), "consumed past the end of the input");
            let consumed: Vec<u8> = run.buf.drain(..used).collect();
            run.pump();
            if used == 0 {
                break;
            }
            // One command line at most: a single LF, at the very end; only a line that is
            // too long to be a command may be swallowed otherwise, and then the machine closes.
            match consumed.iter().position(|&b| b == b'\n') {
                Some(i) => assert_eq!(i + 1, consumed.len(), "consumed past a line end"),
                None => assert!(run.closed, "consumed a partial line without closing"),
            }
        }
    }
    if run.closed {
        assert_eq!(
            run.machine.receive(&run.buf),
            0,
            "input consumed after Close"
        );
        assert!(run.machine.poll_action().is_none(), "action after Close");
    }
    let _ = run.machine.phase();
    (run.transcript, run.buf)
}

struct ServerRun<'a> {
    machine: ServerMachine,
    buf: Vec<u8>,
    transcript: String,
    closed: bool,
    login: &'a mut dyn FnMut(&Credentials) -> LoginOutcome,
    discard_on_tls: bool,
}

impl ServerRun<'_> {
    fn finished(&self) -> bool {
        self.closed || self.machine.is_authenticated()
    }

    fn pump(&mut self) {
        let mut count = 0;
        while let Some(action) = self.machine.poll_action() {
            count += 1;
            assert!(
                count <= MAX_ACTIONS_PER_EVENT,
                "too many actions for one event"
            );
            assert!(!self.closed, "action after Close");
            match action {
                Action::Send(bytes) => {
                    assert!(bytes.len() <= MAX_SEND, "reply too long");
                    assert!(bytes.ends_with(b"\r\n"), "reply not CRLF terminated");
                    self.transcript.push_str(&String::from_utf8_lossy(&bytes));
                }
                Action::StartTls => {
                    self.transcript.push_str("<starttls>");
                    assert_eq!(self.machine.receive(&self.buf), 0, "consumed during TLS");
                    if self.discard_on_tls && !self.buf.is_empty() {
                        let n = self.buf.len();
                        self.transcript.push_str(&format!("<discard {n}>"));
                        self.buf.clear();
                    }
                    self.machine.tls_established();
                }
                Action::Login(creds) => {
                    self.transcript.push_str(&format!(
                        "<login {} {} {}>",
                        creds.user,
                        String::from_utf8_lossy(creds.secret.expose()),
                        creds.mechanism.as_str()
                    ));
                    assert_eq!(self.machine.receive(&self.buf), 0, "consumed during login");
                    let outcome = (self.login)(&creds);
                    self.machine.login_done(outcome);
                }
                Action::Close => {
                    self.transcript.push_str("<close>");
                    self.closed = true;
                }
            }
        }
    }
}

/// Fuzz body for the client-facing machine: feeds `chunks` as successive reads to
/// [`ServerMachine`]s under a few policies (small limits, so that every bound is reached),
/// answering every Login with `AuthFailed` and every StartTls with `tls_established`.
/// Panics if an invariant breaks: consumption past the input or past one command line,
/// unbounded or unterminated replies, actions after Close, input consumed while a login or
/// handshake is pending, or a transcript that depends on how the input was split.
pub fn fuzz_server(chunks: &[&[u8]]) {
    use super::{Limits, ListenerTls};
    let whole = chunks.concat();
    let limits = Limits {
        max_line: 64,
        max_literal: 96,
        max_auth_failures: 3,
        max_commands: 40,
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
        };
        let mut fail = |_: &Credentials| LoginOutcome::AuthFailed { response: None };
        drive_server(policy.clone(), chunks, &mut fail, true);
        // With the buffer kept across TLS, the split cannot matter.
        let (split, _) = drive_server(policy.clone(), chunks, &mut fail, false);
        let (joined, _) = drive_server(policy, &[&whole], &mut fail, false);
        assert_eq!(split, joined, "transcript depends on the read boundaries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_line_bounds() {
        assert_eq!(next_line(b"abc", 10), Line::Incomplete);
        assert_eq!(
            next_line(b"ab\r\ncd\r\n", 10),
            Line::Complete {
                line: b"ab",
                len: 4
            }
        );
        assert_eq!(
            next_line(b"ab\ncd", 10),
            Line::Complete {
                line: b"ab",
                len: 3
            }
        );
        // The limit counts the terminator.
        assert_eq!(
            next_line(b"abc\r\n", 5),
            Line::Complete {
                line: b"abc",
                len: 5
            }
        );
        assert_eq!(next_line(b"abcd\r\n", 5), Line::TooLong);
        assert_eq!(next_line(b"abcd\r", 5), Line::TooLong);
        assert_eq!(next_line(b"abcd", 5), Line::Incomplete);
        assert_eq!(next_line(b"", 5), Line::Incomplete);
        assert_eq!(next_line(b"", 0), Line::Incomplete);
        assert_eq!(next_line(b"x", 0), Line::TooLong);
    }

    #[test]
    fn sanitize_strips_controls_and_bounds() {
        assert_eq!(sanitize(b" bad\r\nDELE 1\0 "), "bad  DELE 1");
        assert_eq!(sanitize(&[b'x'; 1000]).len(), MAX_TEXT);
        let long = "é".repeat(200);
        let cut = sanitize(long.as_bytes());
        assert!(cut.len() <= MAX_TEXT && cut.chars().all(|c| c == 'é'));
        assert_eq!(sanitize(b"\xff ok"), "\u{fffd} ok");
    }

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

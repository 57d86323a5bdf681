//! IMAP before login, sans-IO: the client-facing [`ServerMachine`] and the
//! backend-facing [`BackendMachine`].
//!
//! * `syntax`: framing (lines, literal markers), the token reader, tags, quoting;
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

use super::{
    Action, BackendAction, BackendLogin, BackendPolicy, BackendTls, ClientInfo, Credentials,
    Limits, ListenerTls, LoginOutcome, Mechanism, PreAuth, Secret, ServerPolicy,
};

/// Most bytes the fuzz drivers accept from one drain of a machine's actions.
const FUZZ_MAX_OUTPUT: usize = 4096;

/// Drives a [`ServerMachine`] with `chunks` arriving one after the other, as the session
/// driver would: one input buffer, `receive` while it consumes, every action drained.
/// `Login` is answered with `AuthFailed` (or `Unavailable`), `StartTls` with `tls_established` (input
/// pipelined before the handshake is discarded, as the driver refuses it). The first
/// byte is not input: it picks the listener's TLS mode, whether plaintext auth is
/// allowed, and the login outcome. Limits are small so that every bound is reached.
///
/// Panics if an invariant breaks: more consumed than given, output of one step over
/// `FUZZ_MAX_OUTPUT` (4096) bytes, input consumed while a login or handshake is pending, a
/// login with an invalid user or a password with NUL.
pub fn fuzz_server(chunks: &[&[u8]]) {
    let sel = chunks.first().and_then(|c| c.first()).copied().unwrap_or(0);
    let limits = Limits {
        max_line: 200,
        max_literal: 100,
        max_auth_failures: 3,
        max_commands: 40,
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
    };
    let mut m = ServerMachine::new(policy);
    let mut buf: Vec<u8> = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let chunk = if i == 0 {
            chunk.get(1..).unwrap_or_default()
        } else {
            chunk
        };
        buf.extend_from_slice(chunk);
        loop {
            let mut output = 0;
            while let Some(action) = m.poll_action() {
                match action {
                    Action::Send(bytes) => output += bytes.len(),
                    Action::StartTls => {
                        assert_eq!(m.receive(&buf), 0, "consumed during STARTTLS");
                        buf.clear();
                        m.tls_established();
                    }
                    Action::Login(creds) => {
                        assert_eq!(m.receive(&buf), 0, "consumed during login");
                        assert!(crate::proto::sasl::valid_user(creds.user.as_bytes()).is_some());
                        assert!(!creds.secret.expose().contains(&0));
                        m.login_done(match sel & 8 {
                            0 => LoginOutcome::AuthFailed { response: None },
                            _ => LoginOutcome::Unavailable,
                        });
                    }
                    Action::Close => return,
                }
            }
            assert!(
                output <= FUZZ_MAX_OUTPUT,
                "{output} bytes of output in one step"
            );
            if m.is_authenticated() {
                return;
            }
            let used = m.receive(&buf);
            assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
            if used == 0 {
                assert_eq!(m.poll_action(), None, "action without progress");
                break;
            }
            buf.drain(..used);
        }
        // The driver gives up on a buffer that big without progress.
        if buf.len() > limits.max_line + limits.max_literal {
            return;
        }
    }
}

/// Drives a [`BackendMachine`] with `chunks` from a fake backend, as the backend driver
/// would. The first byte is not input: it picks the TLS mode, probe or login, and ID
/// forwarding. The password holds bytes that need a literal. `StartTls` discards the buffer and reports
/// the handshake done.
///
/// Panics if an invariant breaks: more consumed than given, a command over
/// `FUZZ_MAX_OUTPUT` (4096) bytes, input consumed after `Done` or during a handshake.
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
    };
    let creds = (sel & 4 == 0).then(|| Credentials {
        user: "jo\"e".into(),
        secret: Secret::new(b"p\r\n{5}\xc3\xa9".to_vec()),
        mechanism: Mechanism::Login,
    });
    let mut m = BackendMachine::new(policy, creds);
    let mut buf: Vec<u8> = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let chunk = if i == 0 {
            chunk.get(1..).unwrap_or_default()
        } else {
            chunk
        };
        buf.extend_from_slice(chunk);
        loop {
            while let Some(action) = m.poll_action() {
                match action {
                    BackendAction::Send(bytes) => assert!(bytes.len() <= FUZZ_MAX_OUTPUT),
                    BackendAction::StartTls => {
                        assert_eq!(m.receive(&buf), 0, "consumed during STARTTLS");
                        buf.clear();
                        m.tls_established();
                    }
                    BackendAction::Done(_) => {
                        assert_eq!(m.receive(&buf), 0, "consumed after Done");
                        return;
                    }
                }
            }
            let used = m.receive(&buf);
            assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
            if used == 0 {
                break;
            }
            buf.drain(..used);
        }
        if buf.len() > BACKEND_MAX_LINE + BACKEND_MAX_LITERAL {
            return;
        }
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

//! The backend-facing POP3 machine: greeting, CAPA, STLS, and the login replay or probe.

use std::collections::VecDeque;
use std::fmt;

use super::{code_is, resp_code, MAX_TEXT, QUIT};
use crate::proto::line::{next_line, Line};
use crate::proto::sasl;
use crate::proto::text::sanitize;
use crate::proto::{
    BackendAction, BackendLogin, BackendPolicy, BackendResult, BackendTls, Credentials, Secret,
    Unavailable,
};

/// Longest backend line accepted, terminator included.
const MAX_BACKEND_LINE: usize = 64 * 1024;
/// Most CAPA lines accepted.
const MAX_CAPA_LINES: usize = 256;
/// RFC 2449: a command line is at most 255 octets, CRLF included. RFC 5034 forbids the
/// initial response when it would make AUTH longer than that.
const MAX_COMMAND_LINE: usize = 255;

/// Logs into one POP3 backend as a client would, or probes it when it has no credentials.
///
/// ```text
///  Greeting --+OK--> CAPA sent --+OK--> reading CAPA lines --"."--+
///     |                 |                                         |
///   -ERR, junk:       -ERR (old server: no CAPA) -----------------+
///   Unavailable                                                   v
///   (Greeting)                                   caps known ------+
///                                                                 |
///   TLS required, not done yet: STLS listed? no: Unavailable(Tls) |
///     yes: STLS sent --+OK--> StartTls --tls_established--> CAPA sent (again)
///                      -ERR--> Unavailable(Tls)
///   no credentials (probe): QUIT sent, Done(Ready{CAPA lines})
///   SASL lists PLAIN: AUTH PLAIN <initial response> (or AUTH PLAIN, `+`, response when
///                     the command would exceed 255 octets)
///   else (USER listed, or no CAPA): USER sent --+OK--> PASS sent
///   else: Unavailable(NoMechanism)
///   login reply: +OK -> LoggedIn (consumed exactly through that line)
///                -ERR [SYS/TEMP] -> Unavailable(Protocol); any other -ERR -> AuthFailed
/// ```
///
/// Credentials that the chosen command cannot carry safely (CR, LF or NUL in the password
/// for USER/PASS or NUL for PLAIN; a user name with spaces or control characters for USER)
/// end the machine with `AuthFailed` before anything is sent, so a password can never
/// smuggle a second command.
pub struct BackendMachine {
    policy: BackendPolicy,
    creds: Option<Credentials>,
    tls_done: bool,
    state: State,
    /// CAPA lines (dot-unstuffed); `None` when CAPA was refused or not read yet.
    caps: Option<Vec<String>>,
    /// The base64 PLAIN message, kept while the server may still ask for it with `+`.
    plain: Option<Secret>,
    /// The login replays an OAuth token with this mechanism.
    token: Option<crate::proto::Mechanism>,
    /// The error challenge the server answered the token with (RFC 7628).
    challenge: Option<String>,
    actions: VecDeque<BackendAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    CapaStatus,
    CapaLines,
    Stls,
    WaitTls,
    User,
    Pass,
    /// `AUTH PLAIN <ir>` sent; a `+` means the server ignored the initial response.
    AuthInitial,
    /// `AUTH PLAIN` sent without initial response: waiting for `+`.
    AuthWait,
    /// The PLAIN response sent after a `+`.
    AuthResponse,
    /// A token was answered with an error challenge; the dummy response is sent and the
    /// final `-ERR` is awaited.
    TokenChallenged,
    Done,
}

/// The status at the start of a backend line.
enum Status<'a> {
    Ok,
    Err(&'a [u8]),
    /// A continuation, with its challenge (empty for "send your response").
    Continue(&'a [u8]),
    Other,
}

fn status(line: &[u8]) -> Status<'_> {
    if line == b"+OK" || line.starts_with(b"+OK ") {
        Status::Ok
    } else if line == b"-ERR" || line.starts_with(b"-ERR ") {
        Status::Err(line.get(5..).unwrap_or_default())
    } else if line == b"+" || line.starts_with(b"+ ") {
        Status::Continue(line.get(2..).unwrap_or_default())
    } else {
        Status::Other
    }
}

/// What a negative answer to USER, PASS or AUTH means: `[SYS/TEMP]` is a temporary server
/// failure (fail over); anything else, `[AUTH]`, `[IN-USE]`, `[LOGIN-DELAY]`, `[SYS/PERM]`
/// or no code, is a rejection of this login, never a reason to try another server.
fn rejected(text: &[u8]) -> BackendResult {
    let text = sanitize(text, MAX_TEXT);
    match resp_code(&text) {
        Some(code) if code_is(code, "SYS/TEMP") => {
            BackendResult::Unavailable(Unavailable::Protocol)
        }
        _ => BackendResult::AuthFailed { response: text },
    }
}

/// A USER argument every server parses the same way: non-empty, no spaces, no controls.
fn user_safe(user: &str) -> bool {
    !user.is_empty() && user.bytes().all(|b| b > b' ' && b != 0x7f)
}

impl BackendMachine {
    /// A machine for one backend connection; with `creds` None it only probes the server.
    /// With `BackendTls::Implicit` the driver has completed the handshake already.
    pub fn new(policy: BackendPolicy, creds: Option<Credentials>) -> Self {
        let tls_done = policy.tls != BackendTls::StartTls;
        BackendMachine {
            token: creds
                .as_ref()
                .and_then(|c| c.token_payload().map(|(_, m)| m)),
            challenge: None,
            policy,
            creds,
            tls_done,
            state: State::Greeting,
            caps: None,
            plain: None,
            actions: VecDeque::new(),
        }
    }

    fn send(&mut self, bytes: impl Into<Vec<u8>>) {
        self.actions.push_back(BackendAction::Send(bytes.into()));
    }

    fn finish(&mut self, result: BackendResult) {
        self.actions.push_back(BackendAction::Done(result));
        self.state = State::Done;
        self.plain = None;
        self.creds = None;
    }

    fn has_cap(&self, name: &str) -> bool {
        self.caps.iter().flatten().any(|line| {
            line.split(' ')
                .next()
                .is_some_and(|word| word.eq_ignore_ascii_case(name))
        })
    }

    fn sasl_offered(&self, mechanism: &str) -> bool {
        self.caps.iter().flatten().any(|line| {
            let mut words = line.split(' ').filter(|w| !w.is_empty());
            words.next().is_some_and(|w| w.eq_ignore_ascii_case("SASL"))
                && words.any(|w| w.eq_ignore_ascii_case(mechanism))
        })
    }

    fn send_capa(&mut self) {
        self.caps = None;
        self.send(&b"CAPA\r\n"[..]);
        self.state = State::CapaStatus;
    }

    /// Capabilities are known (or CAPA was refused): STLS, probe result or login.
    fn caps_done(&mut self) {
        if !self.tls_done {
            if self.has_cap("STLS") {
                self.send(&b"STLS\r\n"[..]);
                self.state = State::Stls;
            } else {
                self.finish(BackendResult::Unavailable(Unavailable::Tls));
            }
            return;
        }
        let Some(creds) = self.creds.take() else {
            self.send(QUIT);
            let capabilities = self.caps.take().unwrap_or_default();
            return self.finish(BackendResult::Ready { capabilities });
        };
        if let Some((payload, mechanism)) = creds.token_payload() {
            // A token goes with the mechanism it came with, or not at all.
            if !self.sasl_offered(mechanism.sasl_name()) {
                return self.finish(BackendResult::Unavailable(Unavailable::NoMechanism));
            }
            let message = Secret::new(sasl::encode_base64(payload.expose()).into_bytes());
            return self.start_sasl(mechanism.sasl_name(), message);
        }
        if self.sasl_offered("PLAIN") {
            self.start_plain(&creds);
        } else if self.caps.is_none() || self.has_cap("USER") {
            self.start_user(creds);
        } else {
            self.finish(BackendResult::Unavailable(Unavailable::NoMechanism));
        }
    }

    fn start_plain(&mut self, creds: &Credentials) {
        let Some(message) = sasl::encode_plain(creds) else {
            return self.finish(BackendResult::AuthFailed {
                response: "[AUTH] The password cannot be sent to this server".into(),
            });
        };
        self.start_sasl("PLAIN", Secret::new(message.into_bytes()));
    }

    /// `AUTH MECHANISM` with the message as initial response when the line stays within
    /// RFC 5034's bound, else after the server's `+`.
    fn start_sasl(&mut self, mechanism: &str, message: Secret) {
        let prefix = format!("AUTH {mechanism} ");
        if prefix.len() + message.expose().len() + 2 <= MAX_COMMAND_LINE {
            let mut line = Vec::with_capacity(prefix.len() + message.expose().len() + 2);
            line.extend_from_slice(prefix.as_bytes());
            line.extend_from_slice(message.expose());
            line.extend_from_slice(b"\r\n");
            self.send(line);
            self.state = State::AuthInitial;
        } else {
            self.send(format!("AUTH {mechanism}\r\n").into_bytes());
            self.state = State::AuthWait;
        }
        self.plain = Some(message);
    }

    /// A `+` with data after the whole token: RFC 7628's error challenge. The dummy
    /// response ends the exchange; the client will be shown the challenge.
    fn token_challenged(&mut self, data: &[u8]) {
        let challenge: String = String::from_utf8_lossy(data)
            .chars()
            .filter(char::is_ascii_graphic)
            .take(4096)
            .collect();
        let dummy: &[u8] = match self.token {
            Some(crate::proto::Mechanism::OAuthBearer) => b"AQ==\r\n",
            _ => b"\r\n",
        };
        self.send(dummy);
        self.plain = None;
        self.challenge = Some(challenge);
        self.state = State::TokenChallenged;
    }

    /// Sends the PLAIN message after a `+`, at most once.
    fn send_plain_response(&mut self) {
        match self.plain.take() {
            Some(message) => {
                let mut line = Vec::with_capacity(message.expose().len() + 2);
                line.extend_from_slice(message.expose());
                line.extend_from_slice(b"\r\n");
                self.send(line);
                self.state = State::AuthResponse;
            }
            None => self.finish(BackendResult::Unavailable(Unavailable::Protocol)),
        }
    }

    fn start_user(&mut self, creds: Credentials) {
        let Some(password) = creds.secret().map(Secret::expose) else {
            // A bridged login has no password to replay.
            return self.finish(BackendResult::Unavailable(Unavailable::NoMechanism));
        };
        if !user_safe(&creds.user) || password.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
            return self.finish(BackendResult::AuthFailed {
                response: "[AUTH] The user name or password cannot be sent to this server".into(),
            });
        }
        self.send(format!("USER {}\r\n", creds.user));
        self.creds = Some(creds);
        self.state = State::User;
    }

    fn send_pass(&mut self) {
        let Some(creds) = self.creds.take() else {
            return self.finish(BackendResult::Unavailable(Unavailable::Protocol));
        };
        let password = creds.secret().map(Secret::expose).unwrap_or_default();
        let mut line = Vec::with_capacity(password.len() + 7);
        line.extend_from_slice(b"PASS ");
        line.extend_from_slice(password);
        line.extend_from_slice(b"\r\n");
        self.send(line);
        self.state = State::Pass;
    }

    fn line(&mut self, line: &[u8]) {
        match (self.state, status(line)) {
            (State::Greeting, Status::Ok) => self.send_capa(),
            (State::Greeting, _) => self.finish(BackendResult::Unavailable(Unavailable::Greeting)),

            (State::CapaStatus, Status::Ok) => {
                self.caps = Some(Vec::new());
                self.state = State::CapaLines;
            }
            (State::CapaStatus, Status::Err(_)) => self.caps_done(),
            (State::CapaStatus, _) => {
                self.finish(BackendResult::Unavailable(Unavailable::Protocol))
            }
            (State::CapaLines, _) => self.capa_line(line),

            (State::Stls, Status::Ok) => {
                self.actions.push_back(BackendAction::StartTls);
                self.state = State::WaitTls;
            }
            (State::Stls, _) => self.finish(BackendResult::Unavailable(Unavailable::Tls)),

            (State::User, Status::Ok) => self.send_pass(),
            (State::Pass | State::AuthInitial | State::AuthResponse, Status::Ok) => {
                self.finish(BackendResult::LoggedIn { capabilities: None })
            }
            (State::TokenChallenged, Status::Err(text)) => {
                let challenge = self.challenge.take().unwrap_or_default();
                let response = match rejected(text) {
                    BackendResult::AuthFailed { response } => response,
                    other => return self.finish(other),
                };
                self.finish(BackendResult::TokenRefused {
                    challenge,
                    response,
                });
            }
            (State::TokenChallenged, _) => {
                self.finish(BackendResult::Unavailable(Unavailable::Protocol))
            }
            (State::AuthInitial | State::AuthResponse, Status::Continue(data))
                if self.token.is_some() && !data.is_empty() =>
            {
                self.token_challenged(data)
            }
            (
                State::User
                | State::Pass
                | State::AuthInitial
                | State::AuthWait
                | State::AuthResponse,
                Status::Err(text),
            ) => {
                let result = rejected(text);
                self.finish(result);
            }
            (State::AuthInitial | State::AuthWait, Status::Continue(_)) => {
                self.send_plain_response()
            }
            (
                State::User
                | State::Pass
                | State::AuthInitial
                | State::AuthWait
                | State::AuthResponse,
                _,
            ) => self.finish(BackendResult::Unavailable(Unavailable::Protocol)),

            (State::WaitTls | State::Done, _) => {}
        }
    }

    fn capa_line(&mut self, line: &[u8]) {
        if line == b"." {
            return self.caps_done();
        }
        // Dot-unstuffing: a line that starts with a dot had one added.
        let line = line.strip_prefix(b".").unwrap_or(line);
        let full = self.caps.as_ref().is_none_or(|c| c.len() >= MAX_CAPA_LINES);
        if full {
            return self.finish(BackendResult::Unavailable(Unavailable::Protocol));
        }
        let text = sanitize(line, MAX_TEXT);
        if let Some(caps) = self.caps.as_mut() {
            caps.push(text);
        }
    }
}

impl BackendLogin for BackendMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        if matches!(self.state, State::WaitTls | State::Done) {
            return 0;
        }
        match next_line(input, MAX_BACKEND_LINE) {
            Line::Incomplete => 0,
            Line::TooLong => {
                self.finish(BackendResult::Unavailable(Unavailable::Protocol));
                0
            }
            Line::Complete { content, len } => {
                self.line(content);
                len
            }
        }
    }

    fn poll_action(&mut self) -> Option<BackendAction> {
        self.actions.pop_front()
    }

    fn tls_established(&mut self) {
        if self.state == State::WaitTls {
            self.tls_done = true;
            self.send_capa();
        }
    }
}

/// Shows the state only: queued actions may hold a PASS or AUTH PLAIN line.
impl fmt::Debug for BackendMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendMachine")
            .field("tls", &self.policy.tls)
            .field("tls_done", &self.tls_done)
            .field("state", &self.state)
            .field("user", &self.creds.as_ref().map(|c| c.user.as_str()))
            .field("caps", &self.caps)
            .field("queued_actions", &self.actions.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::drive::BackendDriver;
    use crate::proto::{ClientInfo, Mechanism};

    fn policy(tls: BackendTls) -> BackendPolicy {
        BackendPolicy {
            tls,
            forward_client: None::<ClientInfo>,
            helo: "proxy.example".into(),
            known_capabilities: None,
        }
    }

    fn creds(user: &str, password: &[u8]) -> Option<Credentials> {
        Some(Credentials::password(
            user.into(),
            password.to_vec(),
            Mechanism::Login,
        ))
    }

    /// A backend conversation as the generic driver played it: what the proxy sent (with
    /// `<starttls>`, `<discard N>` markers) and the result.
    struct Run {
        sent: String,
        done: Option<BackendResult>,
        /// Bytes left unconsumed (after Done: the client's).
        buf: Vec<u8>,
    }

    /// Plays a backend conversation: `server` holds what the backend says, in the chunks it
    /// arrives in.
    fn run(tls: BackendTls, creds: Option<Credentials>, server: &[&[u8]]) -> Run {
        let mut d = BackendDriver::new(BackendMachine::new(policy(tls), creds));
        d.feed_all(server);
        Run {
            sent: d.log(),
            done: d.result().cloned(),
            buf: d.left().to_vec(),
        }
    }

    const CAPA_PLAIN: &[u8] =
        b"+OK\r\nCAPA\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nPIPELINING\r\n.\r\n";
    const CAPA_USER: &[u8] = b"+OK Capability list follows\r\nCAPA\r\nUSER\r\nUIDL\r\n.\r\n";
    const CAPA_STLS: &[u8] = b"+OK\r\nCAPA\r\nSTLS\r\nRESP-CODES\r\n.\r\n";

    fn logged_in() -> Option<BackendResult> {
        Some(BackendResult::LoggedIn { capabilities: None })
    }

    fn auth_failed(text: &str) -> Option<BackendResult> {
        Some(BackendResult::AuthFailed {
            response: text.into(),
        })
    }

    fn unavailable(why: Unavailable) -> Option<BackendResult> {
        Some(BackendResult::Unavailable(why))
    }

    #[test]
    fn greeting_variants() {
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK Dovecot ready.\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\n");
        assert_eq!(r.done, None);
        let r = run(BackendTls::None, creds("joe", b"pw"), &[b"+OK\r\n"]);
        assert_eq!(r.sent, "CAPA\r\n");
        let r = run(
            BackendTls::Implicit,
            None,
            &[b"+OK <1896.697170952@dbc.mtview.ca.us>\n"],
        );
        assert_eq!(r.sent, "CAPA\r\n");
        for bad in [
            &b"-ERR [SYS/TEMP] too busy\r\n"[..],
            b"-ERR\r\n",
            b"+OKAY\r\n",
            b"* OK IMAP4rev1\r\n",
            b"220 smtp ready\r\n",
            b"\r\n",
        ] {
            let r = run(BackendTls::None, creds("joe", b"pw"), &[bad]);
            assert_eq!(r.sent, "", "{bad:?}");
            assert_eq!(r.done, unavailable(Unavailable::Greeting), "{bad:?}");
        }
        // Greeting in pieces.
        let r = run(BackendTls::None, None, &[b"+O", b"K hi", b"\r", b"\n"]);
        assert_eq!(r.sent, "CAPA\r\n");
    }

    #[test]
    fn probe_reports_capabilities_and_quits() {
        let r = run(BackendTls::None, None, &[b"+OK hi\r\n", CAPA_PLAIN]);
        assert_eq!(r.sent, "CAPA\r\nQUIT\r\n");
        assert_eq!(
            r.done,
            Some(BackendResult::Ready {
                capabilities: [
                    "CAPA",
                    "TOP",
                    "USER",
                    "SASL PLAIN LOGIN",
                    "RESP-CODES",
                    "PIPELINING"
                ]
                .map(String::from)
                .to_vec()
            })
        );
        // An old server without CAPA is ready too.
        let r = run(
            BackendTls::None,
            None,
            &[b"+OK hi\r\n-ERR unknown command\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nQUIT\r\n");
        assert_eq!(
            r.done,
            Some(BackendResult::Ready {
                capabilities: vec![]
            })
        );
    }

    #[test]
    fn capa_dot_unstuffing_and_bounds() {
        let r = run(
            BackendTls::None,
            None,
            &[b"+OK\r\n+OK\r\n..hidden\r\nX-A b\r\n", b"\r\n.\r\n"],
        );
        assert_eq!(
            r.done,
            Some(BackendResult::Ready {
                capabilities: vec![".hidden".into(), "X-A b".into(), "".into()]
            })
        );
        let mut many = b"+OK\r\n+OK\r\n".to_vec();
        for _ in 0..=MAX_CAPA_LINES {
            many.extend_from_slice(b"X\r\n");
        }
        let r = run(BackendTls::None, None, &[&many]);
        assert_eq!(r.done, unavailable(Unavailable::Protocol));
        let r = run(BackendTls::None, None, &[b"+OK\r\nwhat?\r\n"]);
        assert_eq!(r.done, unavailable(Unavailable::Protocol));
    }

    #[test]
    fn long_lines_are_unavailable() {
        let mut long = b"+OK ".to_vec();
        long.resize(MAX_BACKEND_LINE, b'x');
        let r = run(BackendTls::None, None, &[&long]);
        assert_eq!(r.done, unavailable(Unavailable::Protocol));
        // One byte shorter with CRLF fits.
        let mut fits = b"+OK ".to_vec();
        fits.resize(MAX_BACKEND_LINE - 2, b'x');
        fits.extend_from_slice(b"\r\n");
        let r = run(BackendTls::None, None, &[&fits]);
        assert_eq!(r.done, None);
        assert_eq!(r.sent, "CAPA\r\n");
    }

    #[test]
    fn tokens_go_with_their_mechanism_and_long_ones_after_the_continuation() {
        let short = b"user=joe\x01auth=Bearer abc\x01\x01".to_vec();
        let b64 = sasl::encode_base64(&short);
        let creds = Some(Credentials::token("joe".into(), short, Mechanism::XOAuth2));
        let r = run(
            BackendTls::None,
            creds,
            &[
                b"+OK hi\r\n",
                b"+OK\r\nSASL PLAIN XOAUTH2\r\n.\r\n",
                b"+OK in\r\n",
            ],
        );
        assert_eq!(r.sent, format!("CAPA\r\nAUTH XOAUTH2 {b64}\r\n"));
        assert_eq!(r.done, logged_in());
        // Over RFC 5034's 255 octets: the message after `+`.
        let long = [
            &b"n,a=joe,\x01auth=Bearer "[..],
            &[b'x'; 400][..],
            b"\x01\x01",
        ]
        .concat();
        let b64 = sasl::encode_base64(&long);
        let creds = Some(Credentials::token(
            "joe".into(),
            long,
            Mechanism::OAuthBearer,
        ));
        let r = run(
            BackendTls::None,
            creds.clone(),
            &[
                b"+OK hi\r\n",
                b"+OK\r\nSASL OAUTHBEARER\r\n.\r\n",
                b"+ \r\n",
                b"+OK in\r\n",
            ],
        );
        assert_eq!(r.sent, format!("CAPA\r\nAUTH OAUTHBEARER\r\n{b64}\r\n"));
        assert_eq!(r.done, logged_in());
        // The error challenge: the dummy response, then the failure with the challenge.
        let r = run(
            BackendTls::None,
            creds.clone(),
            &[
                b"+OK hi\r\n",
                b"+OK\r\nSASL OAUTHBEARER\r\n.\r\n",
                b"+ \r\n",
                b"+ eyJ9\r\n",
                b"-ERR [AUTH] no\r\n",
            ],
        );
        assert!(r.sent.ends_with("\r\nAQ==\r\n"), "{}", r.sent);
        assert_eq!(
            r.done,
            Some(BackendResult::TokenRefused {
                challenge: "eyJ9".into(),
                response: "[AUTH] no".into()
            })
        );
        // Not offered: unavailable for this login.
        let r = run(
            BackendTls::None,
            creds,
            &[b"+OK hi\r\n", b"+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n"],
        );
        assert_eq!(r.done, unavailable(Unavailable::NoMechanism));
    }

    #[test]
    fn plain_when_offered() {
        let r = run(
            BackendTls::None,
            creds("joe", b"s3cret"),
            &[b"+OK\r\n", CAPA_PLAIN, b"+OK Logged in.\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(r.done, logged_in());
    }

    #[test]
    fn user_pass_otherwise() {
        let r = run(
            BackendTls::None,
            creds("joe", b"two words"),
            &[b"+OK\r\n", CAPA_USER, b"+OK\r\n+OK Logged in.\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nUSER joe\r\nPASS two words\r\n");
        assert_eq!(r.done, logged_in());
        // Old server: CAPA refused.
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n-ERR what\r\n+OK\r\n+OK\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nUSER joe\r\nPASS pw\r\n");
        assert_eq!(r.done, logged_in());
        // USER refused.
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_USER, b"-ERR [AUTH] No such user\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nUSER joe\r\n");
        assert_eq!(r.done, auth_failed("[AUTH] No such user"));
    }

    #[test]
    fn no_usable_mechanism() {
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n+OK\r\nCAPA\r\nSASL GSSAPI\r\nSTLS\r\n.\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\n");
        assert_eq!(r.done, unavailable(Unavailable::NoMechanism));
    }

    #[test]
    fn rejections_and_temporary_failures() {
        let cases: [(&[u8], Option<BackendResult>); 7] = [
            (
                b"-ERR [AUTH] Authentication failed.\r\n",
                auth_failed("[AUTH] Authentication failed."),
            ),
            (b"-ERR Bad login\r\n", auth_failed("Bad login")),
            (b"-ERR\r\n", auth_failed("")),
            (
                b"-ERR [IN-USE] Mailbox locked\r\n",
                auth_failed("[IN-USE] Mailbox locked"),
            ),
            (
                b"-ERR [LOGIN-DELAY] Wait\r\n",
                auth_failed("[LOGIN-DELAY] Wait"),
            ),
            (
                b"-ERR [SYS/TEMP] Try later\r\n",
                unavailable(Unavailable::Protocol),
            ),
            (
                b"-ERR [sys/temp/db] down\r\n",
                unavailable(Unavailable::Protocol),
            ),
        ];
        for (reply, want) in cases {
            let r = run(
                BackendTls::None,
                creds("joe", b"pw"),
                &[b"+OK\r\n", CAPA_PLAIN, reply],
            );
            assert_eq!(r.done, want, "{reply:?}");
            let r = run(
                BackendTls::None,
                creds("joe", b"pw"),
                &[b"+OK\r\n", CAPA_USER, b"+OK\r\n", reply],
            );
            assert_eq!(r.done, want, "{reply:?}");
        }
        // Control characters in the rejection text are neutralized.
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_PLAIN, b"-ERR no\x00pe\r\n"],
        );
        assert_eq!(r.done, auth_failed("no pe"));
        // Nonsense in reply to the login is a protocol failure.
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_USER, b"* OK\r\n"],
        );
        assert_eq!(r.done, unavailable(Unavailable::Protocol));
    }

    #[test]
    fn leftovers_after_login_stay() {
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_PLAIN, b"+OK Logged in.\r\n+OK 2 320\r\n"],
        );
        assert_eq!(r.done, logged_in());
        assert_eq!(r.buf, b"+OK 2 320\r\n");
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_USER, b"+OK\r\n+OK\r\n.\r\n-ERR x\r\n"],
        );
        assert_eq!(r.done, logged_in());
        // The driver checked that nothing is consumed and nothing asked for after Done.
        assert_eq!(r.buf, b".\r\n-ERR x\r\n");
    }

    #[test]
    fn stls_ok_rereads_caps() {
        let r = run(
            BackendTls::StartTls,
            creds("joe", b"pw"),
            &[
                b"+OK\r\n",
                CAPA_STLS,
                b"+OK Begin TLS\r\n",
                CAPA_PLAIN,
                b"+OK\r\n",
            ],
        );
        assert_eq!(
            r.sent,
            "CAPA\r\nSTLS\r\n<starttls>CAPA\r\nAUTH PLAIN AGpvZQBwdw==\r\n"
        );
        assert_eq!(r.done, logged_in());
        // After TLS the old (plaintext) caps are forgotten: only USER now.
        let r = run(
            BackendTls::StartTls,
            creds("joe", b"pw"),
            &[
                b"+OK\r\n",
                b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n",
                b"+OK\r\n",
                CAPA_USER,
                b"+OK\r\n+OK\r\n",
            ],
        );
        assert_eq!(
            r.sent,
            "CAPA\r\nSTLS\r\n<starttls>CAPA\r\nUSER joe\r\nPASS pw\r\n"
        );
        assert_eq!(r.done, logged_in());
    }

    #[test]
    fn stls_leaves_trailing_bytes_for_discard() {
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), None);
        let mut input = b"+OK\r\n".to_vec();
        input.extend_from_slice(CAPA_STLS);
        let mut at = 0;
        loop {
            let used = m.receive(&input[at..]);
            at += used;
            if used == 0 {
                break;
            }
        }
        let actions: Vec<_> = std::iter::from_fn(|| m.poll_action()).collect();
        assert_eq!(
            actions,
            vec![
                BackendAction::Send(b"CAPA\r\n".to_vec()),
                BackendAction::Send(b"STLS\r\n".to_vec())
            ]
        );
        let reply = b"+OK go ahead\r\n+OK injected\r\n";
        assert_eq!(m.receive(reply), 14);
        assert_eq!(m.poll_action(), Some(BackendAction::StartTls));
        assert_eq!(m.receive(&reply[14..]), 0);
        m.tls_established();
        assert_eq!(
            m.poll_action(),
            Some(BackendAction::Send(b"CAPA\r\n".to_vec()))
        );
        // Through the harness: the injected line is discarded, not taken as the CAPA reply.
        let r = run(
            BackendTls::StartTls,
            None,
            &[b"+OK\r\n", CAPA_STLS, reply, CAPA_STLS],
        );
        assert_eq!(
            r.sent,
            "CAPA\r\nSTLS\r\n<starttls><discard 14>CAPA\r\nQUIT\r\n"
        );
        assert!(matches!(r.done, Some(BackendResult::Ready { .. })));
    }

    #[test]
    fn stls_refused_or_absent() {
        let r = run(
            BackendTls::StartTls,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_STLS, b"-ERR not now\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nSTLS\r\n");
        assert_eq!(r.done, unavailable(Unavailable::Tls));
        let r = run(
            BackendTls::StartTls,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_PLAIN],
        );
        assert_eq!(r.sent, "CAPA\r\n");
        assert_eq!(r.done, unavailable(Unavailable::Tls));
        let r = run(BackendTls::StartTls, None, &[b"+OK\r\n-ERR no CAPA\r\n"]);
        assert_eq!(r.done, unavailable(Unavailable::Tls));
        let r = run(
            BackendTls::StartTls,
            None,
            &[b"+OK\r\n", CAPA_STLS, b"garbage\r\n"],
        );
        assert_eq!(r.done, unavailable(Unavailable::Tls));
        // Plaintext and implicit backends never send STLS, even when offered.
        let r = run(BackendTls::None, None, &[b"+OK\r\n", CAPA_STLS]);
        assert_eq!(r.sent, "CAPA\r\nQUIT\r\n");
        let r = run(BackendTls::Implicit, None, &[b"+OK\r\n", CAPA_STLS]);
        assert_eq!(r.sent, "CAPA\r\nQUIT\r\n");
    }

    #[test]
    fn injection_attempts_send_one_login_command() {
        for password in [
            &b"pw\r\nDELE 1"[..],
            b"pw\nDELE 1",
            b"pw\rDELE 1",
            b"\r\nQUIT\r\n",
        ] {
            // PLAIN carries anything but NUL, base64-encoded on one line.
            let r = run(
                BackendTls::None,
                creds("joe", password),
                &[b"+OK\r\n", CAPA_PLAIN],
            );
            let lines: Vec<&str> = r.sent.split_terminator("\r\n").collect();
            assert_eq!(lines.len(), 2, "{:?}", r.sent);
            assert_eq!(lines[0], "CAPA");
            let b64 = lines[1].strip_prefix("AUTH PLAIN ").unwrap();
            let decoded = sasl::decode_base64(b64.as_bytes()).unwrap();
            assert_eq!(&decoded[..5], b"\0joe\0");
            assert_eq!(&decoded[5..], password);
            // USER/PASS cannot: nothing is sent.
            let r = run(
                BackendTls::None,
                creds("joe", password),
                &[b"+OK\r\n", CAPA_USER],
            );
            assert_eq!(r.sent, "CAPA\r\n");
            assert!(matches!(r.done, Some(BackendResult::AuthFailed { .. })));
        }
        // NUL: neither mechanism can carry it.
        let r = run(
            BackendTls::None,
            creds("joe", b"a\0b"),
            &[b"+OK\r\n", CAPA_PLAIN],
        );
        assert_eq!(r.sent, "CAPA\r\n");
        assert!(matches!(r.done, Some(BackendResult::AuthFailed { .. })));
        // User names with spaces (or controls) cannot go in USER, but can in PLAIN.
        for user in ["jo e", "joe\tx", "joe\u{7f}"] {
            let r = run(
                BackendTls::None,
                creds(user, b"pw"),
                &[b"+OK\r\n", CAPA_USER],
            );
            assert_eq!(r.sent, "CAPA\r\n", "{user:?}");
            assert!(matches!(r.done, Some(BackendResult::AuthFailed { .. })));
        }
        let r = run(
            BackendTls::None,
            creds("jo e", b"pw"),
            &[b"+OK\r\n", CAPA_PLAIN, b"+OK\r\n"],
        );
        assert_eq!(
            r.sent,
            format!(
                "CAPA\r\nAUTH PLAIN {}\r\n",
                sasl::encode_base64(b"\0jo e\0pw")
            )
        );
        assert_eq!(r.done, logged_in());
        // Non-ASCII user names are fine with USER.
        let r = run(
            BackendTls::None,
            creds("jöe", b"pw"),
            &[b"+OK\r\n", CAPA_USER, b"+OK\r\n"],
        );
        assert_eq!(r.sent, "CAPA\r\nUSER jöe\r\nPASS pw\r\n");
    }

    #[test]
    fn plain_without_initial_response_when_too_long() {
        let password = vec![b'p'; 300];
        let b64 = sasl::encode_base64(&[&b"\0joe\0"[..], &password].concat());
        let r = run(
            BackendTls::None,
            creds("joe", &password),
            &[b"+OK\r\n", CAPA_PLAIN, b"+ \r\n", b"+OK\r\n"],
        );
        assert_eq!(r.sent, format!("CAPA\r\nAUTH PLAIN\r\n{b64}\r\n"));
        assert_eq!(r.done, logged_in());
        // A server that asks twice is broken.
        let r = run(
            BackendTls::None,
            creds("joe", &password),
            &[b"+OK\r\n", CAPA_PLAIN, b"+ \r\n", b"+ \r\n"],
        );
        assert_eq!(r.done, unavailable(Unavailable::Protocol));
    }

    #[test]
    fn plain_initial_response_ignored_by_server() {
        let r = run(
            BackendTls::None,
            creds("joe", b"pw"),
            &[b"+OK\r\n", CAPA_PLAIN, b"+\r\n", b"+OK\r\n"],
        );
        assert_eq!(
            r.sent,
            "CAPA\r\nAUTH PLAIN AGpvZQBwdw==\r\nAGpvZQBwdw==\r\n"
        );
        assert_eq!(r.done, logged_in());
    }

    #[test]
    fn same_result_whatever_the_split() {
        let server: &[u8] = b"+OK hi\r\n+OK\r\nUSER\r\n..X\r\n.\r\n+OK\r\n+OK in\r\n+OK 1 2\r\n";
        let whole = run(BackendTls::None, creds("joe", b"pw"), &[server]);
        assert_eq!(whole.sent, "CAPA\r\nUSER joe\r\nPASS pw\r\n");
        assert_eq!(whole.done, logged_in());
        assert_eq!(whole.buf, b"+OK 1 2\r\n");
        for cut in 1..server.len() {
            let r = run(
                BackendTls::None,
                creds("joe", b"pw"),
                &[&server[..cut], &server[cut..]],
            );
            assert_eq!(
                (&r.sent, &r.done, &r.buf),
                (&whole.sent, &whole.done, &whole.buf),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let mut m = BackendMachine::new(policy(BackendTls::None), creds("joe", b"hunter2"));
        m.receive(b"+OK\r\n");
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        m.receive(b"+OK\r\n");
        m.receive(b"SASL PLAIN\r\n");
        m.receive(b".\r\n");
        // The AUTH PLAIN line is queued: the machine's Debug must not show it.
        let dbg = format!("{m:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("aHVudGVyMg"),
            "{dbg}"
        );
        assert!(
            !dbg.contains(&sasl::encode_base64(b"\0joe\0hunter2")),
            "{dbg}"
        );
    }

    #[test]
    fn random_backend_input_never_panics() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let pieces: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR [SYS/TEMP] x\r\n",
            b"-ERR\r\n",
            b"+ \r\n",
            b".\r\n",
            b"..\r\n",
            b"STLS\r\n",
            b"SASL PLAIN\r\n",
            b"USER\r\n",
            b"\r\n",
            b"\n",
            b"\r",
            b"+",
            b"x",
        ];
        for round in 0..2000 {
            let tls = [BackendTls::None, BackendTls::StartTls, BackendTls::Implicit][round % 3];
            let c = if round % 2 == 0 {
                creds("joe", b"pw")
            } else {
                None
            };
            let mut d = BackendDriver::new(BackendMachine::new(policy(tls), c));
            for _ in 0..(x % 12) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let piece = pieces[(x % pieces.len() as u64) as usize];
                d.feed(piece);
            }
            assert!(d.left().len() <= 12 * 20);
        }
    }
}

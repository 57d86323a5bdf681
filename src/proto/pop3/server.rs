//! The client-facing POP3 machine: everything up to a successful login.

use std::collections::VecDeque;

use super::{code_is, resp_code, MAX_TEXT};
use crate::proto::line::{next_line, Line};
use crate::proto::sasl::{self, SaslError, Step};
use crate::proto::text::sanitize;
use crate::proto::{
    Action, Credentials, ListenerTls, LoginOutcome, Mechanism, PreAuth, ServerPolicy,
};

/// Room for `AUTH <mechanism> ` in front of an initial response (SASL mechanism names are
/// at most 20 characters).
const AUTH_PREFIX_MAX: usize = 32;

/// Speaks POP3 to a client in the AUTHORIZATION state (RFC 1939) until it has logged in.
///
/// Offers CAPA (RFC 2449, with RESP-CODES and AUTH-RESP-CODE), STLS (RFC 2595) on StartTls
/// listeners, USER/PASS and SASL PLAIN/LOGIN (RFC 5034, initial response allowed; `=` is
/// an empty response and is also accepted in a continuation, `*` cancels). No APOP: the
/// greeting carries no timestamp. Authentication is refused before TLS unless the policy
/// allows plaintext authentication, and then USER and SASL are not advertised either.
///
/// ```text
///            greeting
///               |
///               v
///    +------> Command <-------------------------------------------+
///    |          |  |  \__ CAPA, NOOP.., USER, errors: reply, stay  |
///    |          |  |                                              |
///    |     STLS |  | PASS / AUTH PLAIN ir            AUTH PLAIN   | `*`, bad data:
///    |          v  |                                 AUTH LOGIN   | -ERR
///    |     WaitTls |             +------------- Sasl(Plain|LoginUser|LoginPass)
///    |          |  v             v  (the last response)
///    +----------+ WaitLogin <----+
///  tls_established  |  \__ failed, unavailable, refused: -ERR, back to Command
///                   v
///             Authenticated (+OK Logged in.)       Closed: QUIT, limits, timeouts
/// ```
///
/// `receive` handles at most one line per call and never consumes past its end; while a
/// login or a TLS handshake is pending it consumes nothing, so bytes the client pipelined
/// after PASS/AUTH stay in the driver's buffer for the backend.
#[derive(Debug)]
pub struct ServerMachine {
    policy: ServerPolicy,
    tls_active: bool,
    state: State,
    /// The name given with USER, until PASS, AUTH, a failure or TLS.
    user: Option<String>,
    commands: u32,
    failures: u32,
    actions: VecDeque<Action>,
}

#[derive(Debug)]
enum State {
    /// Waiting for a command line.
    Command,
    /// A challenge of this SASL exchange was sent: waiting for the client's response.
    Sasl(sasl::Exchange),
    /// The backend refused a token with an error challenge, which the client was sent:
    /// waiting for its answer, then the failure (the backend's text) is said.
    Challenged(Option<String>),
    /// Action::Login emitted; nothing is read until `login_done`.
    WaitLogin,
    /// Action::StartTls emitted; nothing is read until `tls_established`.
    WaitTls,
    /// `+OK Logged in.` queued; the relay takes over.
    Authenticated,
    /// Close queued.
    Closed,
}

impl ServerMachine {
    /// A machine for one client connection; the greeting is queued at once.
    pub fn new(policy: ServerPolicy) -> Self {
        let tls_active = policy.tls == ListenerTls::Implicit;
        let host = sanitize(policy.hostname.as_bytes(), MAX_TEXT);
        let host = if host.is_empty() { "localhost" } else { &host };
        let greeting = format!("+OK {host} cutover POP3 ready.\r\n");
        let mut machine = ServerMachine {
            policy,
            tls_active,
            state: State::Command,
            user: None,
            commands: 0,
            failures: 0,
            actions: VecDeque::new(),
        };
        machine.send(greeting);
        machine
    }

    fn send(&mut self, reply: impl Into<Vec<u8>>) {
        self.actions.push_back(Action::Send(reply.into()));
    }

    fn close_with(&mut self, reply: &str) {
        self.send(reply);
        self.actions.push_back(Action::Close);
        self.state = State::Closed;
        self.user = None;
    }

    fn auth_allowed(&self) -> bool {
        self.tls_active || self.policy.allow_plaintext_auth
    }

    fn stls_offered(&self) -> bool {
        self.policy.tls == ListenerTls::StartTls && !self.tls_active
    }

    /// The longest line accepted now, terminator included. AUTH lines and SASL responses
    /// may carry a payload of up to `max_literal` bytes. Decided from the first five bytes
    /// only (a prefix that may still become `AUTH ` gets the larger bound), so the outcome
    /// does not depend on how the input was split.
    fn line_limit(&self, input: &[u8]) -> usize {
        let limits = &self.policy.limits;
        let mut sasl = limits.max_literal.saturating_add(2).max(limits.max_line);
        if self.policy.mechanisms.has_tokens() {
            sasl = sasl.max(limits.max_sasl_token.saturating_add(2));
        }
        match self.state {
            State::Command => {
                let head = &input[..input.len().min(5)];
                if head.eq_ignore_ascii_case(&b"AUTH "[..head.len()]) {
                    sasl.saturating_add(AUTH_PREFIX_MAX)
                } else {
                    limits.max_line
                }
            }
            _ => sasl,
        }
    }

    /// An authentication attempt failed: reply, forget USER, close after too many.
    fn fail(&mut self, reply: &str) {
        self.user = None;
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.policy.limits.max_auth_failures {
            self.close_with(reply);
        } else {
            self.send(reply);
            self.state = State::Command;
        }
    }

    fn login(&mut self, creds: Credentials) {
        self.user = None;
        self.state = State::WaitLogin;
        self.actions.push_back(Action::Login(creds));
    }

    fn refuse_auth(&mut self) {
        if self.policy.tls == ListenerTls::StartTls {
            self.send("-ERR Command not permitted before STLS\r\n");
        } else {
            self.send("-ERR Plaintext authentication is disabled\r\n");
        }
    }

    fn command(&mut self, line: &[u8]) {
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.policy.limits.max_commands {
            self.close_with("-ERR Too many commands\r\n");
            return;
        }
        let (keyword, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        if !(3..=4).contains(&keyword.len()) || !keyword.iter().all(u8::is_ascii_alphabetic) {
            self.send("-ERR Unknown command\r\n");
            return;
        }
        let keyword = keyword.to_ascii_uppercase();
        // Arguments of commands that take none may only be trailing spaces.
        let no_arg = arg.is_none_or(|a| a.iter().all(|&b| b == b' '));
        match keyword.as_slice() {
            b"CAPA" if no_arg => self.capa(),
            b"STLS" if no_arg => self.stls(),
            b"QUIT" if no_arg => self.close_with("+OK Bye\r\n"),
            b"CAPA" | b"STLS" | b"QUIT" => self.send("-ERR Syntax error\r\n"),
            b"USER" => self.user_cmd(arg),
            b"PASS" => self.pass_cmd(arg),
            b"AUTH" => self.auth_cmd(arg),
            b"APOP" => self.send("-ERR APOP not supported\r\n"),
            b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"NOOP" | b"RSET" | b"TOP" | b"UIDL"
            | b"LAST" => self.send("-ERR Command not valid in AUTHORIZATION state\r\n"),
            _ => self.send("-ERR Unknown command\r\n"),
        }
    }

    fn capa(&mut self) {
        let mut out = String::from("+OK Capability list follows\r\nCAPA\r\n");
        if self.auth_allowed() {
            out.push_str("USER\r\n");
            let names = self.policy.mechanisms.names();
            if !names.is_empty() {
                out.push_str(&format!("SASL {names}\r\n"));
            }
        }
        if self.stls_offered() {
            out.push_str("STLS\r\n");
        }
        out.push_str(
            "RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION cutover\r\n.\r\n",
        );
        self.send(out);
    }

    fn stls(&mut self) {
        if self.tls_active {
            self.send("-ERR Command not permitted when TLS active\r\n");
        } else if self.policy.tls != ListenerTls::StartTls {
            self.send("-ERR STLS not available\r\n");
        } else {
            self.send("+OK Begin TLS negotiation\r\n");
            self.actions.push_back(Action::StartTls);
            self.state = State::WaitTls;
        }
    }

    fn user_cmd(&mut self, arg: Option<&[u8]>) {
        if !self.auth_allowed() {
            return self.refuse_auth();
        }
        let name = arg.map_or(&b""[..], trim_spaces);
        match sasl::valid_user(name) {
            Some(user) => {
                self.user = Some(user);
                self.send("+OK\r\n");
            }
            None => {
                self.user = None;
                self.send("-ERR Invalid user name\r\n");
            }
        }
    }

    /// RFC 1939: PASS's argument is the rest of the line after one space; it may contain
    /// spaces and is taken verbatim. Other bytes are not judged here (a CR inside the line or
    /// a NUL is passed on): the backend machine refuses what its mechanism cannot carry.
    fn pass_cmd(&mut self, arg: Option<&[u8]>) {
        if !self.auth_allowed() {
            return self.refuse_auth();
        }
        let Some(user) = self.user.take() else {
            return self.send("-ERR USER first\r\n");
        };
        let Some(password) = arg else {
            self.user = Some(user);
            return self.send("-ERR Syntax error\r\n");
        };
        self.login(Credentials::password(
            user,
            password.to_vec(),
            Mechanism::Login,
        ));
    }

    fn auth_cmd(&mut self, arg: Option<&[u8]>) {
        if !self.auth_allowed() {
            return self.refuse_auth();
        }
        self.user = None;
        let mut parts = arg
            .unwrap_or_default()
            .split(|&b| b == b' ')
            .filter(|p| !p.is_empty());
        let (mechanism, initial, extra) = (parts.next(), parts.next(), parts.next());
        let Some(mechanism) = mechanism else {
            let mut list = String::from("+OK\r\n");
            for m in self.policy.mechanisms.iter() {
                list.push_str(m.sasl_name());
                list.push_str("\r\n");
            }
            list.push_str(".\r\n");
            return self.send(list.as_str());
        };
        if extra.is_some() {
            return self.send("-ERR Syntax error\r\n");
        }
        let limits = &self.policy.limits;
        let offered = self.policy.mechanisms;
        let exchange = sasl::Exchange::offered(
            mechanism,
            offered,
            limits.max_literal,
            limits.max_sasl_token,
        );
        let Some(mut exchange) = exchange else {
            return self.send("-ERR Unsupported authentication mechanism\r\n");
        };
        let step = exchange.begin(initial);
        self.sasl_step(exchange, step);
    }

    /// Says what the shared SASL exchange asks for, in POP3's words (RFC 5034).
    fn sasl_step(&mut self, exchange: sasl::Exchange, step: Step) {
        self.state = State::Command;
        match step {
            Step::Challenge(challenge) => {
                self.send(format!("+ {challenge}\r\n"));
                self.state = State::Sasl(exchange);
            }
            Step::Done(creds) => self.login(creds),
            Step::Cancelled => self.send("-ERR Authentication cancelled\r\n"),
            Step::TooBig => self.send("-ERR Authentication data too large\r\n"),
            Step::Failed(SaslError::Base64) => self.fail("-ERR Invalid base64 data\r\n"),
            Step::Failed(SaslError::ForeignAuthzid) => {
                self.fail("-ERR [AUTH] Authorization identity must match the user name\r\n")
            }
            Step::Failed(SaslError::Malformed) => self.fail("-ERR Malformed PLAIN response\r\n"),
            Step::Failed(SaslError::InvalidUser) => self.fail("-ERR Invalid user name\r\n"),
            Step::Failed(SaslError::MalformedToken) => {
                self.fail("-ERR [AUTH] Malformed OAuth response\r\n")
            }
        }
    }
}

fn trim_spaces(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' '] = s {
        s = rest;
    }
    s
}

/// The client's reply to a backend rejection: the backend's text with its response code,
/// or `[AUTH]` in front when it had none.
fn rejection(response: Option<&str>) -> String {
    let text = sanitize(response.unwrap_or_default().as_bytes(), MAX_TEXT);
    if text.is_empty() {
        "-ERR [AUTH] Authentication failed.\r\n".to_owned()
    } else if resp_code(&text).is_some() {
        format!("-ERR {text}\r\n")
    } else {
        format!("-ERR [AUTH] {text}\r\n")
    }
}

impl PreAuth for ServerMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        if !matches!(
            self.state,
            State::Command | State::Sasl(_) | State::Challenged(_)
        ) {
            return 0;
        }
        let limit = self.line_limit(input);
        match next_line(input, limit) {
            Line::Incomplete => 0,
            Line::TooLong => {
                self.close_with("-ERR Line too long\r\n");
                // Exactly the bytes examined, all inside the overlong line: the same count
                // however the input was split. Nothing is read after Close anyway.
                limit
            }
            Line::Complete { content, len } => {
                match std::mem::replace(&mut self.state, State::Command) {
                    State::Sasl(mut exchange) => {
                        let step = exchange.respond(content);
                        self.sasl_step(exchange, step);
                    }
                    // Whatever the client answered, the backend has said no.
                    State::Challenged(response) => self.fail(&rejection(response.as_deref())),
                    _ => self.command(content),
                }
                len
            }
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn tls_established(&mut self) {
        if matches!(self.state, State::WaitTls) {
            self.tls_active = true;
            self.user = None;
            self.state = State::Command;
        }
    }

    fn login_done(&mut self, outcome: LoginOutcome) {
        if !matches!(self.state, State::WaitLogin) {
            return;
        }
        match outcome {
            LoginOutcome::Ok { .. } => {
                self.send("+OK Logged in.\r\n");
                self.state = State::Authenticated;
            }
            LoginOutcome::AuthFailed { response } => self.fail(&rejection(response.as_deref())),
            LoginOutcome::Challenged {
                challenge,
                response,
            } => {
                let challenge = sanitize(challenge.as_bytes(), self.policy.limits.max_sasl_token);
                self.send(format!("+ {challenge}\r\n").as_str());
                self.state = State::Challenged(response);
            }
            LoginOutcome::Refused { reason } => {
                let reason = sanitize(reason.as_bytes(), MAX_TEXT);
                let reply = match resp_code(&reason) {
                    Some(code) if code_is(code, "AUTH") => format!("-ERR {reason}\r\n"),
                    _ => format!("-ERR [AUTH] {reason}\r\n"),
                };
                self.fail(&reply);
            }
            LoginOutcome::Unavailable => {
                self.send("-ERR [SYS/TEMP] Server unavailable, try again later\r\n");
                self.state = State::Command;
            }
        }
    }

    fn timed_out(&mut self) {
        if !matches!(self.state, State::Closed | State::Authenticated) {
            self.close_with("-ERR Disconnected for inactivity.\r\n");
        }
    }

    fn shutting_down(&mut self) {
        if !matches!(self.state, State::Closed | State::Authenticated) {
            self.close_with("-ERR [SYS/TEMP] Server shutting down\r\n");
        }
    }

    fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::super::checked;
    use super::*;
    use crate::proto::drive::ServerDriver;
    use crate::proto::Limits;

    const GREETING: &str = "+OK mail.example cutover POP3 ready.\r\n";
    const CAPA_TLS: &str = "+OK Capability list follows\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\n\
        RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION cutover\r\n.\r\n";
    const CAPA_PRE_STLS: &str = "+OK Capability list follows\r\nCAPA\r\nSTLS\r\n\
        RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION cutover\r\n.\r\n";
    /// base64("\0joe\0s3cret")
    const PLAIN_JOE: &str = "AGpvZQBzM2NyZXQ=";

    fn policy(tls: ListenerTls, allow_plaintext_auth: bool) -> ServerPolicy {
        ServerPolicy {
            tls,
            allow_plaintext_auth,
            limits: Limits::default(),
            hostname: "mail.example".into(),
            mechanisms: Default::default(),
        }
    }

    fn implicit() -> ServerPolicy {
        policy(ListenerTls::Implicit, false)
    }

    fn starttls() -> ServerPolicy {
        policy(ListenerTls::StartTls, false)
    }

    /// Runs `chunks` with scripted login outcomes (then AuthFailed once they run out).
    fn run(p: ServerPolicy, chunks: &[&[u8]], outcomes: &[LoginOutcome]) -> (String, Vec<u8>) {
        let failed = LoginOutcome::AuthFailed { response: None };
        let mut d = checked(ServerDriver::scripted(
            ServerMachine::new(p),
            outcomes,
            failed,
        ));
        d.feed_all(chunks);
        let t = d.finish();
        (t.text(), t.left)
    }

    fn ok() -> LoginOutcome {
        LoginOutcome::Ok { capabilities: None }
    }

    fn drain(m: &mut ServerMachine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// Feeds `input` cut at every byte position, and byte by byte, and checks that the
    /// transcript and the leftover never change.
    fn assert_split_invariant(p: &ServerPolicy, input: &[u8], outcomes: &[LoginOutcome]) {
        let whole = run(p.clone(), &[input], outcomes);
        for cut in 1..input.len() {
            let split = run(p.clone(), &[&input[..cut], &input[cut..]], outcomes);
            assert_eq!(split, whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(p.clone(), &bytes, outcomes), whole, "byte by byte");
    }

    #[test]
    fn greeting_and_capa_with_implicit_tls() {
        let (t, rest) = run(implicit(), &[b"CAPA\r\n"], &[]);
        assert_eq!(t, format!("{GREETING}{CAPA_TLS}"));
        assert!(rest.is_empty());
        let m = ServerMachine::new(implicit());
        assert!(!m.is_authenticated());
    }

    #[test]
    fn greeting_hostname_is_sanitized() {
        let mut p = implicit();
        p.hostname = "evil\r\n-ERR x".into();
        let mut m = ServerMachine::new(p);
        assert_eq!(
            drain(&mut m),
            vec![Action::Send(
                b"+OK evil -ERR x cutover POP3 ready.\r\n".to_vec()
            )]
        );
    }

    #[test]
    fn capa_before_and_after_stls() {
        let (t, rest) = run(starttls(), &[b"capa\r\nSTLS\r\n", b"CAPA\r\nSTLS\r\n"], &[]);
        assert_eq!(
            t,
            format!(
                "{GREETING}{CAPA_PRE_STLS}+OK Begin TLS negotiation\r\n<starttls>\
                 {CAPA_TLS}-ERR Command not permitted when TLS active\r\n"
            )
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn capa_plaintext_listener() {
        // No STLS on a plaintext listener; USER and SASL only when plaintext auth is allowed.
        let no_auth = "+OK Capability list follows\r\nCAPA\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
                       PIPELINING\r\nIMPLEMENTATION cutover\r\n.\r\n";
        let (t, _) = run(policy(ListenerTls::None, false), &[b"CAPA\r\n"], &[]);
        assert_eq!(t, format!("{GREETING}{no_auth}"));
        let (t, _) = run(policy(ListenerTls::None, true), &[b"CAPA\r\nSTLS\r\n"], &[]);
        assert_eq!(
            t,
            format!("{GREETING}{CAPA_TLS}-ERR STLS not available\r\n")
        );
        // StartTls listener that allows plaintext auth: everything before TLS.
        let (t, _) = run(policy(ListenerTls::StartTls, true), &[b"CAPA\r\n"], &[]);
        assert_eq!(
            t,
            format!(
                "{GREETING}+OK Capability list follows\r\nCAPA\r\nUSER\r\nSASL PLAIN LOGIN\r\n\
                 STLS\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION cutover\r\n.\r\n"
            )
        );
        let (t, _) = run(implicit(), &[b"STLS\r\n"], &[]);
        assert_eq!(
            t,
            format!("{GREETING}-ERR Command not permitted when TLS active\r\n")
        );
    }

    #[test]
    fn stls_consumes_only_its_line() {
        let mut m = ServerMachine::new(starttls());
        drain(&mut m);
        let input = b"STLS\r\nCAPA\r\n";
        assert_eq!(m.receive(input), 6);
        assert_eq!(
            drain(&mut m),
            vec![
                Action::Send(b"+OK Begin TLS negotiation\r\n".to_vec()),
                Action::StartTls
            ]
        );
        // Nothing more until the handshake is done.
        assert_eq!(m.receive(&input[6..]), 0);
        assert!(drain(&mut m).is_empty());
        m.tls_established();
        // The driver discards the plaintext leftover; the harness shows it.
        let (t, rest) = run(starttls(), &[input], &[]);
        assert_eq!(
            t,
            format!("{GREETING}+OK Begin TLS negotiation\r\n<starttls><discard 6>")
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn stls_forgets_user() {
        let p = policy(ListenerTls::StartTls, true);
        let (t, _) = run(p, &[b"USER joe\r\nSTLS\r\n", b"PASS pw\r\n"], &[]);
        assert_eq!(
            t,
            format!("{GREETING}+OK\r\n+OK Begin TLS negotiation\r\n<starttls>-ERR USER first\r\n")
        );
    }

    #[test]
    fn user_pass_with_spaces_in_password() {
        let (t, rest) = run(
            implicit(),
            &[b"USER joe\r\nPASS  correct horse battery \r\n"],
            &[ok()],
        );
        // One space separates PASS from its argument; the rest is the password, verbatim.
        assert_eq!(
            t,
            format!("{GREETING}+OK\r\n<login joe  correct horse battery  login>+OK Logged in.\r\n")
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn user_pass_transcript_machine_level() {
        let mut m = ServerMachine::new(implicit());
        drain(&mut m);
        assert_eq!(m.receive(b"user joe\r\n"), 10);
        assert_eq!(drain(&mut m), vec![Action::Send(b"+OK\r\n".to_vec())]);
        let input = b"PASS s3cret\r\nSTAT\r\nRETR 1\r\n";
        assert_eq!(m.receive(input), 13);
        let actions = drain(&mut m);
        let [Action::Login(creds)] = actions.as_slice() else {
            panic!("expected a Login, got {actions:?}");
        };
        assert_eq!(creds.user, "joe");
        assert_eq!(creds.secret().unwrap().expose(), b"s3cret");
        assert_eq!(creds.mechanism(), "login");
        // Pipelined commands stay for the backend.
        assert_eq!(m.receive(&input[13..]), 0);
        assert!(!m.is_authenticated());
        m.login_done(ok());
        assert_eq!(
            drain(&mut m),
            vec![Action::Send(b"+OK Logged in.\r\n".to_vec())]
        );
        assert!(m.is_authenticated());
        assert_eq!(m.receive(&input[13..]), 0);
    }

    #[test]
    fn pipelining_after_pass_left_unconsumed() {
        let (t, rest) = run(
            implicit(),
            &[b"USER joe\r\nPASS pw\r\nSTAT\r\nLIST\r\n"],
            &[ok()],
        );
        assert_eq!(
            t,
            format!("{GREETING}+OK\r\n<login joe pw login>+OK Logged in.\r\n")
        );
        assert_eq!(rest, b"STAT\r\nLIST\r\n");
        let auth = format!("AUTH PLAIN {PLAIN_JOE}\r\nSTAT\r\n");
        let (t, rest) = run(implicit(), &[auth.as_bytes()], &[ok()]);
        assert_eq!(
            t,
            format!("{GREETING}<login joe s3cret plain>+OK Logged in.\r\n")
        );
        assert_eq!(rest, b"STAT\r\n");
    }

    #[test]
    fn pass_errors() {
        let (t, _) = run(
            implicit(),
            &[b"PASS pw\r\nUSER joe\r\nPASS\r\nUSER\r\nUSER  \r\n"],
            &[],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}-ERR USER first\r\n+OK\r\n-ERR Syntax error\r\n\
                 -ERR Invalid user name\r\n-ERR Invalid user name\r\n"
            )
        );
        // USER with non-UTF-8 bytes is refused; surrounding spaces are trimmed.
        let (t, _) = run(
            implicit(),
            &[b"USER j\xffe\r\nUSER  joe \r\nPASS x\r\n"],
            &[ok()],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}-ERR Invalid user name\r\n+OK\r\n<login joe x login>+OK Logged in.\r\n"
            )
        );
        // An empty password after one space is a password.
        let (t, _) = run(implicit(), &[b"USER joe\r\nPASS \r\n"], &[ok()]);
        assert_eq!(
            t,
            format!("{GREETING}+OK\r\n<login joe  login>+OK Logged in.\r\n")
        );
    }

    #[test]
    fn auth_plain_initial_response() {
        let input = format!("AUTH PLAIN {PLAIN_JOE}\r\n");
        let (t, _) = run(implicit(), &[input.as_bytes()], &[ok()]);
        assert_eq!(
            t,
            format!("{GREETING}<login joe s3cret plain>+OK Logged in.\r\n")
        );
    }

    #[test]
    fn auth_plain_continuation() {
        let input = format!("auth plain\r\n{PLAIN_JOE}\r\n");
        let (t, _) = run(implicit(), &[input.as_bytes()], &[ok()]);
        assert_eq!(
            t,
            format!("{GREETING}+ \r\n<login joe s3cret plain>+OK Logged in.\r\n")
        );
        let mut m = ServerMachine::new(implicit());
        drain(&mut m);
        m.receive(b"AUTH PLAIN\r\n");
        m.receive(format!("{PLAIN_JOE}\r\n").as_bytes());
    }

    #[test]
    fn auth_plain_empty_and_cancel() {
        // `=` is an empty response: an empty PLAIN message is malformed.
        let (t, _) = run(implicit(), &[b"AUTH PLAIN =\r\nAUTH PLAIN\r\n=\r\n"], &[]);
        assert_eq!(
            t,
            format!(
                "{GREETING}-ERR Malformed PLAIN response\r\n+ \r\n-ERR Malformed PLAIN response\r\n"
            )
        );
        let (t, _) = run(
            implicit(),
            &[b"AUTH PLAIN\r\n*\r\nAUTH PLAIN *\r\nCAPA\r\n"],
            &[],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}+ \r\n-ERR Authentication cancelled\r\n\
                 -ERR Invalid base64 data\r\n{CAPA_TLS}"
            )
        );
    }

    #[test]
    fn auth_plain_bad_data() {
        let (t, _) = run(implicit(), &[b"AUTH PLAIN !!!!\r\n"], &[]);
        assert_eq!(t, format!("{GREETING}-ERR Invalid base64 data\r\n"));
        // base64("admin\0joe\0pw"): an authorization identity for someone else.
        let foreign = sasl::encode_base64(b"admin\0joe\0pw");
        let (t, _) = run(
            implicit(),
            &[format!("AUTH PLAIN {foreign}\r\n").as_bytes()],
            &[],
        );
        assert_eq!(
            t,
            format!("{GREETING}-ERR [AUTH] Authorization identity must match the user name\r\n")
        );
        // The same identity twice is fine.
        let same = sasl::encode_base64(b"joe\0joe\0pw");
        let (t, _) = run(
            implicit(),
            &[format!("AUTH PLAIN {same}\r\n").as_bytes()],
            &[ok()],
        );
        assert_eq!(
            t,
            format!("{GREETING}<login joe pw plain>+OK Logged in.\r\n")
        );
    }

    #[test]
    fn auth_login() {
        let (t, _) = run(
            implicit(),
            &[b"AUTH LOGIN\r\nam9l\r\nczNjcmV0\r\n"],
            &[ok()],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n<login joe s3cret login>+OK Logged in.\r\n"
            )
        );
        // With the user name as initial response; cancelled at the password.
        let (t, _) = run(implicit(), &[b"AUTH LOGIN am9l\r\n*\r\n"], &[]);
        assert_eq!(
            t,
            format!("{GREETING}+ UGFzc3dvcmQ6\r\n-ERR Authentication cancelled\r\n")
        );
        let (t, _) = run(implicit(), &[b"AUTH LOGIN\r\n*\r\n"], &[]);
        assert_eq!(
            t,
            format!("{GREETING}+ VXNlcm5hbWU6\r\n-ERR Authentication cancelled\r\n")
        );
        // An empty password (`=`) is passed on; a bad user name is a failure.
        let (t, _) = run(
            implicit(),
            &[b"AUTH LOGIN am9l\r\n=\r\nAUTH LOGIN AA==\r\n"],
            &[],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}+ UGFzc3dvcmQ6\r\n<login joe  login>-ERR [AUTH] Authentication failed.\r\n\
                 -ERR Invalid user name\r\n"
            )
        );
        let mut m = ServerMachine::new(implicit());
        drain(&mut m);
        m.receive(b"AUTH LOGIN\r\n");
        m.receive(b"am9l\r\n");
    }

    #[test]
    fn auth_listing_and_errors() {
        let (t, _) = run(
            implicit(),
            &[b"AUTH\r\nAUTH CRAM-MD5\r\nAUTH PLAIN a b\r\nAPOP joe abc\r\n"],
            &[],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n\
                 -ERR Unsupported authentication mechanism\r\n-ERR Syntax error\r\n\
                 -ERR APOP not supported\r\n"
            )
        );
    }

    #[test]
    fn refusal_before_tls() {
        let input =
            format!("USER joe\r\nPASS pw\r\nAUTH\r\nAUTH PLAIN {PLAIN_JOE}\r\nAUTH LOGIN\r\n");
        let (t, _) = run(starttls(), &[input.as_bytes()], &[ok()]);
        let refuse = "-ERR Command not permitted before STLS\r\n";
        assert_eq!(t, format!("{GREETING}{}", refuse.repeat(5)));
        let (t, _) = run(policy(ListenerTls::None, false), &[b"USER joe\r\n"], &[]);
        assert_eq!(
            t,
            format!("{GREETING}-ERR Plaintext authentication is disabled\r\n")
        );
        // After STLS the same commands work.
        let (t, _) = run(
            starttls(),
            &[b"STLS\r\n", b"USER joe\r\nPASS pw\r\n"],
            &[ok()],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}+OK Begin TLS negotiation\r\n<starttls>+OK\r\n<login joe pw login>\
                 +OK Logged in.\r\n"
            )
        );
    }

    #[test]
    fn other_commands_before_login() {
        let (t, _) = run(
            implicit(),
            &[b"NOOP\r\nstat\r\nLIST 1\r\nRETR 1\r\nTOP 1 2\r\nXYZZY\r\nAB\r\n\r\nU1ER\r\nCAPA x\r\n"],
            &[],
        );
        let state = "-ERR Command not valid in AUTHORIZATION state\r\n";
        let unknown = "-ERR Unknown command\r\n";
        assert_eq!(
            t,
            format!(
                "{GREETING}{}{}-ERR Syntax error\r\n",
                state.repeat(5),
                unknown.repeat(4)
            )
        );
    }

    #[test]
    fn quit_closes() {
        let (t, rest) = run(implicit(), &[b"QUIT\r\nCAPA\r\n"], &[]);
        assert_eq!(t, format!("{GREETING}+OK Bye\r\n<close>"));
        assert_eq!(rest, b"CAPA\r\n");
    }

    #[test]
    fn overlong_line() {
        let mut p = implicit();
        p.limits.max_line = 16;
        p.limits.max_literal = 32;
        // 14 characters + CRLF = 16: accepted.
        let (t, _) = run(p.clone(), &[b"USER abcdefghi\r\n"], &[]);
        assert_eq!(t, format!("{GREETING}+OK\r\n"));
        let long = b"USER abcdefghij\r\nCAPA\r\n";
        let (t, _) = run(p.clone(), &[long], &[]);
        assert_eq!(t, format!("{GREETING}-ERR Line too long\r\n<close>"));
        assert_split_invariant(&p, long, &[]);
        // No line end at all.
        let (t, _) = run(p.clone(), &[&[b'x'; 100]], &[]);
        assert_eq!(t, format!("{GREETING}-ERR Line too long\r\n<close>"));
        // SASL lines may be longer than command lines, up to max_literal (+ CRLF).
        let b64 = sasl::encode_base64(b"\0joe\0a-longer-password");
        assert!(b64.len() > 16 && b64.len() <= 32);
        let input = format!("AUTH PLAIN\r\n{b64}\r\n");
        let (t, _) = run(p.clone(), &[input.as_bytes()], &[ok()]);
        assert_eq!(
            t,
            format!("{GREETING}+ \r\n<login joe a-longer-password plain>+OK Logged in.\r\n")
        );
        let input = format!("AUTH PLAIN {b64}\r\n");
        let (t, _) = run(p.clone(), &[input.as_bytes()], &[ok()]);
        assert_eq!(
            t,
            format!("{GREETING}<login joe a-longer-password plain>+OK Logged in.\r\n")
        );
        let too_long = format!("AUTH PLAIN\r\n{}\r\n", "A".repeat(40));
        let (t, _) = run(p.clone(), &[too_long.as_bytes()], &[]);
        assert_eq!(t, format!("{GREETING}+ \r\n-ERR Line too long\r\n<close>"));
        assert_split_invariant(&p, too_long.as_bytes(), &[]);
    }

    #[test]
    fn max_auth_failures_closes() {
        let input = b"USER a\r\nPASS b\r\nAUTH PLAIN !!\r\nAUTH LOGIN\r\nam9l\r\nYQ==\r\nCAPA\r\n";
        let (t, rest) = run(implicit(), &[input], &[]);
        assert_eq!(
            t,
            format!(
                "{GREETING}+OK\r\n<login a b login>-ERR [AUTH] Authentication failed.\r\n\
                 -ERR Invalid base64 data\r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n\
                 <login joe a login>-ERR [AUTH] Authentication failed.\r\n<close>"
            )
        );
        assert_eq!(rest, b"CAPA\r\n");
        assert_split_invariant(&implicit(), input, &[]);
    }

    #[test]
    fn max_commands_closes() {
        let mut p = implicit();
        p.limits.max_commands = 3;
        let (t, _) = run(p, &[b"NOOP\r\nCAPA\r\nNOOP\r\nNOOP\r\n"], &[]);
        let state = "-ERR Command not valid in AUTHORIZATION state\r\n";
        assert_eq!(
            t,
            format!("{GREETING}{state}{CAPA_TLS}{state}-ERR Too many commands\r\n<close>")
        );
    }

    #[test]
    fn login_outcomes() {
        let input = b"USER joe\r\nPASS a\r\nUSER joe\r\nPASS b\r\nPASS c\r\nUSER joe\r\nPASS d\r\n";
        let outcomes = [
            LoginOutcome::AuthFailed {
                response: Some("[IN-USE] Mailbox\r\nlocked".into()),
            },
            LoginOutcome::Unavailable,
            LoginOutcome::Ok {
                capabilities: Some("ignored".into()),
            },
        ];
        let (t, _) = run(implicit(), &[input], &outcomes);
        assert_eq!(
            t,
            format!(
                "{GREETING}+OK\r\n<login joe a login>-ERR [IN-USE] Mailbox locked\r\n\
                 +OK\r\n<login joe b login>-ERR [SYS/TEMP] Server unavailable, try again later\r\n\
                 -ERR USER first\r\n+OK\r\n<login joe d login>+OK Logged in.\r\n"
            )
        );
    }

    #[test]
    fn rejection_texts() {
        assert_eq!(rejection(None), "-ERR [AUTH] Authentication failed.\r\n");
        assert_eq!(
            rejection(Some("  ")),
            "-ERR [AUTH] Authentication failed.\r\n"
        );
        assert_eq!(
            rejection(Some("Bad password")),
            "-ERR [AUTH] Bad password\r\n"
        );
        assert_eq!(
            rejection(Some("[AUTH] Bad password")),
            "-ERR [AUTH] Bad password\r\n"
        );
        assert_eq!(
            rejection(Some("[LOGIN-DELAY] Wait")),
            "-ERR [LOGIN-DELAY] Wait\r\n"
        );
        assert_eq!(
            rejection(Some("[bad code x")),
            "-ERR [AUTH] [bad code x\r\n"
        );
        assert_eq!(
            rejection(Some("x\r\n+OK injected")),
            "-ERR [AUTH] x +OK injected\r\n"
        );
        let long = "y".repeat(5000);
        assert!(rejection(Some(&long)).len() < 300);

        let (t, _) = run(
            implicit(),
            &[b"USER joe\r\nPASS a\r\n"],
            &[LoginOutcome::Refused {
                reason: "Invalid user name",
            }],
        );
        assert_eq!(
            t,
            format!("{GREETING}+OK\r\n<login joe a login>-ERR [AUTH] Invalid user name\r\n")
        );
    }

    #[test]
    fn retry_after_failure_needs_user_again() {
        let (t, _) = run(
            implicit(),
            &[b"USER joe\r\nPASS a\r\nPASS b\r\nUSER joe\r\nPASS b\r\n"],
            &[
                LoginOutcome::AuthFailed {
                    response: Some("Wrong".into()),
                },
                ok(),
            ],
        );
        assert_eq!(
            t,
            format!(
                "{GREETING}+OK\r\n<login joe a login>-ERR [AUTH] Wrong\r\n-ERR USER first\r\n\
                 +OK\r\n<login joe b login>+OK Logged in.\r\n"
            )
        );
    }

    #[test]
    fn timeouts_and_shutdown() {
        let mut m = ServerMachine::new(starttls());
        drain(&mut m);
        m.timed_out();
        assert_eq!(
            drain(&mut m),
            vec![
                Action::Send(b"-ERR Disconnected for inactivity.\r\n".to_vec()),
                Action::Close
            ]
        );
        m.shutting_down();
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.receive(b"CAPA\r\n"), 0);

        let mut m = ServerMachine::new(starttls());
        drain(&mut m);
        m.shutting_down();
        assert_eq!(
            drain(&mut m),
            vec![
                Action::Send(b"-ERR [SYS/TEMP] Server shutting down\r\n".to_vec()),
                Action::Close
            ]
        );
        // Nothing after authentication: the relay owns the connection.
        let mut m = ServerMachine::new(implicit());
        m.receive(b"USER a\r\n");
        m.receive(b"PASS b\r\n");
        m.login_done(ok());
        drain(&mut m);
        m.timed_out();
        m.shutting_down();
        assert!(drain(&mut m).is_empty());
        assert!(m.is_authenticated());
    }

    #[test]
    fn stray_events_are_ignored() {
        let mut m = ServerMachine::new(implicit());
        drain(&mut m);
        m.login_done(ok());
        m.tls_established();
        assert!(drain(&mut m).is_empty());
        assert!(!m.is_authenticated());
    }

    #[test]
    fn no_secret_in_debug() {
        let mut m = ServerMachine::new(implicit());
        m.receive(b"USER joe\r\n");
        m.receive(b"PASS hunter2 xyz\r\n");
        let dbg = format!("{m:?}");
        assert!(dbg.contains("joe"));
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let actions = drain(&mut m);
        let dbg = format!("{actions:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");

        let mut m = ServerMachine::new(implicit());
        m.receive(b"AUTH LOGIN\r\n");
        m.receive(b"am9l\r\n");
        m.receive(b"aHVudGVyMg==\r\n");
        let dbg = format!("{m:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("aHVudGVyMg"),
            "{dbg}"
        );
    }

    #[test]
    fn transcripts_do_not_depend_on_splits() {
        let p = implicit();
        let plain = format!(
            "CAPA\r\nAUTH PLAIN\r\n{PLAIN_JOE}\r\nAUTH LOGIN\r\nam9l\r\n*\r\nUSER joe\r\n\
             PASS s p\r\nAUTH PLAIN {PLAIN_JOE}\r\nSTAT\r\n"
        );
        let outcomes = [
            LoginOutcome::AuthFailed { response: None },
            LoginOutcome::Unavailable,
            ok(),
        ];
        assert_split_invariant(&p, plain.as_bytes(), &outcomes);
        let (t, rest) = run(p, &[plain.as_bytes()], &outcomes);
        assert_eq!(
            t,
            format!(
                "{GREETING}{CAPA_TLS}+ \r\n<login joe s3cret plain>-ERR [AUTH] Authentication failed.\r\n\
                 + VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR Authentication cancelled\r\n+OK\r\n\
                 <login joe s p login>\
                 -ERR [SYS/TEMP] Server unavailable, try again later\r\n<login joe s3cret plain>\
                 +OK Logged in.\r\n"
            )
        );
        assert_eq!(rest, b"STAT\r\n");
        // Lone LF line ends and pipelined errors, plaintext allowed.
        let p = policy(ListenerTls::None, true);
        assert_split_invariant(&p, b"NOOP\nUSER x\r\nPASS\r\nQUIT\r\nNOOP\r\n", &[]);
    }

    #[test]
    fn split_invariant_across_stls() {
        // The client waits for +OK before the handshake: cut the plaintext part anywhere.
        let pre = b"CAPA\r\nSTLS\r\n";
        let post = b"CAPA\r\nUSER joe\r\nPASS pw\r\nLIST\r\n";
        let whole = run(starttls(), &[pre, post], &[ok()]);
        assert_eq!(
            whole.0,
            format!(
                "{GREETING}{CAPA_PRE_STLS}+OK Begin TLS negotiation\r\n<starttls>{CAPA_TLS}+OK\r\n\
                 <login joe pw login>+OK Logged in.\r\n"
            )
        );
        assert_eq!(whole.1, b"LIST\r\n");
        for cut in 1..pre.len() {
            let got = run(starttls(), &[&pre[..cut], &pre[cut..], post], &[ok()]);
            assert_eq!(got, whole, "pre cut {cut}");
        }
        for cut in 1..post.len() {
            let got = run(starttls(), &[pre, &post[..cut], &post[cut..]], &[ok()]);
            assert_eq!(got, whole, "post cut {cut}");
        }
    }
}

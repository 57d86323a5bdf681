//! The client-facing SMTP submission machine, up to a successful `AUTH`.

use std::collections::VecDeque;

use super::{enhanced_code, filter_extensions};
use crate::proto::line::{is_strict_crlf, next_line, Line};
use crate::proto::sasl::{self, SaslError, Step};
use crate::proto::text::sanitize;
use crate::proto::{Action, Credentials, Limits, ListenerTls, LoginOutcome, PreAuth, ServerPolicy};

/// Longest EHLO/HELO argument accepted (a domain has at most 255 octets, RFC 5321).
const MAX_CLIENT_NAME: usize = 255;
/// Longest backend or refusal text put into a `535` reply.
const MAX_REPLY_TEXT: usize = 200;

const AUTH_REQUIRED: &str = "530 5.7.0 Authentication required";
const BAD_BASE64: &str = "501 5.5.2 Invalid base64 data";
const MALFORMED_SASL: &str = "501 5.5.2 Malformed authentication data";
const NO_PARAMS: &str = "501 5.5.4 Syntax error (no parameters allowed)";
const LINE_TOO_LONG_SASL: &str = "500 5.5.6 Authentication Exchange line is too long";
const BARE_CR_LF: &str = "500 5.5.2 Bare CR or LF not allowed";
const OK: &str = "250 2.0.0 OK";

/// Which greeting the client gave last (forgotten after STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hello {
    None,
    Helo,
    Ehlo,
}

#[derive(Debug)]
enum State {
    /// Waiting for a command line.
    Command,
    /// A `334` challenge of this SASL exchange was sent: waiting for the response.
    Sasl(sasl::Exchange),
    /// The backend refused a token with an error challenge, which the client was sent
    /// (`334`): waiting for its answer, then the failure (`535`) is said.
    Challenged(Option<String>),
    /// An overlong line was answered; dropping its bytes through the next LF.
    SkipLine,
    /// Dropping the chunk of a `BDAT` sent before authentication; `530` follows.
    DiscardChunk { remaining: u64 },
    /// [`Action::Login`] is out; nothing is consumed until `login_done`.
    AwaitLogin,
    /// Bridge: [`Action::Login`] for the pre-authorized user is out, the client's `MAIL`
    /// line is still unconsumed (it goes to the backend); nothing is consumed until
    /// `login_done`.
    AwaitBridgeLogin,
    /// [`Action::StartTls`] is out; nothing is consumed until `tls_established`.
    AwaitTls,
    /// `235` queued; the driver relays from here.
    Authenticated,
    /// Close queued.
    Closed,
}

/// The client-facing SMTP submission machine, up to a successful `AUTH`. Implements
/// [`PreAuth`].
///
/// ```text
///            greeting 220
///                 |
///                 v
///   +--------> Command <------------------------------------+
///   |   EHLO/HELO/NOOP/RSET/HELP/VRFY/unknown: reply, stay   |
///   |             |                                          |
///   |   STARTTLS  |  AUTH PLAIN|LOGIN          overlong line  |
///   |     220     |     334                 500, SkipLine ---+ (through the next LF)
///   |      v      v                         BDAT n before AUTH:
///   |  AwaitTls  Sasl (334 challenges)       DiscardChunk -----+ (n bytes, then 530)
///   |      |                                 QUIT, 421: Closed
///   |  tls_established  | complete          (421 after max_commands
///   |  (EHLO forgotten) v                    or max_auth_failures)
///   +------+       AwaitLogin --login_done(Ok)--> Authenticated (235; driver relays)
///   ^                   |
///   +---- 535/454 ------+
/// ```
///
/// # Decisions (where the RFCs leave a choice)
/// * **Line ends.** A command line ends at the first LF. It is executed only if it ends
///   with CRLF and holds no other CR: a bare CR or LF gets `500 5.5.2` and the line is
///   dropped. Accepting bare LF the way some servers do would let a client frame lines
///   differently from the backend that later receives its pipelined bytes; answering
///   at the LF (instead of waiting for a CRLF that may never come) keeps the client told.
/// * **Line length.** Command lines are bounded by [`Limits::max_line`] (CRLF included);
///   lines starting with `AUTH ` and SASL responses by the base64 size of
///   [`Limits::max_literal`] plus room for `AUTH PLAIN `, or `max_line` if larger. An
///   overlong line is answered at once with `500 5.5.6 Line too long` (RFC 4954's
///   `500 5.5.6 Authentication Exchange line is too long` inside a SASL exchange, which
///   it also ends); its bytes are then consumed and dropped through the next LF, and the
///   session goes on. Nothing is buffered inside the machine, so this is bounded; each
///   overlong line counts against [`Limits::max_commands`].
/// * **AUTH before TLS** (when the listener wants TLS first) gets
///   `538 5.7.11 Encryption required for requested authentication mechanism`, the
///   RFC 4954 reply to an AUTH whose mechanism may only be used over an encrypted
///   connection; `530 5.7.0 Must issue a STARTTLS command first` (RFC 3207) is meant for
///   servers that refuse *every* command before TLS, which this one does not. The checks
///   run in this order: `503 5.5.1 EHLO first`, syntax (`501 5.5.4`), mechanism
///   (`504 5.5.4 Unrecognized authentication type`), encryption (`538 5.7.11`).
/// * **SASL data.** `=` is an empty response (RFC 4954); `*` cancels
///   (`501 5.0.0 Authentication cancelled`, not a failure). Bad base64 (`501 5.5.2`), a
///   malformed PLAIN message or LOGIN user name (`501 5.5.2`), a foreign authorization
///   identity (`535 5.7.8`) and every rejected login count as authentication failures;
///   the one that reaches [`Limits::max_auth_failures`] is followed by `421 4.7.0` and
///   Close. A temporary failure (`454 4.7.0`) does not count.
/// * **MAIL, RCPT, DATA, BDAT** before authentication get `530 5.7.0 Authentication
///   required` (RFC 4954). BDAT is followed by its chunk whatever the reply (RFC 3030), so
///   `BDAT n` has its `n` bytes consumed and dropped first, then the 530 goes out.
/// * **VRFY and EXPN** get `502 5.5.1`: before authentication the proxy does not know
///   which backend would answer, and submission servers commonly disable both.
/// * **Commands** (each line outside a SASL exchange, overlong ones included) are counted;
///   the one past [`Limits::max_commands`] gets `421 4.7.0` and Close.
/// * **EHLO/HELO names.** A missing argument or one with control characters gets
///   `501 5.5.4`. Any other argument is accepted (clients send odd names, and the proxy
///   has no use for refusing them), but [`PreAuth::client_name`] only reports one word of
///   printable ASCII of at most 255 bytes (`None` otherwise: the backend's EHLO then
///   carries the proxy's own name). The latest accepted EHLO/HELO counts; STARTTLS
///   forgets it (RFC 3207 section 4.2).
/// * Replies never echo client input.
#[derive(Debug)]
pub struct ServerMachine {
    hostname: String,
    listener_tls: ListenerTls,
    allow_plaintext_auth: bool,
    limits: Limits,
    mechanisms: crate::proto::Mechanisms,
    /// Advertised extensions: the allowed backend ones plus ENHANCEDSTATUSCODES.
    extensions: Vec<String>,
    tls_active: bool,
    hello: Hello,
    client_name: Option<String>,
    state: State,
    actions: VecDeque<Action>,
    commands: u32,
    auth_failures: u32,
    /// pop-before-smtp bridge: the user a recent POP3/IMAP login from this client's
    /// address authorizes to send without AUTH.
    preauthorized: Option<String>,
}

impl ServerMachine {
    /// A machine for one client connection; the greeting is queued at once.
    ///
    /// `extensions` are the EHLO keywords (with parameters) the backends support; only
    /// those in [`super::ALLOWED_EXTENSIONS`] are advertised (see
    /// [`super::filter_extensions`]), plus `ENHANCEDSTATUSCODES`, which this machine uses
    /// in every reply. `STARTTLS` and `AUTH PLAIN LOGIN` are added by the machine itself
    /// when they apply. The host name is reduced to printable ASCII without spaces.
    pub fn new(policy: ServerPolicy, extensions: Vec<String>) -> ServerMachine {
        let mut hostname: String = policy
            .hostname
            .chars()
            .filter(char::is_ascii_graphic)
            .take(MAX_CLIENT_NAME)
            .collect();
        if hostname.is_empty() {
            hostname = "localhost".to_owned();
        }
        let mut extensions = filter_extensions(&extensions);
        if !extensions.iter().any(|e| e == "ENHANCEDSTATUSCODES") {
            extensions.push("ENHANCEDSTATUSCODES".to_owned());
        }
        let mut machine = ServerMachine {
            tls_active: policy.tls == ListenerTls::Implicit,
            listener_tls: policy.tls,
            allow_plaintext_auth: policy.allow_plaintext_auth,
            limits: policy.limits,
            mechanisms: policy.mechanisms,
            extensions,
            hostname,
            hello: Hello::None,
            client_name: None,
            state: State::Command,
            actions: VecDeque::new(),
            commands: 0,
            auth_failures: 0,
            preauthorized: None,
        };
        let greeting = format!("220 {} ESMTP cutover ready", machine.hostname);
        machine.reply(&greeting);
        machine
    }

    /// pop-before-smtp bridge: this client's address logged in recently as `user` by POP3
    /// or IMAP, so it may send mail without AUTH. At the first `MAIL` after EHLO/HELO the
    /// machine asks for a [`Action::Login`] with [`crate::proto::Auth::Bridged`] and leaves
    /// the `MAIL` line unconsumed; on success it is authenticated without a reply (the
    /// backend answers the `MAIL`), on failure the client gets `421 4.7.0` and the
    /// connection closes. AUTH stays available as usual.
    pub fn preauthorize(&mut self, user: String) {
        self.preauthorized = Some(user);
    }

    /// Whether the connection is encrypted (implicit TLS, or after STARTTLS).
    pub fn is_tls_active(&self) -> bool {
        self.tls_active
    }

    /// True while the machine is dropping bytes that belong to a line or chunk it already
    /// answered (an overlong line, a `BDAT` chunk sent before authentication): what it
    /// consumes then is not bounded by one command line.
    pub fn is_discarding(&self) -> bool {
        matches!(self.state, State::SkipLine | State::DiscardChunk { .. })
    }

    /// Bridge: a complete `MAIL` line after EHLO/HELO from a pre-authorized client starts
    /// the backend session instead of being answered here.
    fn bridge_mail(&mut self, input: &[u8]) -> bool {
        if self.hello == Hello::None || find_lf(input).is_none() || input.len() < 5 {
            return false;
        }
        if !input[..5].eq_ignore_ascii_case(b"MAIL ") {
            return false;
        }
        let Some(user) = self.preauthorized.clone() else {
            return false;
        };
        self.state = State::AwaitBridgeLogin;
        self.actions
            .push_back(Action::Login(Credentials::bridged(user)));
        true
    }

    fn auth_allowed(&self) -> bool {
        self.tls_active || self.allow_plaintext_auth
    }

    fn reply(&mut self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.actions.push_back(Action::Send(bytes));
    }

    fn close(&mut self) {
        self.actions.push_back(Action::Close);
        self.state = State::Closed;
    }

    /// The longest line accepted now, CRLF included. AUTH lines (recognized from their
    /// first bytes, so a partial `AU` already gets the larger bound) and SASL responses may
    /// carry a base64 payload of up to `max_literal` bytes.
    fn line_limit(&self, input: &[u8]) -> usize {
        let mut sasl = self.limits.max_line.max(
            self.limits
                .max_literal
                .div_ceil(3)
                .saturating_mul(4)
                .saturating_add("AUTH PLAIN \r\n".len()),
        );
        if self.mechanisms.has_tokens() {
            // Python's smtplib and others send a whole token on the AUTH line.
            let token = self.limits.max_sasl_token;
            sasl = sasl.max(token.saturating_add("AUTH OAUTHBEARER \r\n".len()));
        }
        match self.state {
            State::Command => {
                let n = input.len().min(5);
                if input[..n].eq_ignore_ascii_case(&b"AUTH "[..n]) {
                    sasl
                } else {
                    self.limits.max_line
                }
            }
            _ => sasl,
        }
    }

    fn receive_line(&mut self, input: &[u8]) -> usize {
        let limit = self.line_limit(input);
        match next_line(input, limit) {
            Line::Complete { len, .. } => {
                self.line(&input[..len]);
                return len;
            }
            Line::Incomplete => return 0,
            Line::TooLong => {}
        }
        // Overlong: answer now, then drop the line's bytes through its LF.
        if matches!(self.state, State::Command) {
            if !self.count_command() {
                // Closing: take the rest of this (overlong) line, none past its end.
                return find_lf(input).map_or(input.len(), |lf| lf + 1);
            }
            self.reply("500 5.5.6 Line too long");
        } else {
            self.state = State::Command;
            self.reply(LINE_TOO_LONG_SASL);
        }
        match find_lf(input) {
            Some(lf) => lf + 1,
            None => {
                self.state = State::SkipLine;
                input.len()
            }
        }
    }

    /// One complete line, LF included.
    fn line(&mut self, raw: &[u8]) {
        let content = is_strict_crlf(raw).then(|| &raw[..raw.len() - 2]);
        if matches!(self.state, State::Command) {
            if !self.count_command() {
                return;
            }
            match content {
                Some(content) => self.command(content),
                None => self.reply(BARE_CR_LF),
            }
        } else {
            match content {
                Some(_) if matches!(self.state, State::Challenged(_)) => self.challenge_answered(),
                Some(content) => self.sasl_response(content),
                None => {
                    self.state = State::Command;
                    self.reply(BARE_CR_LF);
                }
            }
        }
    }

    /// Counts a command; false (after queueing 421 and Close) once over the limit.
    fn count_command(&mut self) -> bool {
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.limits.max_commands {
            let bye = format!(
                "421 4.7.0 {} Too many commands, closing connection",
                self.hostname
            );
            self.reply(&bye);
            self.close();
            return false;
        }
        true
    }

    fn command(&mut self, line: &[u8]) {
        let (verb, args) = match line.iter().position(|b| *b == b' ') {
            Some(sp) => (&line[..sp], trim_spaces(&line[sp + 1..])),
            None => (line, &line[line.len()..]),
        };
        match verb.to_ascii_uppercase().as_slice() {
            b"EHLO" => self.hello(args, Hello::Ehlo),
            b"HELO" => self.hello(args, Hello::Helo),
            b"STARTTLS" => self.starttls(args),
            b"AUTH" => self.auth(args),
            b"MAIL" | b"RCPT" | b"DATA" => self.reply(AUTH_REQUIRED),
            b"BDAT" => self.bdat(args),
            b"NOOP" => self.reply(OK),
            b"RSET" if args.is_empty() => self.reply(OK),
            b"HELP" => self.reply("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT"),
            b"QUIT" if args.is_empty() => {
                self.reply("221 2.0.0 Bye");
                self.close();
            }
            b"RSET" | b"QUIT" => self.reply(NO_PARAMS),
            b"VRFY" | b"EXPN" => self.reply("502 5.5.1 Command not implemented"),
            _ => self.reply("500 5.5.1 Unrecognized command"),
        }
    }

    fn hello(&mut self, args: &[u8], kind: Hello) {
        if args.is_empty() || args.iter().any(u8::is_ascii_control) {
            self.reply(match kind {
                Hello::Ehlo => "501 5.5.4 Syntax: EHLO hostname",
                _ => "501 5.5.4 Syntax: HELO hostname",
            });
            return;
        }
        self.client_name = usable_client_name(args);
        self.hello = kind;
        if kind == Hello::Helo {
            let reply = format!("250 {}", self.hostname);
            self.reply(&reply);
            return;
        }
        let mut lines = Vec::with_capacity(self.extensions.len() + 3);
        lines.push(self.hostname.clone());
        lines.extend(self.extensions.iter().cloned());
        if self.listener_tls == ListenerTls::StartTls && !self.tls_active {
            lines.push("STARTTLS".to_owned());
        }
        let names = self.mechanisms.names();
        if self.auth_allowed() && !names.is_empty() {
            lines.push(format!("AUTH {names}"));
        }
        let mut out = Vec::new();
        let last = lines.len() - 1;
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(if i == last { b"250 " } else { b"250-" });
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.actions.push_back(Action::Send(out));
    }

    fn starttls(&mut self, args: &[u8]) {
        if self.tls_active {
            self.reply("503 5.5.1 TLS already active");
        } else if self.listener_tls != ListenerTls::StartTls {
            self.reply("502 5.5.1 STARTTLS not available");
        } else if !args.is_empty() {
            self.reply(NO_PARAMS);
        } else {
            self.reply("220 2.0.0 Ready to start TLS");
            self.actions.push_back(Action::StartTls);
            self.state = State::AwaitTls;
        }
    }

    fn auth(&mut self, args: &[u8]) {
        if self.hello != Hello::Ehlo {
            self.reply("503 5.5.1 EHLO first");
            return;
        }
        let mut words = args.split(|b| *b == b' ').filter(|w| !w.is_empty());
        let (Some(mechanism), initial, None) = (words.next(), words.next(), words.next()) else {
            self.reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]");
            return;
        };
        let (offered, limits) = (self.mechanisms, &self.limits);
        let exchange = sasl::Exchange::offered(
            mechanism,
            offered,
            limits.max_literal,
            limits.max_sasl_token,
        );
        let Some(mut exchange) = exchange else {
            self.reply("504 5.5.4 Unrecognized authentication type");
            return;
        };
        if !self.auth_allowed() {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism");
            return;
        }
        let step = exchange.begin(initial);
        self.sasl_step(exchange, step);
    }

    /// A line from the client inside a SASL exchange.
    fn sasl_response(&mut self, line: &[u8]) {
        if let State::Sasl(mut exchange) = std::mem::replace(&mut self.state, State::Command) {
            let step = exchange.respond(line);
            self.sasl_step(exchange, step);
        }
    }

    /// Says what the shared SASL exchange asks for, in SMTP's words (RFC 4954).
    fn sasl_step(&mut self, exchange: sasl::Exchange, step: Step) {
        self.state = State::Command;
        match step {
            Step::Challenge(challenge) => {
                self.reply(&format!("334 {challenge}"));
                self.state = State::Sasl(exchange);
            }
            Step::Done(creds) => {
                self.state = State::AwaitLogin;
                self.actions.push_back(Action::Login(creds));
            }
            Step::Cancelled => self.reply("501 5.0.0 Authentication cancelled"),
            Step::TooBig => self.reply(LINE_TOO_LONG_SASL),
            Step::Failed(SaslError::Base64) => self.sasl_failed(BAD_BASE64),
            Step::Failed(SaslError::ForeignAuthzid) => self
                .sasl_failed("535 5.7.8 Authorization identity must match authentication identity"),
            Step::Failed(
                SaslError::Malformed | SaslError::InvalidUser | SaslError::MalformedToken,
            ) => self.sasl_failed(MALFORMED_SASL),
        }
    }

    /// The client answered the backend's error challenge: the backend has said no.
    fn challenge_answered(&mut self) {
        if let State::Challenged(response) = std::mem::replace(&mut self.state, State::Command) {
            let reply = failure_reply(response.as_deref().unwrap_or(""));
            self.sasl_failed(&reply);
        }
    }

    /// A failed exchange or login: reply, count it, and close at the limit.
    fn sasl_failed(&mut self, reply: &str) {
        self.state = State::Command;
        self.reply(reply);
        self.auth_failures = self.auth_failures.saturating_add(1);
        if self.auth_failures >= self.limits.max_auth_failures {
            let bye = format!(
                "421 4.7.0 {} Too many authentication failures, closing connection",
                self.hostname
            );
            self.reply(&bye);
            self.close();
        }
    }

    fn bdat(&mut self, args: &[u8]) {
        let mut words = args.split(|b| *b == b' ').filter(|w| !w.is_empty());
        let size = match (words.next(), words.next(), words.next()) {
            (Some(size), last, None)
                if last.is_none_or(|l| l.eq_ignore_ascii_case(b"LAST"))
                    && !size.is_empty()
                    && size.len() <= 20
                    && size.iter().all(u8::is_ascii_digit) =>
            {
                std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
            }
            _ => None,
        };
        match size {
            None => self.reply("501 5.5.4 Syntax: BDAT size [LAST]"),
            Some(0) => self.reply(AUTH_REQUIRED),
            Some(remaining) => self.state = State::DiscardChunk { remaining },
        }
    }

    /// Queues a 421 and Close, unless already closed or handed off. While the TLS
    /// handshake runs nothing can be said in protocol, so only Close is queued.
    fn goodbye(&mut self, line: &str) {
        match self.state {
            State::Closed | State::Authenticated => return,
            State::AwaitTls => {}
            _ => self.reply(line),
        }
        self.close();
    }
}

impl PreAuth for ServerMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        if input.is_empty() {
            return 0;
        }
        if matches!(self.state, State::Command) && self.bridge_mail(input) {
            return 0;
        }
        match self.state {
            State::AwaitLogin
            | State::AwaitBridgeLogin
            | State::AwaitTls
            | State::Authenticated
            | State::Closed => 0,
            State::SkipLine => match find_lf(input) {
                Some(lf) => {
                    self.state = State::Command;
                    lf + 1
                }
                None => input.len(),
            },
            State::DiscardChunk { remaining } => {
                let take = usize::try_from(remaining).map_or(input.len(), |r| r.min(input.len()));
                let left = remaining.saturating_sub(take as u64);
                if left == 0 {
                    self.state = State::Command;
                    self.reply(AUTH_REQUIRED);
                } else {
                    self.state = State::DiscardChunk { remaining: left };
                }
                take
            }
            State::Command | State::Sasl(_) | State::Challenged(_) => self.receive_line(input),
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn tls_established(&mut self) {
        if matches!(self.state, State::AwaitTls) {
            // RFC 3207 section 4.2: forget everything learnt from the client before TLS.
            self.tls_active = true;
            self.hello = Hello::None;
            self.client_name = None;
            self.state = State::Command;
        }
    }

    fn login_done(&mut self, outcome: LoginOutcome) {
        if matches!(self.state, State::AwaitBridgeLogin) {
            match outcome {
                LoginOutcome::Ok { .. } => self.state = State::Authenticated,
                _ => {
                    self.preauthorized = None;
                    let bye = format!(
                        "421 4.7.0 {} Cannot relay for you now, try again later",
                        self.hostname
                    );
                    self.reply(&bye);
                    self.close();
                }
            }
            return;
        }
        if !matches!(self.state, State::AwaitLogin) {
            return;
        }
        self.state = State::Command;
        match outcome {
            LoginOutcome::Ok { .. } => {
                self.reply("235 2.7.0 Authentication successful");
                self.state = State::Authenticated;
            }
            LoginOutcome::AuthFailed { response } => {
                let reply = failure_reply(response.as_deref().unwrap_or(""));
                self.sasl_failed(&reply);
            }
            LoginOutcome::Challenged {
                challenge,
                response,
            } => {
                let challenge: String = challenge
                    .chars()
                    .filter(char::is_ascii_graphic)
                    .take(self.limits.max_sasl_token)
                    .collect();
                self.reply(&format!("334 {challenge}"));
                self.state = State::Challenged(response);
            }
            LoginOutcome::Unavailable => self.reply("454 4.7.0 Temporary authentication failure"),
            LoginOutcome::Refused { reason } => {
                let reply = failure_reply(reason);
                self.sasl_failed(&reply);
            }
        }
    }

    fn timed_out(&mut self) {
        let bye = format!("421 4.4.2 {} Error: timeout exceeded", self.hostname);
        self.goodbye(&bye);
    }

    fn shutting_down(&mut self) {
        self.goodbye("421 4.3.2 Service shutting down");
    }

    fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated)
    }

    fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }
}

fn find_lf(input: &[u8]) -> Option<usize> {
    input.iter().position(|b| *b == b'\n')
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

/// An EHLO/HELO argument fit to be repeated in the backend's EHLO: one word of printable
/// ASCII, at most 255 bytes.
fn usable_client_name(args: &[u8]) -> Option<String> {
    if args.is_empty() || args.len() > MAX_CLIENT_NAME || !args.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    std::str::from_utf8(args).ok().map(str::to_owned)
}

/// The `535` line for a rejected login: the backend's (or the refusal's) text, sanitized
/// and bounded, keeping a `5.x.x` enhanced code it starts with and replacing any other
/// code by `5.7.8`.
fn failure_reply(text: &str) -> String {
    let text = sanitize(text.as_bytes(), MAX_REPLY_TEXT);
    let rest = match enhanced_code(&text) {
        Some((5, _)) => return format!("535 {text}"),
        Some((_, len)) => text[len..].trim_start(),
        None => text.as_str(),
    };
    if rest.is_empty() {
        "535 5.7.8 Authentication credentials invalid".to_owned()
    } else {
        format!("535 5.7.8 {rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::drive::{ServerDriver, TlsInput};
    use crate::proto::sasl::encode_base64;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    const HOST: &str = "mx.example";

    fn policy(tls: ListenerTls, allow_plaintext_auth: bool) -> ServerPolicy {
        ServerPolicy {
            tls,
            allow_plaintext_auth,
            limits: Limits::default(),
            hostname: HOST.into(),
            mechanisms: Default::default(),
        }
    }

    fn backend_exts() -> Vec<String> {
        [
            "SIZE 10240000",
            "PIPELINING",
            "auth plain login",
            "8BITMIME",
            "STARTTLS",
            "XCLIENT ADDR NAME",
            "DSN",
            "SMTPUTF8",
            "ETRN",
            "CHUNKING",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The generic driver with logins answered from a queue (default Ok), the buffer
    /// discarded at STARTTLS (or kept, for split checks). The transcript is the sent bytes
    /// with `<starttls>`, `<discard N>`, `<login user pass mech>` and `<close>` markers.
    struct Harness {
        d: ServerDriver<'static, ServerMachine>,
        outcomes: Rc<RefCell<VecDeque<LoginOutcome>>>,
    }

    impl Harness {
        fn new(policy: ServerPolicy) -> Harness {
            let outcomes: Rc<RefCell<VecDeque<LoginOutcome>>> = Rc::default();
            let queue = outcomes.clone();
            let machine = ServerMachine::new(policy, backend_exts());
            let d = ServerDriver::new(machine, move |_| {
                queue
                    .borrow_mut()
                    .pop_front()
                    .unwrap_or(LoginOutcome::Ok { capabilities: None })
            });
            Harness { d, outcomes }
        }

        fn outcome(self, o: LoginOutcome) -> Self {
            self.outcomes.borrow_mut().push_back(o);
            self
        }

        fn keep_tls_input(mut self) -> Self {
            self.d = self.d.tls_input(TlsInput::Keep);
            self
        }

        fn feed(&mut self, bytes: &[u8]) -> &mut Self {
            self.d.feed(bytes);
            self
        }

        fn sm(&mut self) -> &mut ServerMachine {
            &mut self.d.machine
        }

        /// Drains what an event the test caused itself queued.
        fn pump(&mut self) {
            self.d.feed(b"");
        }

        fn buf(&self) -> Vec<u8> {
            self.d.transcript().left.clone()
        }

        fn take(&mut self) -> String {
            self.d.take_text()
        }
    }

    fn greeting() -> String {
        format!("220 {HOST} ESMTP cutover ready\r\n")
    }

    fn session(policy: ServerPolicy, input: &[u8]) -> String {
        let mut h = Harness::new(policy);
        h.feed(input);
        h.take()
    }

    fn ehlo_plain_pre_tls() -> String {
        format!(
            "250-{HOST}\r\n250-SIZE 10240000\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-DSN\r\n\
             250-SMTPUTF8\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
        )
    }

    fn ehlo_tls() -> String {
        format!(
            "250-{HOST}\r\n250-SIZE 10240000\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-DSN\r\n\
             250-SMTPUTF8\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"
        )
    }

    fn tls() -> ServerPolicy {
        policy(ListenerTls::Implicit, false)
    }

    #[test]
    fn greeting_and_tls_state() {
        let mut sm = ServerMachine::new(policy(ListenerTls::StartTls, false), vec![]);
        assert_eq!(
            sm.poll_action(),
            Some(Action::Send(greeting().into_bytes()))
        );
        assert_eq!(sm.poll_action(), None);
        assert!(!sm.is_tls_active());
        assert!(ServerMachine::new(tls(), vec![]).is_tls_active());
        assert!(!sm.is_authenticated());
        assert_eq!(sm.client_name(), None);
    }

    #[test]
    fn hostname_is_sanitized() {
        let mut p = tls();
        p.hostname = "evil\r\n250 host".into();
        assert_eq!(
            session(p, b"HELO x\r\n"),
            "220 evil250host ESMTP cutover ready\r\n250 evil250host\r\n"
        );
        let mut p = tls();
        p.hostname = String::new();
        assert!(session(p, b"").starts_with("220 localhost ESMTP"));
    }

    #[test]
    fn ehlo_before_and_after_starttls() {
        let mut h = Harness::new(policy(ListenerTls::StartTls, false));
        h.feed(b"EHLO client.example\r\n");
        assert_eq!(h.take(), greeting() + &ehlo_plain_pre_tls());
        assert_eq!(h.sm().client_name(), Some("client.example"));
        h.feed(b"STARTTLS\r\n");
        assert_eq!(h.take(), "220 2.0.0 Ready to start TLS\r\n<starttls>");
        assert!(h.sm().is_tls_active());
        assert_eq!(h.sm().client_name(), None, "forgotten after TLS");
        h.feed(b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(h.take(), "503 5.5.1 EHLO first\r\n");
        h.feed(b"EHLO again.example\r\n");
        assert_eq!(h.take(), ehlo_tls());
        assert_eq!(h.sm().client_name(), Some("again.example"));
        h.feed(b"STARTTLS\r\n");
        assert_eq!(h.take(), "503 5.5.1 TLS already active\r\n");
        h.feed(b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(
            h.take(),
            "<login joe s3cret plain>235 2.7.0 Authentication successful\r\n"
        );
        assert!(h.sm().is_authenticated());
    }

    #[test]
    fn ehlo_variants() {
        // Plaintext listener allowing plaintext auth: no STARTTLS, AUTH offered.
        let out = session(policy(ListenerTls::None, true), b"ehlo c\r\n");
        assert_eq!(out, greeting() + &ehlo_tls());
        // Plaintext listener, auth disallowed: neither.
        let out = session(policy(ListenerTls::None, false), b"EHLO c\r\n");
        assert!(
            out.ends_with("250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n"),
            "{out}"
        );
        // STARTTLS listener with plaintext auth: both.
        let out = session(policy(ListenerTls::StartTls, true), b"EHLO c\r\n");
        assert!(
            out.ends_with("250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"),
            "{out}"
        );
        // No backend extensions: ENHANCEDSTATUSCODES still, and it is not doubled.
        let mut sm = ServerMachine::new(tls(), vec!["ENHANCEDSTATUSCODES".into()]);
        sm.poll_action();
        assert_eq!(sm.receive(b"EHLO c\r\n"), 8);
        assert_eq!(
            sm.poll_action(),
            Some(Action::Send(
                format!("250-{HOST}\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n")
                    .into_bytes()
            ))
        );
    }

    #[test]
    fn ehlo_and_helo_arguments() {
        let mut h = Harness::new(tls());
        h.feed(b"EHLO\r\nEHLO \r\nHELO\r\nEHLO a\tb\r\nHELO \x01\r\nEHLO x\x7f\r\n");
        assert_eq!(
            h.take(),
            greeting()
                + "501 5.5.4 Syntax: EHLO hostname\r\n"
                + "501 5.5.4 Syntax: EHLO hostname\r\n"
                + "501 5.5.4 Syntax: HELO hostname\r\n"
                + "501 5.5.4 Syntax: EHLO hostname\r\n"
                + "501 5.5.4 Syntax: HELO hostname\r\n"
                + "501 5.5.4 Syntax: EHLO hostname\r\n"
        );
        assert_eq!(h.sm().client_name(), None);
        h.feed(b"EHLO [192.0.2.1]\r\n");
        assert_eq!(h.take(), ehlo_tls());
        assert_eq!(h.sm().client_name(), Some("[192.0.2.1]"));
        // Odd names are accepted, but not passed on to the backend.
        for odd in [
            &b"EHLO my laptop\r\n"[..],
            b"EHLO caf\xc3\xa9\r\n",
            format!("EHLO {}\r\n", "a".repeat(256)).as_bytes(),
        ] {
            h.feed(b"EHLO good\r\n");
            assert_eq!(h.sm().client_name(), Some("good"));
            h.feed(odd);
            assert_eq!(h.take(), ehlo_tls() + &ehlo_tls());
            assert_eq!(h.sm().client_name(), None, "{odd:?}");
        }
        h.feed(format!("EHLO   {}  \r\n", "a".repeat(255)).as_bytes());
        assert_eq!(h.sm().client_name(), Some(&*"a".repeat(255)));
        h.feed(b"HELO [IPv6:2001:db8::1]\r\n");
        assert_eq!(h.sm().client_name(), Some("[IPv6:2001:db8::1]"));
        h.feed(b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert!(h.take().ends_with("503 5.5.1 EHLO first\r\n"));
    }

    #[test]
    fn helo_then_auth_needs_ehlo() {
        let mut h = Harness::new(tls());
        h.feed(b"HELO client\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(
            h.take(),
            greeting() + &format!("250 {HOST}\r\n") + "503 5.5.1 EHLO first\r\n"
        );
        assert_eq!(h.sm().client_name(), Some("client"));
        let out = session(tls(), b"AUTH LOGIN\r\n");
        assert_eq!(out, greeting() + "503 5.5.1 EHLO first\r\n");
        // EHLO then HELO: the last greeting counts.
        let out = session(tls(), b"EHLO c\r\nHELO c\r\nAUTH LOGIN\r\n");
        assert!(out.ends_with("503 5.5.1 EHLO first\r\n"));
    }

    #[test]
    fn auth_plain_initial_response() {
        let out = session(tls(), b"EHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(
            out,
            greeting()
                + &ehlo_tls()
                + "<login joe s3cret plain>235 2.7.0 Authentication successful\r\n"
        );
        // Mechanism names are case-insensitive; authzid equal to authcid is fine.
        let ir = encode_base64(b"joe\0joe\0pw");
        let out = session(tls(), format!("EHLO c\r\nauth plain {ir}\r\n").as_bytes());
        assert!(out.ends_with("<login joe pw plain>235 2.7.0 Authentication successful\r\n"));
    }

    #[test]
    fn auth_plain_continuation() {
        let mut h = Harness::new(tls());
        h.feed(b"EHLO c\r\nAUTH PLAIN\r\n");
        assert_eq!(h.take(), greeting() + &ehlo_tls() + "334 \r\n");
        h.feed(b"AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(
            h.take(),
            "<login joe s3cret plain>235 2.7.0 Authentication successful\r\n"
        );
    }

    #[test]
    fn auth_plain_errors() {
        let mut h = Harness::new(tls());
        h.feed(b"EHLO c\r\n");
        h.take();
        // `=` is an empty response: an empty PLAIN message is malformed.
        h.feed(b"AUTH PLAIN =\r\n");
        assert_eq!(h.take(), "501 5.5.2 Malformed authentication data\r\n");
        // `*` cancels (not a failure).
        h.feed(b"AUTH PLAIN\r\n*\r\n");
        assert_eq!(h.take(), "334 \r\n501 5.0.0 Authentication cancelled\r\n");
        // Bad base64, as initial response and as continuation.
        h.feed(b"AUTH PLAIN !!!!\r\n");
        assert_eq!(h.take(), "501 5.5.2 Invalid base64 data\r\n");
        // Third failure: foreign authzid, then the connection is closed.
        let ir = encode_base64(b"admin\0joe\0pw");
        h.feed(format!("AUTH PLAIN\r\n{ir}\r\nNOOP\r\n").as_bytes());
        assert_eq!(
            h.take(),
            format!(
                "334 \r\n535 5.7.8 Authorization identity must match authentication identity\r\n\
                 421 4.7.0 {HOST} Too many authentication failures, closing connection\r\n<close>"
            )
        );
        assert_eq!(h.buf(), b"NOOP\r\n", "nothing consumed after Close");
    }

    #[test]
    fn auth_syntax_and_mechanisms() {
        let out = session(
            tls(),
            b"EHLO c\r\nAUTH\r\nAUTH PLAIN a b\r\nAUTH CRAM-MD5\r\nAUTH XOAUTH2 dG9r\r\nNOOP\r\n",
        );
        assert_eq!(
            out,
            greeting()
                + &ehlo_tls()
                + "501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
                + "501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
                + "504 5.5.4 Unrecognized authentication type\r\n"
                + "504 5.5.4 Unrecognized authentication type\r\n"
                + "250 2.0.0 OK\r\n"
        );
    }

    #[test]
    fn auth_before_tls_is_refused() {
        let out = session(
            policy(ListenerTls::StartTls, false),
            b"EHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nAUTH LOGIN\r\nAUTH GSSAPI\r\n",
        );
        let refused = "538 5.7.11 Encryption required for requested authentication mechanism\r\n";
        assert_eq!(
            out,
            greeting()
                + &ehlo_plain_pre_tls()
                + refused
                + refused
                + "504 5.5.4 Unrecognized authentication type\r\n"
        );
        // Allowed in plaintext when the policy says so.
        let out = session(
            policy(ListenerTls::StartTls, true),
            b"EHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n",
        );
        assert!(out.ends_with("<login joe s3cret plain>235 2.7.0 Authentication successful\r\n"));
    }

    #[test]
    fn auth_login_without_initial_response() {
        let mut h = Harness::new(tls());
        h.feed(b"EHLO c\r\nAUTH LOGIN\r\n");
        assert_eq!(h.take(), greeting() + &ehlo_tls() + "334 VXNlcm5hbWU6\r\n");
        h.feed(b"am9l\r\n");
        assert_eq!(h.take(), "334 UGFzc3dvcmQ6\r\n");
        h.feed(b"czNjcmV0\r\n");
        assert_eq!(
            h.take(),
            "<login joe s3cret login>235 2.7.0 Authentication successful\r\n"
        );
    }

    #[test]
    fn auth_login_with_initial_response_and_errors() {
        let out = session(tls(), b"EHLO c\r\nAUTH LOGIN am9l\r\nczNjcmV0\r\n");
        assert_eq!(
            out,
            greeting()
                + &ehlo_tls()
                + "334 UGFzc3dvcmQ6\r\n<login joe s3cret login>235 2.7.0 Authentication successful\r\n"
        );
        // Empty password via `=` is passed on; the backend decides.
        let out = session(tls(), b"EHLO c\r\nAUTH LOGIN am9l\r\n=\r\n");
        assert!(out.ends_with(
            "334 UGFzc3dvcmQ6\r\n<login joe  login>235 2.7.0 Authentication successful\r\n"
        ));
        // Empty user, a user with NUL/CR/LF, bad base64, cancel at the password.
        let bad_user = encode_base64(b"jo\r\ne");
        let out = session(
            tls(),
            format!(
                "EHLO c\r\nAUTH LOGIN =\r\nAUTH LOGIN\r\n{bad_user}\r\nAUTH LOGIN am9l\r\n*\r\nAUTH LOGIN\r\n#\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(
            out,
            greeting()
                + &ehlo_tls()
                + "501 5.5.2 Malformed authentication data\r\n"
                + "334 VXNlcm5hbWU6\r\n501 5.5.2 Malformed authentication data\r\n"
                + "334 UGFzc3dvcmQ6\r\n501 5.0.0 Authentication cancelled\r\n"
                + "334 VXNlcm5hbWU6\r\n501 5.5.2 Invalid base64 data\r\n"
                + &format!(
                    "421 4.7.0 {HOST} Too many authentication failures, closing connection\r\n"
                )
                + "<close>"
        );
    }

    #[test]
    fn commands_before_auth() {
        let out = session(
            tls(),
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nNOOP\r\nNOOP hello\r\nRSET\r\nRSET x\r\n\
              HELP\r\nHELP AUTH\r\nVRFY joe\r\nEXPN list\r\nETRN x\r\nFOO\r\n\r\n quit\r\nQUIT now\r\nqUiT\r\nNOOP\r\n",
        );
        assert_eq!(
            out,
            greeting()
                + "530 5.7.0 Authentication required\r\n"
                + "530 5.7.0 Authentication required\r\n"
                + "530 5.7.0 Authentication required\r\n"
                + "250 2.0.0 OK\r\n"
                + "250 2.0.0 OK\r\n"
                + "250 2.0.0 OK\r\n"
                + "501 5.5.4 Syntax error (no parameters allowed)\r\n"
                + "214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT\r\n"
                + "214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT\r\n"
                + "502 5.5.1 Command not implemented\r\n"
                + "502 5.5.1 Command not implemented\r\n"
                + "500 5.5.1 Unrecognized command\r\n"
                + "500 5.5.1 Unrecognized command\r\n"
                + "500 5.5.1 Unrecognized command\r\n"
                + "500 5.5.1 Unrecognized command\r\n"
                + "501 5.5.4 Syntax error (no parameters allowed)\r\n"
                + "221 2.0.0 Bye\r\n<close>"
        );
    }

    #[test]
    fn bdat_chunk_is_dropped_before_530() {
        let mut h = Harness::new(tls());
        h.feed(b"BDAT 12 LAST\r\nQUIT\r\nQUIT");
        assert_eq!(h.take(), greeting());
        assert!(h.sm().is_discarding());
        assert!(h.buf().is_empty());
        h.feed(b"\r\nNOOP\r\n");
        assert_eq!(
            h.take(),
            "530 5.7.0 Authentication required\r\n250 2.0.0 OK\r\n"
        );
        let out = session(
            tls(),
            b"BDAT 0 LAST\r\nBDAT\r\nBDAT x\r\nBDAT 1 2\r\nBDAT 123456789012345678901\r\nBDAT 99999999999999999999\r\n",
        );
        assert_eq!(
            out,
            greeting()
                + "530 5.7.0 Authentication required\r\n"
                + "501 5.5.4 Syntax: BDAT size [LAST]\r\n"
                + "501 5.5.4 Syntax: BDAT size [LAST]\r\n"
                + "501 5.5.4 Syntax: BDAT size [LAST]\r\n"
                + "501 5.5.4 Syntax: BDAT size [LAST]\r\n"
                + "501 5.5.4 Syntax: BDAT size [LAST]\r\n"
        );
    }

    #[test]
    fn starttls_consumes_only_its_line() {
        let mut sm = ServerMachine::new(policy(ListenerTls::StartTls, false), vec![]);
        sm.poll_action();
        let input = b"STARTTLS\r\nRSET\r\n";
        assert_eq!(sm.receive(input), 10);
        assert_eq!(
            sm.poll_action(),
            Some(Action::Send(b"220 2.0.0 Ready to start TLS\r\n".to_vec()))
        );
        assert_eq!(sm.poll_action(), Some(Action::StartTls));
        assert_eq!(sm.poll_action(), None);
        assert_eq!(sm.receive(&input[10..]), 0, "nothing until tls_established");
        sm.tls_established();
        assert_eq!(sm.receive(b"RSET\r\n"), 6);
        assert_eq!(
            sm.poll_action(),
            Some(Action::Send(b"250 2.0.0 OK\r\n".to_vec()))
        );
        // The driver discards the pipelined plaintext: the harness does the same.
        let out = session(
            policy(ListenerTls::StartTls, false),
            b"EHLO c\r\nSTARTTLS\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n",
        );
        assert_eq!(
            out,
            greeting()
                + &ehlo_plain_pre_tls()
                + "220 2.0.0 Ready to start TLS\r\n<starttls><discard 29>"
        );
    }

    #[test]
    fn starttls_refusals() {
        let out = session(tls(), b"STARTTLS\r\n");
        assert_eq!(out, greeting() + "503 5.5.1 TLS already active\r\n");
        let out = session(policy(ListenerTls::None, true), b"STARTTLS\r\n");
        assert_eq!(out, greeting() + "502 5.5.1 STARTTLS not available\r\n");
        let out = session(
            policy(ListenerTls::StartTls, false),
            b"STARTTLS now\r\nSTARTTLS \r\n",
        );
        assert_eq!(
            out,
            greeting()
                + "501 5.5.4 Syntax error (no parameters allowed)\r\n"
                + "220 2.0.0 Ready to start TLS\r\n<starttls>"
        );
        // tls_established out of turn is ignored.
        let mut sm = ServerMachine::new(policy(ListenerTls::StartTls, false), vec![]);
        sm.tls_established();
        assert!(!sm.is_tls_active());
    }

    #[test]
    fn pipelining_after_auth_is_left_for_the_backend() {
        let mut sm = ServerMachine::new(tls(), backend_exts());
        sm.poll_action();
        let input: &[u8] =
            b"EHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n";
        let mut pos = sm.receive(input);
        assert_eq!(pos, 8);
        assert!(matches!(sm.poll_action(), Some(Action::Send(_))));
        pos += sm.receive(&input[pos..]);
        assert_eq!(&input[pos..], b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        let Some(Action::Login(creds)) = sm.poll_action() else {
            panic!("expected Login")
        };
        assert_eq!(creds.user, "joe");
        assert_eq!(creds.secret().unwrap().expose(), b"s3cret");
        assert_eq!(creds.mechanism(), "plain");
        assert_eq!(sm.poll_action(), None);
        assert_eq!(sm.receive(&input[pos..]), 0, "nothing while the login runs");
        sm.login_done(LoginOutcome::Ok { capabilities: None });
        assert_eq!(
            sm.poll_action(),
            Some(Action::Send(
                b"235 2.7.0 Authentication successful\r\n".to_vec()
            ))
        );
        assert!(sm.is_authenticated());
        assert_eq!(sm.receive(&input[pos..]), 0, "nothing after authentication");
        sm.timed_out();
        sm.shutting_down();
        assert_eq!(sm.poll_action(), None, "no goodbye after hand-off");
    }

    #[test]
    fn pipelining_before_auth_answers_in_order() {
        let out = session(
            tls(),
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nNOOP\r\nAUTH LOGIN am9l\r\nczNjcmV0\r\n",
        );
        assert_eq!(
            out,
            greeting()
                + &ehlo_tls()
                + "530 5.7.0 Authentication required\r\n530 5.7.0 Authentication required\r\n"
                + "250 2.0.0 OK\r\n334 UGFzc3dvcmQ6\r\n"
                + "<login joe s3cret login>235 2.7.0 Authentication successful\r\n"
        );
    }

    #[test]
    fn login_outcomes() {
        let input = b"EHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\n";
        let mut h = Harness::new(tls())
            .outcome(LoginOutcome::AuthFailed {
                response: Some("5.7.8 Error: authentication failed: bad\r\npassword".into()),
            })
            .outcome(LoginOutcome::Unavailable)
            .outcome(LoginOutcome::AuthFailed {
                response: Some("4.7.0 weird".into()),
            })
            .outcome(LoginOutcome::Refused {
                reason: "invalid user name",
            });
        h.feed(input);
        let login = "<login joe s3cret plain>";
        assert_eq!(
            h.take(),
            greeting()
                + &ehlo_tls()
                + login
                + "535 5.7.8 Error: authentication failed: bad password\r\n"
                + login
                + "454 4.7.0 Temporary authentication failure\r\n"
                + login
                + "535 5.7.8 weird\r\n"
                + login
                + "535 5.7.8 invalid user name\r\n"
                + &format!(
                    "421 4.7.0 {HOST} Too many authentication failures, closing connection\r\n"
                )
                + "<close>"
        );
    }

    #[test]
    fn failure_reply_shapes() {
        assert_eq!(
            failure_reply(""),
            "535 5.7.8 Authentication credentials invalid"
        );
        assert_eq!(
            failure_reply("[AUTH] Authentication failed."),
            "535 5.7.8 [AUTH] Authentication failed."
        );
        assert_eq!(failure_reply("5.7.0 nope"), "535 5.7.0 nope");
        assert_eq!(
            failure_reply("2.0.0"),
            "535 5.7.8 Authentication credentials invalid"
        );
        let long = failure_reply(&"x".repeat(1000));
        assert_eq!(long.len(), "535 5.7.8 ".len() + MAX_REPLY_TEXT);
    }

    #[test]
    fn login_done_out_of_turn_is_ignored() {
        let mut sm = ServerMachine::new(tls(), vec![]);
        sm.poll_action();
        sm.login_done(LoginOutcome::Ok { capabilities: None });
        assert_eq!(sm.poll_action(), None);
        assert!(!sm.is_authenticated());
    }

    #[test]
    fn overlong_lines() {
        let mut p = tls();
        p.limits.max_line = 32;
        p.limits.max_literal = 30; // SASL lines: 40 + 13 bytes
        let mut h = Harness::new(p);
        h.take();
        // 32 bytes without LF is already too long (the CRLF would make 33+).
        h.feed(&[b'N'; 31]);
        assert_eq!(h.take(), "");
        h.feed(b"O");
        assert_eq!(h.take(), "500 5.5.6 Line too long\r\n");
        assert!(h.sm().is_discarding());
        assert!(h.buf().is_empty(), "consumed while skipping");
        h.feed(b"more junk");
        assert!(h.buf().is_empty());
        h.feed(b"end\r\nNOOP\r\n");
        assert_eq!(h.take(), "250 2.0.0 OK\r\n");
        assert!(!h.sm().is_discarding());
        // Exactly at the limit is fine; the overlong line ending in the same read is
        // consumed through its LF and the next command still runs.
        let exact = format!("NOOP {}\r\n", "x".repeat(25));
        assert_eq!(exact.len(), 32);
        h.feed(exact.as_bytes());
        assert_eq!(h.take(), "250 2.0.0 OK\r\n");
        h.feed(format!("NOOP {}\r\nNOOP\r\n", "x".repeat(26)).as_bytes());
        assert_eq!(h.take(), "500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n");
        // AUTH lines get the SASL bound.
        h.feed(b"EHLO c\r\n");
        h.take();
        let ir = encode_base64(b"\0joe\0s3cret-longer-password");
        assert!(ir.len() + 13 > 32);
        h.outcomes.borrow_mut().push_back(LoginOutcome::Unavailable);
        h.feed(format!("AUTH PLAIN {ir}\r\n").as_bytes());
        assert_eq!(
            h.take(),
            "<login joe s3cret-longer-password plain>454 4.7.0 Temporary authentication failure\r\n"
        );
        // A SASL response over its bound ends the exchange.
        h.feed(b"AUTH PLAIN\r\n");
        h.feed(&[b'A'; 60]);
        assert_eq!(
            h.take(),
            "334 \r\n500 5.5.6 Authentication Exchange line is too long\r\n"
        );
        h.feed(b"AAAA\r\nNOOP\r\n");
        assert_eq!(h.take(), "250 2.0.0 OK\r\n");
    }

    #[test]
    fn bare_cr_and_lf_are_refused() {
        let out = session(
            tls(),
            b"NOOP\nNOOP\rNOOP\r\nEHLO c\r\nAUTH PLAIN\r\nAGpvZQBzM2NyZXQ=\nNOOP\r\r\n",
        );
        assert_eq!(
            out,
            greeting()
                + "500 5.5.2 Bare CR or LF not allowed\r\n"
                + "500 5.5.2 Bare CR or LF not allowed\r\n"
                + &ehlo_tls()
                + "334 \r\n500 5.5.2 Bare CR or LF not allowed\r\n"
                + "500 5.5.2 Bare CR or LF not allowed\r\n"
        );
    }

    #[test]
    fn max_commands() {
        let mut p = tls();
        p.limits.max_commands = 3;
        let out = session(p, b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
        assert_eq!(
            out,
            greeting()
                + "250 2.0.0 OK\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n"
                + &format!("421 4.7.0 {HOST} Too many commands, closing connection\r\n")
                + "<close>"
        );
    }

    #[test]
    fn timeout_and_shutdown() {
        let mut h = Harness::new(tls());
        h.take();
        h.sm().timed_out();
        h.pump();
        assert_eq!(
            h.take(),
            format!("421 4.4.2 {HOST} Error: timeout exceeded\r\n<close>")
        );
        h.sm().shutting_down();
        h.pump();
        assert_eq!(h.take(), "", "only one goodbye");
        assert_eq!(h.sm().receive(b"NOOP\r\n"), 0);

        let mut h = Harness::new(tls());
        h.take();
        h.feed(b"EHLO c\r\nAUTH LOGIN\r\n");
        h.take();
        h.sm().shutting_down();
        h.pump();
        assert_eq!(h.take(), "421 4.3.2 Service shutting down\r\n<close>");

        // During the TLS handshake only Close is possible.
        let mut sm = ServerMachine::new(policy(ListenerTls::StartTls, false), vec![]);
        sm.receive(b"STARTTLS\r\n");
        while sm.poll_action().is_some() {}
        sm.timed_out();
        assert_eq!(sm.poll_action(), Some(Action::Close));
        assert_eq!(sm.poll_action(), None);
        sm.tls_established();
        assert_eq!(sm.receive(b"NOOP\r\n"), 0, "closed");
    }

    #[test]
    fn no_secret_in_debug() {
        let mut sm = ServerMachine::new(tls(), vec![]);
        sm.receive(b"EHLO c\r\n");
        sm.receive(b"AUTH LOGIN am9l\r\n");
        sm.receive(b"aHVudGVyMg==\r\n");
        let actions: Vec<Action> = std::iter::from_fn(|| sm.poll_action()).collect();
        let debug = format!("{actions:?} {sm:?}");
        assert!(debug.contains("joe"));
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("aHVudGVyMg"), "{debug}");
        let mut sm = ServerMachine::new(tls(), vec![]);
        sm.receive(b"EHLO c\r\n");
        sm.receive(b"AUTH PLAIN AGpvZQBodW50ZXIy\r\n");
        let debug = format!(
            "{sm:?} {:?}",
            std::iter::from_fn(|| sm.poll_action()).collect::<Vec<_>>()
        );
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    /// The transcript of a whole session fed in one read, then cut at every position,
    /// then one byte at a time.
    fn assert_split_invariant(policy: ServerPolicy, input: &[u8]) {
        let run = |chunks: &[&[u8]]| {
            let mut h = Harness::new(policy.clone())
                .outcome(LoginOutcome::AuthFailed { response: None })
                .outcome(LoginOutcome::Unavailable)
                .keep_tls_input();
            for c in chunks {
                h.feed(c);
            }
            (h.take(), h.buf())
        };
        let whole = run(&[input]);
        for cut in 0..=input.len() {
            assert_eq!(
                run(&[&input[..cut], &input[cut..]]),
                whole,
                "cut at {cut} of {:?}",
                String::from_utf8_lossy(input)
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
    }

    #[test]
    fn same_transcript_whatever_the_split() {
        let sessions: &[(&[u8], ServerPolicy)] = &[
            (
                b"EHLO client.example\r\nSTARTTLS\r\nEHLO client.example\r\nAUTH PLAIN\r\nAGpvZQBzM2NyZXQ=\r\nAUTH LOGIN am9l\r\n*\r\nAUTH LOGIN\r\nam9l\r\nczNjcmV0\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nMAIL FROM:<a@b>\r\n",
                policy(ListenerTls::StartTls, false),
            ),
            (
                b"HELO x\r\nNOOP\nMAIL FROM:<a@b>\r\nBDAT 7 LAST\r\n1234567NOOP\r\nHELP\r\nVRFY x\r\nQUIT\r\nNOOP\r\n",
                tls(),
            ),
            (
                b"EHLO c\r\nAUTH PLAIN AGpvZQBzM2NyZXQ=\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
                tls(),
            ),
        ];
        for (input, p) in sessions {
            assert_split_invariant(p.clone(), input);
        }
        let mut small = tls();
        small.limits.max_line = 16;
        small.limits.max_literal = 12;
        assert_split_invariant(
            small,
            b"NOOP 0123456789abcdef\r\nNOOP\r\nEHLO c\r\nAUTH PLAIN\r\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\nNOOP\r\n",
        );
    }
}

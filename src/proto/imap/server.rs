//! The client-facing IMAP machine: speaks as a server up to a successful LOGIN or
//! AUTHENTICATE (RFC 9051 / RFC 3501 not-authenticated state, RFC 4959 SASL-IR, RFC 7888
//! LITERAL+, RFC 2971 ID, RFC 4616 PLAIN and the LOGIN mechanism).
//!
//! # How input is consumed
//! * A line is consumed only once its LF is in the input; a partial line is left in the
//!   driver's buffer (`receive` returns 0) until it is complete or longer than the
//!   budget, which is then answered with `* BAD [TOOBIG]`, `* BYE` and `Close`.
//! * A line announcing a literal is consumed, and the command is then held inside the
//!   machine (a [`Pending`]) while the literal data is consumed as it arrives and stored
//!   (or skipped, for a command already known to fail). Everything held belongs to the
//!   current command, and it is bounded: the lines of one command total at most
//!   `max_line` bytes, its literals at most `max_literal` bytes together.
//! * One `receive` call handles at most one command: it returns as soon as a command is
//!   finished, so pipelined commands stay in the driver's buffer. After `Login` or
//!   `StartTls` nothing is consumed until `login_done` or `tls_established`.
//! * Since the buffer only ever holds one partial line, the driver needs room for
//!   `max_line` bytes.
//!
//! # What counts
//! Every command line begun (valid or not) counts towards `max_commands`; the command
//! after the last allowed one gets `* BYE` and `Close`. SASL continuation lines and the
//! lines after a literal belong to their command. A rejected login counts towards
//! `max_auth_failures`: a backend rejection, a refused routing, and the rejections made
//! here (invalid user name, NUL in the password, malformed PLAIN message, foreign
//! authorization identity). `NO [UNAVAILABLE]`, `NO [PRIVACYREQUIRED]`, cancelled
//! exchanges and syntax errors do not.

use std::collections::VecDeque;
use std::fmt;

use super::syntax::{
    find_line, is_valid_tag, line_content, sanitize_text, split_literal, tokenize, LineEnd, Token,
};
use crate::proto::sasl::{self, SaslError};
use crate::proto::{
    Action, Credentials, ListenerTls, LoginOutcome, Mechanism, Phase, PreAuth, Secret,
    ServerPolicy,
};

/// The continuation request sent for a synchronizing literal.
const CONTINUE_LITERAL: &[u8] = b"+ Ready for literal data\r\n";
/// SASL LOGIN prompts: base64 of `Username:` and `Password:`.
const PROMPT_USER: &[u8] = b"+ VXNlcm5hbWU6\r\n";
const PROMPT_PASS: &[u8] = b"+ UGFzc3dvcmQ6\r\n";
/// Longest backend text copied into a tagged NO.
const MAX_RESPONSE_TEXT: usize = 512;
/// Longest backend capability list copied into the final OK; a longer one is left out
/// (a truncated list would be wrong), and the client asks for it itself.
const MAX_CAPS_LEN: usize = 8 * 1024;
const AUTH_FAILED: &str = "[AUTHENTICATIONFAILED] Authentication failed.";
const PRIVACY_REQUIRED: &str = "[PRIVACYREQUIRED] Plaintext authentication is disabled.";

/// Commands of the authenticated and selected states, refused with a clearer message.
const AFTER_LOGIN: &[&str] = &[
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "NAMESPACE",
    "STATUS",
    "APPEND",
    "IDLE",
    "ENABLE",
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "UID",
    "GETQUOTA",
    "GETQUOTAROOT",
    "GETACL",
    "MYRIGHTS",
    "GETMETADATA",
];

/// The commands of the not-authenticated state (plus ID, allowed in any state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Capability,
    Noop,
    Logout,
    Id,
    StartTls,
    Login,
    Authenticate,
}

impl Cmd {
    fn from_name(name: &[u8]) -> Result<Cmd, &'static str> {
        const NAMES: &[(&str, Cmd)] = &[
            ("CAPABILITY", Cmd::Capability),
            ("NOOP", Cmd::Noop),
            ("LOGOUT", Cmd::Logout),
            ("ID", Cmd::Id),
            ("STARTTLS", Cmd::StartTls),
            ("LOGIN", Cmd::Login),
            ("AUTHENTICATE", Cmd::Authenticate),
        ];
        if let Some((_, cmd)) = NAMES
            .iter()
            .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
        {
            return Ok(*cmd);
        }
        if AFTER_LOGIN
            .iter()
            .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
        {
            Err("Command not permitted before login")
        } else {
            Err("Unknown command")
        }
    }
}

/// Why an argument list is not (yet) acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArgError {
    /// A valid beginning, more is needed.
    Incomplete,
    /// Wrong, whatever follows.
    Bad(&'static str),
}

/// Checks the arguments of `cmd` (everything after the command name). Used on a complete
/// command, and on the arguments so far plus a placeholder before a literal is accepted
/// (so a literal is never asked for a command that is already wrong).
fn check_args(cmd: Cmd, args: &[Token]) -> Result<(), ArgError> {
    match cmd {
        Cmd::Capability | Cmd::Noop | Cmd::Logout | Cmd::StartTls => match args.is_empty() {
            true => Ok(()),
            false => Err(ArgError::Bad("Unexpected arguments")),
        },
        Cmd::Login => {
            if args.iter().any(|t| !t.is_astring()) {
                return Err(ArgError::Bad("Invalid arguments"));
            }
            match args.len() {
                0 | 1 => Err(ArgError::Incomplete),
                2 => Ok(()),
                _ => Err(ArgError::Bad("Too many arguments")),
            }
        }
        Cmd::Authenticate => {
            if args.iter().any(|t| !matches!(t, Token::Atom(_))) {
                return Err(ArgError::Bad("Invalid arguments"));
            }
            match args.len() {
                0 => Err(ArgError::Incomplete),
                1 | 2 => Ok(()),
                _ => Err(ArgError::Bad("Too many arguments")),
            }
        }
        Cmd::Id => check_id_args(args),
    }
}

/// `id = "ID" SP id-params-list`, `id-params-list = "(" *(string SP nstring) ")" / nil`
/// (RFC 2971; an empty list is accepted as some clients send it).
fn check_id_args(args: &[Token]) -> Result<(), ArgError> {
    let bad = Err(ArgError::Bad("Invalid ID parameters"));
    let Some(first) = args.first() else {
        return Err(ArgError::Incomplete);
    };
    if first.is_nil() {
        return if args.len() == 1 { Ok(()) } else { bad };
    }
    if !matches!(first, Token::Open) {
        return bad;
    }
    for (i, t) in args[1..].iter().enumerate() {
        let value = i % 2 == 1;
        match t {
            Token::Close if !value => {
                return if i + 2 == args.len() { Ok(()) } else { bad };
            }
            t if t.is_string() => {}
            t if value && t.is_nil() => {}
            _ => return bad,
        }
    }
    Err(ArgError::Incomplete)
}

/// A known outcome for a command that is still being read (its literals must be
/// consumed or refused before the answer is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doom {
    /// `* BAD text`: no usable tag.
    Untagged(&'static str),
    /// `tag BAD text`.
    Bad(&'static str),
    /// `tag NO text`.
    No(&'static str),
}

/// A command being read: the lines and literals seen so far.
#[derive(Default)]
struct Pending {
    /// The command's tag, once known to be valid.
    tag: Option<String>,
    /// The command, once known.
    cmd: Option<Cmd>,
    /// The arguments so far; the last one is being filled while `literal_left > 0`.
    args: Vec<Token>,
    /// Spacing state of the token reader between pieces.
    expect_sep: bool,
    /// Set once the command is known to fail; its arguments are then no longer kept.
    doom: Option<Doom>,
    /// Line bytes consumed for this command.
    line_used: usize,
    /// Literal bytes announced for this command.
    literal_used: usize,
    /// Literal bytes still to come.
    literal_left: usize,
}

impl Drop for Pending {
    fn drop(&mut self) {
        for t in &mut self.args {
            if let Some(v) = t.bytes_mut() {
                crate::proto::wipe(v);
            }
        }
    }
}

/// Shows the shape of the command only: its arguments may hold a password.
impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("tag", &self.tag)
            .field("cmd", &self.cmd)
            .field("args", &self.args.len())
            .field("doom", &self.doom)
            .field("literal_left", &self.literal_left)
            .finish()
    }
}

/// Where a SASL exchange stands (waiting for the client's next line).
#[derive(Debug)]
enum SaslStep {
    /// PLAIN, after the empty challenge.
    Plain,
    /// LOGIN, after `Username:`.
    LoginUser,
    /// LOGIN, after `Password:`.
    LoginPass {
        /// The user name given.
        user: String,
    },
}

#[derive(Debug)]
enum State {
    /// Between commands.
    Idle,
    /// Inside a command with literals.
    Command(Pending),
    /// Inside an AUTHENTICATE exchange.
    Sasl { tag: String, step: SaslStep },
    /// `Login` was asked for; waiting for `login_done`.
    AwaitLogin { tag: String },
    /// `StartTls` was asked for; waiting for `tls_established`.
    AwaitTls,
    /// The final OK is queued; the machine is finished.
    Authenticated,
    /// `Close` is queued; the machine is finished.
    Closed,
}

/// The client-facing IMAP pre-authentication machine. See the module documentation for
/// its input rules. Its `Debug` output never shows a password.
#[derive(Debug)]
pub struct ServerMachine {
    policy: ServerPolicy,
    state: State,
    tls_active: bool,
    commands: u32,
    auth_failures: u32,
    actions: VecDeque<Action>,
}

impl ServerMachine {
    /// A machine for a new connection; the greeting is queued at once.
    pub fn new(policy: ServerPolicy) -> ServerMachine {
        let mut m = ServerMachine {
            tls_active: policy.tls == ListenerTls::Implicit,
            policy,
            state: State::Idle,
            commands: 0,
            auth_failures: 0,
            actions: VecDeque::new(),
        };
        let host = sanitize_text(m.policy.hostname.as_bytes(), 255);
        let host = if host.is_empty() { "cutover" } else { &host };
        let greeting = format!("* OK [CAPABILITY {}] {host} ready.\r\n", m.capabilities());
        m.send(greeting.into_bytes());
        m
    }

    /// The capability list offered now (it changes with TLS).
    fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR LITERAL+ ID");
        if self.policy.tls == ListenerTls::StartTls && !self.tls_active {
            caps.push_str(" STARTTLS");
        }
        caps.push_str(if self.auth_allowed() {
            " AUTH=PLAIN AUTH=LOGIN"
        } else {
            " LOGINDISABLED"
        });
        caps
    }

    fn auth_allowed(&self) -> bool {
        self.tls_active || self.policy.allow_plaintext_auth
    }

    /// Queues bytes for the client, joined with bytes queued just before.
    fn send(&mut self, bytes: Vec<u8>) {
        if let Some(Action::Send(last)) = self.actions.back_mut() {
            last.extend_from_slice(&bytes);
        } else {
            self.actions.push_back(Action::Send(bytes));
        }
    }

    fn send_tagged(&mut self, tag: &str, status: &str, text: &str) {
        self.send(format!("{tag} {status} {text}\r\n").into_bytes());
    }

    /// `* BYE text` and Close; the machine is finished.
    fn bye(&mut self, text: &str) {
        self.send(format!("* BYE {text}\r\n").into_bytes());
        self.actions.push_back(Action::Close);
        self.state = State::Closed;
    }

    fn line_too_long(&mut self) {
        self.send(b"* BAD [TOOBIG] Line too long\r\n".to_vec());
        self.bye("Line too long");
    }

    /// Answers a command known to fail and returns to idle.
    fn reply_doom(&mut self, tag: Option<&str>, doom: Doom) {
        match (tag, doom) {
            (Some(tag), Doom::Bad(text)) => self.send_tagged(tag, "BAD", text),
            (Some(tag), Doom::No(text)) => self.send_tagged(tag, "NO", text),
            (_, Doom::Untagged(text) | Doom::Bad(text) | Doom::No(text)) => {
                self.send(format!("* BAD {text}\r\n").into_bytes())
            }
        }
        self.state = State::Idle;
    }

    /// A rejected login: `tag NO text`, counted; closes after too many.
    fn auth_failure(&mut self, tag: &str, text: &str) {
        self.send_tagged(tag, "NO", text);
        self.auth_failures = self.auth_failures.saturating_add(1);
        if self.auth_failures >= self.policy.limits.max_auth_failures {
            self.bye("Too many authentication failures");
        } else {
            self.state = State::Idle;
        }
    }

    /// Handles one line (or the rest of a line after a literal) of a command. Returns
    /// true when the command is over.
    fn piece(&mut self, mut p: Pending, content: &[u8], first: bool) -> bool {
        let (text, marker) = split_literal(content);
        if first {
            self.first_piece(&mut p, content, text, marker.is_some());
        } else if p.doom.is_none() {
            if let Err(e) = tokenize(text, &mut p.expect_sep, marker.is_some(), &mut p.args) {
                p.doom = Some(Doom::Bad(e));
            }
        }
        let Some(spec) = marker else {
            self.finish(p);
            return true;
        };
        if let (None, Some(cmd)) = (p.doom, p.cmd) {
            p.args.push(Token::Literal(Vec::new()));
            if let Err(ArgError::Bad(e)) = check_args(cmd, &p.args) {
                p.doom = Some(Doom::Bad(e));
            }
        }
        let budget = self.policy.limits.max_literal.saturating_sub(p.literal_used);
        let len = match usize::try_from(spec.len) {
            Ok(len) if len <= budget => Some(len),
            _ => None,
        };
        if spec.sync {
            // The client waits for our answer before sending the data: refuse now and
            // it sends nothing more for this command.
            if let Some(doom) = p.doom {
                self.reply_doom(p.tag.as_deref(), doom);
                return true;
            }
            let Some(len) = len else {
                let tag = p.tag.as_deref().unwrap_or("*");
                self.send_tagged(tag, "BAD", "[TOOBIG] Literal too large");
                self.state = State::Idle;
                return true;
            };
            self.send(CONTINUE_LITERAL.to_vec());
            self.await_literal(p, len);
            false
        } else {
            // The data follows regardless: read (or skip) it if it fits the bounds,
            // otherwise there is no way to find the next command.
            let Some(len) = len else {
                self.bye("[TOOBIG] Literal too large");
                return true;
            };
            self.await_literal(p, len);
            false
        }
    }

    fn await_literal(&mut self, mut p: Pending, len: usize) {
        if p.doom.is_none() {
            if let Some(last) = p.args.last_mut() {
                // Sized once: a password is never reallocated (and left unwiped).
                *last = Token::Literal(Vec::with_capacity(len));
            }
        }
        p.literal_left = len;
        p.literal_used += len;
        p.expect_sep = true;
        self.state = State::Command(p);
    }

    /// The first line of a command: tag, command name, and the arguments on that line.
    fn first_piece(&mut self, p: &mut Pending, content: &[u8], text: &[u8], literal: bool) {
        let tag_end = content
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or(content.len());
        let tag = &content[..tag_end];
        if !is_valid_tag(tag) {
            p.doom = Some(Doom::Untagged("Missing or invalid tag"));
            return;
        }
        p.tag = Some(String::from_utf8_lossy(tag).into_owned());
        // A valid tag has no `{`, so it ends before any literal marker.
        let rest = text.get(tag_end + 1..).unwrap_or_default();
        let lexed = tokenize(rest, &mut p.expect_sep, literal, &mut p.args);
        let name = match p.args.first() {
            Some(Token::Atom(_)) => p.args.remove(0),
            _ => {
                p.doom = Some(Doom::Bad(match lexed {
                    Err(e) => e,
                    Ok(()) => "Missing command",
                }));
                return;
            }
        };
        let Token::Atom(name) = &name else {
            return;
        };
        match Cmd::from_name(name) {
            Err(e) => p.doom = Some(Doom::Bad(e)),
            Ok(cmd @ (Cmd::Login | Cmd::Authenticate)) if !self.auth_allowed() => {
                p.cmd = Some(cmd);
                p.doom = Some(Doom::No(PRIVACY_REQUIRED));
            }
            Ok(cmd) => {
                p.cmd = Some(cmd);
                if let Err(e) = lexed {
                    p.doom = Some(Doom::Bad(e));
                }
            }
        }
    }

    /// The command is complete: answer or act on it.
    fn finish(&mut self, mut p: Pending) {
        let tag = p.tag.take();
        if let Some(doom) = p.doom {
            return self.reply_doom(tag.as_deref(), doom);
        }
        let (Some(tag), Some(cmd)) = (tag, p.cmd) else {
            // Unreachable: without a doom both are set; answer safely anyway.
            return self.reply_doom(None, Doom::Untagged("Invalid command"));
        };
        match check_args(cmd, &p.args) {
            Err(ArgError::Incomplete) => return self.reply_doom(Some(&tag), Doom::Bad("Missing arguments")),
            Err(ArgError::Bad(e)) => return self.reply_doom(Some(&tag), Doom::Bad(e)),
            Ok(()) => {}
        }
        self.state = State::Idle;
        match cmd {
            Cmd::Capability => {
                let caps = format!("* CAPABILITY {}\r\n", self.capabilities());
                self.send(caps.into_bytes());
                self.send_tagged(&tag, "OK", "CAPABILITY completed");
            }
            Cmd::Noop => self.send_tagged(&tag, "OK", "NOOP completed"),
            Cmd::Logout => {
                self.send(b"* BYE Logging out\r\n".to_vec());
                self.send_tagged(&tag, "OK", "LOGOUT completed");
                self.actions.push_back(Action::Close);
                self.state = State::Closed;
            }
            Cmd::Id => {
                self.send(b"* ID (\"name\" \"cutover\")\r\n".to_vec());
                self.send_tagged(&tag, "OK", "ID completed");
            }
            Cmd::StartTls => {
                if self.tls_active {
                    self.send_tagged(&tag, "BAD", "TLS is already active");
                } else if self.policy.tls != ListenerTls::StartTls {
                    self.send_tagged(&tag, "BAD", "STARTTLS is not available");
                } else {
                    self.send_tagged(&tag, "OK", "Begin TLS negotiation now");
                    self.actions.push_back(Action::StartTls);
                    self.state = State::AwaitTls;
                }
            }
            Cmd::Login => {
                let user = take_bytes(&mut p.args, 0);
                let pass = take_bytes(&mut p.args, 1);
                self.login(tag, &user, pass, Mechanism::Login);
            }
            Cmd::Authenticate => {
                let mech = take_bytes(&mut p.args, 0);
                let ir = p.args.get(1).is_some().then(|| take_bytes(&mut p.args, 1));
                self.authenticate(tag, &mech, ir);
            }
        }
    }

    /// Checks a user name and password and asks for the login.
    fn login(&mut self, tag: String, user: &[u8], mut pass: Vec<u8>, mechanism: Mechanism) {
        let user = match sasl::valid_user(user) {
            Some(user) if !pass.contains(&0) => user,
            _ => {
                crate::proto::wipe(&mut pass);
                return self.auth_failure(&tag, AUTH_FAILED);
            }
        };
        self.actions.push_back(Action::Login(Credentials {
            user,
            secret: Secret::new(pass),
            mechanism,
        }));
        self.state = State::AwaitLogin { tag };
    }

    fn authenticate(&mut self, tag: String, mech: &[u8], ir: Option<Vec<u8>>) {
        let step = if mech.eq_ignore_ascii_case(b"PLAIN") {
            SaslStep::Plain
        } else if mech.eq_ignore_ascii_case(b"LOGIN") {
            SaslStep::LoginUser
        } else {
            return self.send_tagged(&tag, "NO", "Unsupported authentication mechanism");
        };
        match ir {
            // RFC 4959: "=" is a zero-length initial response.
            Some(ir) if ir == b"=" => self.sasl_response(tag, step, Vec::new()),
            Some(ir) => match sasl::decode_base64(&ir) {
                Ok(data) => self.sasl_response(tag, step, data),
                Err(_) => self.send_tagged(&tag, "BAD", "Invalid base64 data"),
            },
            None => {
                self.send(match step {
                    SaslStep::LoginUser => PROMPT_USER.to_vec(),
                    _ => b"+ \r\n".to_vec(),
                });
                self.state = State::Sasl { tag, step };
            }
        }
    }

    /// A line from the client inside a SASL exchange.
    fn sasl_line(&mut self, tag: String, step: SaslStep, content: &[u8]) {
        if content == b"*" {
            self.send_tagged(&tag, "BAD", "Authentication cancelled");
            self.state = State::Idle;
            return;
        }
        match sasl::decode_base64(content) {
            Ok(data) => self.sasl_response(tag, step, data),
            Err(_) => {
                self.send_tagged(&tag, "BAD", "Invalid base64 data");
                self.state = State::Idle;
            }
        }
    }

    /// A decoded client response for `step`.
    fn sasl_response(&mut self, tag: String, step: SaslStep, mut data: Vec<u8>) {
        if data.len() > self.policy.limits.max_literal {
            crate::proto::wipe(&mut data);
            self.send_tagged(&tag, "BAD", "[TOOBIG] Authentication data too large");
            self.state = State::Idle;
            return;
        }
        match step {
            SaslStep::Plain => match sasl::parse_plain(data) {
                Ok(creds) => {
                    self.actions.push_back(Action::Login(creds));
                    self.state = State::AwaitLogin { tag };
                }
                Err(SaslError::ForeignAuthzid) => self.auth_failure(
                    &tag,
                    "[AUTHORIZATIONFAILED] Authorization identity must be the user's own",
                ),
                Err(_) => self.auth_failure(&tag, AUTH_FAILED),
            },
            SaslStep::LoginUser => match sasl::valid_user(&data) {
                Some(user) => {
                    self.send(PROMPT_PASS.to_vec());
                    self.state = State::Sasl {
                        tag,
                        step: SaslStep::LoginPass { user },
                    };
                }
                None => self.auth_failure(&tag, AUTH_FAILED),
            },
            SaslStep::LoginPass { user } => {
                self.login(tag, user.as_bytes(), data, Mechanism::Login)
            }
        }
    }
}

/// Moves the bytes of argument `i` out (leaving an empty vector behind).
fn take_bytes(args: &mut [Token], i: usize) -> Vec<u8> {
    args.get_mut(i)
        .and_then(Token::bytes_mut)
        .map(std::mem::take)
        .unwrap_or_default()
}

impl PreAuth for ServerMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        let max_line = self.policy.limits.max_line;
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match std::mem::replace(&mut self.state, State::Idle) {
                State::Idle => {
                    if rest.is_empty() {
                        return pos;
                    }
                    if self.commands >= self.policy.limits.max_commands {
                        self.bye("Too many commands");
                        return pos;
                    }
                    match find_line(rest, max_line) {
                        LineEnd::Incomplete => return pos,
                        LineEnd::TooLong => {
                            self.line_too_long();
                            return input.len();
                        }
                        LineEnd::Complete(n) => {
                            self.commands += 1;
                            pos += n;
                            let mut p = Pending::default();
                            p.line_used = n;
                            if self.piece(p, line_content(&rest[..n]), true) {
                                return pos;
                            }
                        }
                    }
                }
                State::Command(mut p) if p.literal_left > 0 => {
                    let take = p.literal_left.min(rest.len());
                    if take > 0 && p.doom.is_none() {
                        if let Some(Token::Literal(v)) = p.args.last_mut() {
                            v.extend_from_slice(&rest[..take]);
                        }
                    }
                    p.literal_left -= take;
                    pos += take;
                    self.state = State::Command(p);
                    if take == 0 {
                        return pos;
                    }
                }
                State::Command(mut p) => {
                    match find_line(rest, max_line.saturating_sub(p.line_used)) {
                        LineEnd::Incomplete => {
                            self.state = State::Command(p);
                            return pos;
                        }
                        LineEnd::TooLong => {
                            self.line_too_long();
                            return input.len();
                        }
                        LineEnd::Complete(n) => {
                            pos += n;
                            p.line_used += n;
                            if self.piece(p, line_content(&rest[..n]), false) {
                                return pos;
                            }
                        }
                    }
                }
                State::Sasl { tag, step } => match find_line(rest, max_line) {
                    LineEnd::Incomplete => {
                        self.state = State::Sasl { tag, step };
                        return pos;
                    }
                    LineEnd::TooLong => {
                        self.line_too_long();
                        return input.len();
                    }
                    LineEnd::Complete(n) => {
                        pos += n;
                        self.sasl_line(tag, step, line_content(&rest[..n]));
                        if !matches!(self.state, State::Sasl { .. }) {
                            return pos;
                        }
                    }
                },
                other => {
                    self.state = other;
                    return pos;
                }
            }
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn tls_established(&mut self) {
        if matches!(self.state, State::AwaitTls) {
            self.tls_active = true;
            self.state = State::Idle;
        }
    }

    fn login_done(&mut self, outcome: LoginOutcome) {
        let State::AwaitLogin { tag } = std::mem::replace(&mut self.state, State::Idle) else {
            // Not waiting for a login (e.g. closed meanwhile): nothing to answer.
            return;
        };
        match outcome {
            LoginOutcome::Ok { capabilities } => {
                let caps = capabilities
                    .filter(|c| c.len() <= MAX_CAPS_LEN)
                    .map(|c| sanitize_text(c.as_bytes(), MAX_CAPS_LEN))
                    .filter(|c| !c.is_empty() && !c.contains(['[', ']']));
                match caps {
                    Some(caps) => {
                        self.send_tagged(&tag, "OK", &format!("[CAPABILITY {caps}] Logged in"))
                    }
                    None => self.send_tagged(&tag, "OK", "Logged in"),
                }
                self.state = State::Authenticated;
            }
            LoginOutcome::AuthFailed { response } => {
                let text = response
                    .map(|r| sanitize_text(r.as_bytes(), MAX_RESPONSE_TEXT))
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| AUTH_FAILED.to_owned());
                self.auth_failure(&tag, &text);
            }
            LoginOutcome::Unavailable => self.send_tagged(
                &tag,
                "NO",
                "[UNAVAILABLE] Server temporarily unavailable, try again later.",
            ),
            LoginOutcome::Refused { reason } => {
                let reason = sanitize_text(reason.as_bytes(), MAX_RESPONSE_TEXT);
                self.auth_failure(&tag, &format!("[AUTHENTICATIONFAILED] {reason}"));
            }
        }
    }

    fn timed_out(&mut self) {
        if !matches!(self.state, State::Closed | State::Authenticated) {
            self.bye("Disconnected for inactivity.");
        }
    }

    fn shutting_down(&mut self) {
        if !matches!(self.state, State::Closed | State::Authenticated) {
            self.bye("[UNAVAILABLE] Server shutting down");
        }
    }

    fn phase(&self) -> Phase {
        match self.state {
            State::Command(_) | State::Sasl { .. } => Phase::Continuation,
            _ => Phase::PreAuth,
        }
    }

    fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated)
    }
}

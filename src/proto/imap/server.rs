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
//!   `max_line` bytes, its literals at most `max_literal` bytes together, and at most
//!   80 arguments are kept. Each SASL response line may be `max_line` bytes long, and
//!   decode to at most `max_literal` bytes.
//! * One `receive` call handles at most one command: it returns as soon as a command is
//!   finished, so pipelined commands stay in the driver's buffer. After `Login` or
//!   `StartTls` nothing is consumed until `login_done` or `tls_established`.
//! * Since the buffer only ever holds one partial line, the driver needs room for
//!   `max_line` bytes.
//! * When the machine closes on its own (line too long, too many commands) it consumes
//!   the whole input: nothing after it will be read anyway.
//! * Actions are only ever queued by a call that consumes bytes (or by the other
//!   events), so a driver that reads before draining again after a 0 misses nothing.
//!
//! # What counts
//! Every command line begun (valid or not) counts towards `max_commands`; the command
//! after the last allowed one gets `* BYE` and `Close`. SASL continuation lines and the
//! lines after a literal belong to their command. A rejected login counts towards
//! `max_auth_failures`: a backend rejection, a refused routing, and the rejections made
//! here (invalid user name, NUL in the password, and every SASL exchange the client's data
//! ended: invalid base64, a malformed PLAIN message, a foreign authorization identity; the
//! rule of [`crate::proto::sasl`], the same on all three protocols). `NO [UNAVAILABLE]`,
//! `NO [PRIVACYREQUIRED]`, cancelled exchanges, oversized SASL data and syntax errors do
//! not.

use std::collections::VecDeque;
use std::fmt;

use super::syntax::{is_valid_tag, split_literal, tokenize, Token};
use crate::proto::line::{next_line, Line};
use crate::proto::sasl::{self, SaslError, Step};
use crate::proto::text::sanitize;
use crate::proto::{
    Action, Credentials, ListenerTls, LoginOutcome, Mechanism, PreAuth, ServerPolicy,
};

/// The continuation request sent for a synchronizing literal.
const CONTINUE_LITERAL: &[u8] = b"+ Ready for literal data\r\n";
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

#[derive(Debug)]
enum State {
    /// Between commands.
    Idle,
    /// Inside a command with literals.
    Command(Pending),
    /// Inside an AUTHENTICATE exchange.
    Sasl {
        tag: String,
        exchange: sasl::Exchange,
    },
    /// `Login` was asked for; waiting for `login_done`.
    AwaitLogin { tag: String },
    /// The backend refused a token with an error challenge, which the client was sent:
    /// waiting for its answer (`AQ==` or an empty line), then the failure is said.
    Challenged {
        tag: String,
        response: Option<String>,
    },
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
        let host = sanitize(m.policy.hostname.as_bytes(), 255);
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
        if self.auth_allowed() {
            for m in self.policy.mechanisms.iter() {
                caps.push_str(" AUTH=");
                caps.push_str(m.sasl_name());
            }
        } else {
            caps.push_str(" LOGINDISABLED");
        }
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
        self.failed_attempt(tag, "NO", text);
    }

    /// A failed login attempt answered with `tag STATUS text` (NO, or BAD for data that
    /// is not even base64), counted; closes after too many.
    fn failed_attempt(&mut self, tag: &str, status: &str, text: &str) {
        self.send_tagged(tag, status, text);
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
        let budget = self
            .policy
            .limits
            .max_literal
            .saturating_sub(p.literal_used);
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
            Err(ArgError::Incomplete) => {
                return self.reply_doom(Some(&tag), Doom::Bad("Missing arguments"))
            }
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
        self.actions
            .push_back(Action::Login(Credentials::password(user, pass, mechanism)));
        self.state = State::AwaitLogin { tag };
    }

    fn authenticate(&mut self, tag: String, mech: &[u8], ir: Option<Vec<u8>>) {
        let limits = &self.policy.limits;
        let offered = self.policy.mechanisms;
        let exchange =
            sasl::Exchange::offered(mech, offered, limits.max_literal, limits.max_sasl_token);
        let Some(mut exchange) = exchange else {
            return self.send_tagged(&tag, "NO", "Unsupported authentication mechanism");
        };
        let step = exchange.begin(ir.as_deref());
        if let Some(mut ir) = ir {
            crate::proto::wipe(&mut ir);
        }
        self.sasl_step(tag, exchange, step);
    }

    /// A line from the client inside a SASL exchange.
    fn sasl_line(&mut self, tag: String, mut exchange: sasl::Exchange, content: &[u8]) {
        let step = exchange.respond(content);
        self.sasl_step(tag, exchange, step);
    }

    /// Says what the shared SASL exchange asks for, in IMAP's words.
    fn sasl_step(&mut self, tag: String, exchange: sasl::Exchange, step: Step) {
        match step {
            Step::Challenge(challenge) => {
                self.send(format!("+ {challenge}\r\n").into_bytes());
                self.state = State::Sasl { tag, exchange };
            }
            Step::Done(creds) => {
                self.actions.push_back(Action::Login(creds));
                self.state = State::AwaitLogin { tag };
            }
            Step::Cancelled => self.send_tagged(&tag, "BAD", "Authentication cancelled"),
            Step::TooBig => self.send_tagged(&tag, "BAD", "[TOOBIG] Authentication data too large"),
            Step::Failed(SaslError::Base64) => {
                self.failed_attempt(&tag, "BAD", "Invalid base64 data")
            }
            Step::Failed(SaslError::ForeignAuthzid) => self.auth_failure(
                &tag,
                "[AUTHORIZATIONFAILED] Authorization identity must be the user's own",
            ),
            Step::Failed(
                SaslError::Malformed | SaslError::InvalidUser | SaslError::MalformedToken,
            ) => self.auth_failure(&tag, AUTH_FAILED),
        }
    }
}

impl ServerMachine {
    /// The backend rejected the credentials: its text (response code included), else
    /// the standard one.
    fn backend_refused(&mut self, tag: &str, response: Option<String>) {
        let text = response
            .map(|r| sanitize(r.as_bytes(), MAX_RESPONSE_TEXT))
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| AUTH_FAILED.to_owned());
        self.auth_failure(tag, &text);
    }

    /// The longest command line accepted between commands: `max_line`, or, while an
    /// OAuth mechanism may be used, room for a token as initial response.
    fn idle_line_bound(&self) -> usize {
        let limits = &self.policy.limits;
        if self.policy.mechanisms.has_tokens() && self.auth_allowed() {
            limits.max_line.max(
                limits
                    .max_sasl_token
                    .saturating_add(MAX_AUTHENTICATE_PREFIX),
            )
        } else {
            limits.max_line
        }
    }
}

/// Room for `tag AUTHENTICATE MECHANISM ` and CRLF in front of an OAuth initial response.
const MAX_AUTHENTICATE_PREFIX: usize = 128;

/// Whether a command line is an AUTHENTICATE command (only those may be longer than
/// `max_line`, to carry a token).
fn is_authenticate(line: &[u8]) -> bool {
    let mut words = line.splitn(3, |b| *b == b' ');
    words.next();
    words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case(b"AUTHENTICATE"))
}

/// Moves the bytes of argument `i` out (leaving an empty vector behind).
fn take_bytes(args: &mut [Token], i: usize) -> Vec<u8> {
    args.get_mut(i)
        .and_then(Token::bytes_mut)
        .map(std::mem::take)
        .unwrap_or_default()
}

/// What one state made of the input at hand.
enum Fed {
    /// Consumed this many bytes; the next state goes on with the rest.
    More(usize),
    /// Consumed this many bytes; wait for more input (or an action's outcome).
    Wait(usize),
    /// Closing: the rest is dropped. Consuming it also tells a driver that only drains
    /// after progress to drain now.
    Drop,
}

impl Fed {
    /// A command line (or the piece after a literal) of `len` bytes was handled; `stop`:
    /// the command is complete, or the machine waits.
    fn after_piece(len: usize, stop: bool) -> Fed {
        if stop {
            Fed::Wait(len)
        } else {
            Fed::More(len)
        }
    }
}

impl ServerMachine {
    /// Between commands: the next command line.
    fn receive_idle(&mut self, rest: &[u8]) -> Fed {
        if rest.is_empty() {
            return Fed::Wait(0);
        }
        if self.commands >= self.policy.limits.max_commands {
            self.bye("Too many commands");
            return Fed::Drop;
        }
        match next_line(rest, self.idle_line_bound()) {
            Line::Incomplete => Fed::Wait(0),
            Line::TooLong => self.drop_long_line(),
            Line::Complete { content, len }
                if len > self.policy.limits.max_line && !is_authenticate(content) =>
            {
                self.drop_long_line()
            }
            Line::Complete { content, len } => {
                self.commands += 1;
                let mut p = Pending::default();
                p.line_used = len;
                Fed::after_piece(len, self.piece(p, content, true))
            }
        }
    }

    /// Inside a command: the rest of a literal.
    fn receive_literal(&mut self, mut p: Pending, rest: &[u8]) -> Fed {
        let take = p.literal_left.min(rest.len());
        if take > 0 && p.doom.is_none() {
            if let Some(Token::Literal(v)) = p.args.last_mut() {
                v.extend_from_slice(&rest[..take]);
            }
        }
        p.literal_left -= take;
        self.state = State::Command(p);
        if take == 0 {
            Fed::Wait(0)
        } else {
            Fed::More(take)
        }
    }

    /// Inside a command: the line after a literal.
    fn receive_command_line(&mut self, mut p: Pending, rest: &[u8]) -> Fed {
        let bound = self.policy.limits.max_line.saturating_sub(p.line_used);
        match next_line(rest, bound) {
            Line::Incomplete => {
                self.state = State::Command(p);
                Fed::Wait(0)
            }
            Line::TooLong => self.drop_long_line(),
            Line::Complete { content, len } => {
                p.line_used += len;
                Fed::after_piece(len, self.piece(p, content, false))
            }
        }
    }

    /// After an error challenge: whatever the client answers, the backend has said no.
    fn receive_challenge_answer(
        &mut self,
        tag: String,
        response: Option<String>,
        rest: &[u8],
    ) -> Fed {
        match next_line(rest, self.policy.limits.max_line) {
            Line::Incomplete => {
                self.state = State::Challenged { tag, response };
                Fed::Wait(0)
            }
            Line::TooLong => self.drop_long_line(),
            Line::Complete { len, .. } => {
                self.backend_refused(&tag, response);
                Fed::Wait(len)
            }
        }
    }

    /// An `AUTHENTICATE` exchange: the client's next response line.
    fn receive_sasl_line(&mut self, tag: String, exchange: sasl::Exchange, rest: &[u8]) -> Fed {
        match next_line(rest, exchange.max_line(self.policy.limits.max_line)) {
            Line::Incomplete => {
                self.state = State::Sasl { tag, exchange };
                Fed::Wait(0)
            }
            Line::TooLong => self.drop_long_line(),
            Line::Complete { content, len } => {
                self.sasl_line(tag, exchange, content);
                if matches!(self.state, State::Sasl { .. }) {
                    Fed::More(len)
                } else {
                    Fed::Wait(len)
                }
            }
        }
    }

    fn drop_long_line(&mut self) -> Fed {
        self.line_too_long();
        Fed::Drop
    }
}

impl PreAuth for ServerMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            let fed = match std::mem::replace(&mut self.state, State::Idle) {
                State::Idle => self.receive_idle(rest),
                State::Command(p) if p.literal_left > 0 => self.receive_literal(p, rest),
                State::Command(p) => self.receive_command_line(p, rest),
                State::Challenged { tag, response } => {
                    self.receive_challenge_answer(tag, response, rest)
                }
                State::Sasl { tag, exchange } => self.receive_sasl_line(tag, exchange, rest),
                other => {
                    self.state = other;
                    Fed::Wait(0)
                }
            };
            match fed {
                Fed::More(n) => pos += n,
                Fed::Wait(n) => return pos + n,
                Fed::Drop => return input.len(),
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
                    .map(|c| sanitize(c.as_bytes(), MAX_CAPS_LEN))
                    .filter(|c| !c.is_empty() && !c.contains(['[', ']']));
                match caps {
                    Some(caps) => {
                        self.send_tagged(&tag, "OK", &format!("[CAPABILITY {caps}] Logged in"))
                    }
                    None => self.send_tagged(&tag, "OK", "Logged in"),
                }
                self.state = State::Authenticated;
            }
            LoginOutcome::AuthFailed { response } => self.backend_refused(&tag, response),
            LoginOutcome::Challenged {
                challenge,
                response,
            } => {
                // RFC 7628 3.2.2: the error challenge, then the client's dummy response.
                let challenge = sanitize(challenge.as_bytes(), self.policy.limits.max_sasl_token);
                self.send(format!("+ {challenge}\r\n").into_bytes());
                self.state = State::Challenged { tag, response };
            }
            LoginOutcome::Unavailable => self.send_tagged(
                &tag,
                "NO",
                "[UNAVAILABLE] Server temporarily unavailable, try again later.",
            ),
            LoginOutcome::Refused { reason } => {
                let reason = sanitize(reason.as_bytes(), MAX_RESPONSE_TEXT);
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

    fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::drive::{self, LoginSeen, ServerDriver, TlsInput};
    use crate::proto::Limits;

    const HOST: &str = "imap.example";
    const CAPS_PLAIN: &str = "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED";
    const CAPS_TLS: &str = "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN";
    const PLUS: &str = "+ Ready for literal data\r\n";
    const FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.\r\n";

    fn policy(tls: ListenerTls, allow_plaintext_auth: bool) -> ServerPolicy {
        ServerPolicy {
            tls,
            allow_plaintext_auth,
            limits: Limits::default(),
            hostname: HOST.into(),
            mechanisms: Default::default(),
        }
    }

    /// TLS from the start: authentication allowed.
    fn tls() -> ServerPolicy {
        policy(ListenerTls::Implicit, false)
    }

    fn greeting(caps: &str) -> String {
        format!("* OK [CAPABILITY {caps}] {HOST} ready.\r\n")
    }

    fn ok_caps() -> LoginOutcome {
        LoginOutcome::Ok {
            capabilities: Some("IMAP4rev1 IDLE".into()),
        }
    }

    fn failed() -> LoginOutcome {
        LoginOutcome::AuthFailed { response: None }
    }

    /// What a driver saw, in order: the generic driver's transcript with the output as
    /// text and no markers.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Transcript {
        /// Everything sent to the client.
        out: String,
        /// Logins asked for: user, password, mechanism.
        logins: Vec<LoginSeen>,
        /// Handshakes asked for.
        starttls: usize,
        closed: bool,
        authenticated: bool,
        /// What the driver's buffer still held at the end.
        left: Vec<u8>,
    }

    impl From<&drive::Transcript> for Transcript {
        fn from(t: &drive::Transcript) -> Self {
            Transcript {
                out: t.text(),
                logins: t.logins.clone(),
                starttls: t.starttls,
                closed: t.closed,
                authenticated: t.authenticated,
                left: t.left.clone(),
            }
        }
    }

    /// The generic driver, answering logins from a list of outcomes (then `AuthFailed`),
    /// refusing plaintext pipelined behind STARTTLS.
    struct Driver(ServerDriver<'static, ServerMachine>);

    impl Driver {
        fn new(policy: ServerPolicy, outcomes: Vec<LoginOutcome>) -> Driver {
            let m = ServerMachine::new(policy);
            Driver(
                ServerDriver::scripted(m, &outcomes, failed())
                    .markers(false)
                    .tls_input(TlsInput::Refuse),
            )
        }

        fn feed(&mut self, chunk: &[u8]) -> &mut Self {
            self.0.feed(chunk);
            self
        }

        fn t(&self) -> Transcript {
            self.0.transcript().into()
        }

        fn out(&self) -> String {
            self.0.transcript().text()
        }
    }

    fn transcript(
        policy: &ServerPolicy,
        chunks: &[&[u8]],
        outcomes: &[LoginOutcome],
    ) -> Transcript {
        let mut d = Driver::new(policy.clone(), outcomes.to_vec());
        for c in chunks {
            d.feed(c);
        }
        d.t()
    }

    /// The same transcript whether the input comes at once, cut in two anywhere, or one
    /// byte at a time.
    fn assert_split_invariant(
        policy: &ServerPolicy,
        input: &[u8],
        outcomes: &[LoginOutcome],
    ) -> Transcript {
        let whole = transcript(policy, &[input], outcomes);
        for cut in 0..=input.len() {
            let t = transcript(policy, &[&input[..cut], &input[cut..]], outcomes);
            assert_eq!(t, whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(transcript(policy, &bytes, outcomes), whole, "byte by byte");
        whole
    }

    fn login(user: &str, pass: &[u8], mechanism: Mechanism) -> LoginSeen {
        (user.into(), pass.to_vec(), mechanism.as_str())
    }

    #[test]
    fn greeting_and_capabilities_before_and_after_starttls() {
        let mut d = Driver::new(policy(ListenerTls::StartTls, false), vec![]);
        d.feed(b"a CAPABILITY\r\nb STARTTLS\r\n");
        assert_eq!(d.t().starttls, 1);
        d.feed(b"c CAPABILITY\r\n");
        assert_eq!(
            d.out(),
            format!(
                "{}* CAPABILITY {CAPS_PLAIN}\r\na OK CAPABILITY completed\r\n\
                 b OK Begin TLS negotiation now\r\n\
                 * CAPABILITY {CAPS_TLS}\r\nc OK CAPABILITY completed\r\n",
                greeting(CAPS_PLAIN)
            )
        );
    }

    #[test]
    fn greetings_per_policy() {
        let cases = [
            (policy(ListenerTls::Implicit, false), CAPS_TLS),
            (
                policy(ListenerTls::None, false),
                "IMAP4rev1 SASL-IR LITERAL+ ID LOGINDISABLED",
            ),
            (policy(ListenerTls::None, true), CAPS_TLS),
            (
                policy(ListenerTls::StartTls, true),
                "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS AUTH=PLAIN AUTH=LOGIN",
            ),
        ];
        for (p, caps) in cases {
            let mut m = ServerMachine::new(p);
            assert_eq!(
                m.poll_action(),
                Some(Action::Send(greeting(caps).into_bytes()))
            );
            assert_eq!(m.poll_action(), None);
            assert!(!m.is_authenticated());
        }
        let mut p = tls();
        p.hostname = "evil\r\n* BYE x".into();
        let mut m = ServerMachine::new(p);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(
                format!("* OK [CAPABILITY {CAPS_TLS}] evil * BYE x ready.\r\n").into_bytes()
            ))
        );
    }

    #[test]
    fn starttls_consumes_only_its_own_line() {
        let mut m = ServerMachine::new(policy(ListenerTls::StartTls, false));
        m.poll_action();
        let input = b"a STARTTLS\r\nb LOGIN joe pw\r\n";
        assert_eq!(m.receive(input), 12);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(b"a OK Begin TLS negotiation now\r\n".to_vec()))
        );
        assert_eq!(m.poll_action(), Some(Action::StartTls));
        assert_eq!(m.poll_action(), None);
        assert_eq!(m.receive(&input[12..]), 0);
        assert_eq!(m.receive(b"c NOOP\r\n"), 0);
        m.tls_established();
        assert_eq!(m.receive(b"c NOOP\r\n"), 8);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(b"c OK NOOP completed\r\n".to_vec()))
        );

        // The driver model refuses what was pipelined behind it.
        let t = transcript(&policy(ListenerTls::StartTls, false), &[input], &[]);
        assert!(t
            .out
            .ends_with("a OK Begin TLS negotiation now\r\n<plaintext after STARTTLS: closed>"));
        assert!(t.logins.is_empty());
    }

    #[test]
    fn starttls_refused_when_not_offered() {
        let t = transcript(&tls(), &[b"a STARTTLS\r\n"], &[]);
        assert_eq!(
            t.out,
            format!("{}a BAD TLS is already active\r\n", greeting(CAPS_TLS))
        );
        let p = policy(ListenerTls::None, true);
        let t = transcript(&p, &[b"a STARTTLS\r\n"], &[]);
        assert_eq!(
            t.out,
            format!("{}a BAD STARTTLS is not available\r\n", greeting(CAPS_TLS))
        );
        let p = policy(ListenerTls::StartTls, false);
        let t = transcript(
            &p,
            &[b"a STARTTLS\r\n", b"b STARTTLS\r\n", b"c STARTTLS now\r\n"],
            &[],
        );
        assert_eq!(t.starttls, 1);
        assert!(t.out.ends_with(
            "a OK Begin TLS negotiation now\r\nb BAD TLS is already active\r\nc BAD Unexpected arguments\r\n"
        ));
    }

    #[test]
    fn login_with_atoms() {
        let t = transcript(&tls(), &[b"a1 LOGIN joe s3cret\r\n"], &[ok_caps()]);
        assert_eq!(
            t.out,
            format!(
                "{}a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.logins, [login("joe", b"s3cret", Mechanism::Login)]);
        assert!(t.authenticated);
        let t = transcript(&tls(), &[b"A1 login JOE@x.org p]a+ss\r\n"], &[ok_caps()]);
        assert_eq!(t.logins, [login("JOE@x.org", b"p]a+ss", Mechanism::Login)]);
    }

    #[test]
    fn login_with_quoted_strings() {
        let t = transcript(
            &tls(),
            &[br#"a1 LOGIN "jo\"e" "p\\ss word""#, b"\r\n"],
            &[LoginOutcome::Ok { capabilities: None }],
        );
        assert_eq!(t.logins, [login("jo\"e", br"p\ss word", Mechanism::Login)]);
        assert!(t.out.ends_with("a1 OK Logged in\r\n"));
        let t = transcript(
            &tls(),
            &["a1 LOGIN \"jöe\" \"pässword\"\r\n".as_bytes()],
            &[ok_caps()],
        );
        assert_eq!(
            t.logins,
            [login("jöe", "pässword".as_bytes(), Mechanism::Login)]
        );
    }

    #[test]
    fn login_with_synchronizing_literals() {
        let mut m = ServerMachine::new(tls());
        m.poll_action();
        assert_eq!(m.receive(b"a1 LOGIN {3}\r\n"), 14);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(PLUS.as_bytes().to_vec()))
        );
        assert_eq!(m.receive(b"jo"), 2);
        assert_eq!(m.receive(b"e {6}"), 1);
        assert_eq!(m.poll_action(), None);
        assert_eq!(m.receive(b" {6}\r\n"), 6);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(PLUS.as_bytes().to_vec()))
        );
        assert_eq!(m.receive(b"s3cret\r\nrest"), 8);
        let Some(Action::Login(c)) = m.poll_action() else {
            panic!("expected a login")
        };
        assert_eq!(
            (c.user.as_str(), c.secret().unwrap().expose()),
            ("joe", &b"s3cret"[..])
        );

        let t = transcript(
            &tls(),
            &[b"a1 LOGIN {3}\r\n", b"joe {6}\r\n", b"s3cret\r\n"],
            &[ok_caps()],
        );
        assert_eq!(
            t.out,
            format!(
                "{}{PLUS}{PLUS}a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.logins, [login("joe", b"s3cret", Mechanism::Login)]);
    }

    #[test]
    fn literal_data_is_never_read_as_commands() {
        let t = transcript(
            &tls(),
            &[b"a LOGIN {3}\r\nj o {12}\r\nb LOGOUT\r\n\"{\r\nz NOOP\r\n"],
            &[ok_caps()],
        );
        assert_eq!(
            t.logins,
            [login("j o", b"b LOGOUT\r\n\"{", Mechanism::Login)]
        );
        assert!(t.authenticated);
        assert_eq!(t.left, b"z NOOP\r\n");
        // Skipped data of a command already refused is not read either.
        let t = transcript(&tls(), &[b"a FOO {10+}\r\nb LOGOUT\r\n\r\nc NOOP\r\n"], &[]);
        assert_eq!(
            t.out,
            format!(
                "{}a BAD Unknown command\r\nc OK NOOP completed\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert!(!t.closed);
    }

    #[test]
    fn synchronizing_literal_over_the_limit_gets_no_continuation() {
        let t = transcript(&tls(), &[b"a LOGIN {8193}\r\n", b"b NOOP\r\n"], &[]);
        assert_eq!(
            t.out,
            format!(
                "{}a BAD [TOOBIG] Literal too large\r\nb OK NOOP completed\r\n",
                greeting(CAPS_TLS)
            )
        );
        let t = transcript(&tls(), &[b"a LOGIN {99999999999999999999999}\r\n"], &[]);
        assert!(t.out.ends_with("a BAD [TOOBIG] Literal too large\r\n"));
        assert!(!t.out.contains(PLUS));
        // The literals of one command share the budget.
        let mut input = b"a LOGIN {5000}\r\n".to_vec();
        input.extend_from_slice(&[b'u'; 5000]);
        input.extend_from_slice(b" {4000}\r\n");
        let t = transcript(&tls(), &[&input], &[]);
        assert_eq!(
            t.out,
            format!(
                "{}{PLUS}a BAD [TOOBIG] Literal too large\r\n",
                greeting(CAPS_TLS)
            )
        );
        // Exactly at the limit is fine.
        let mut input = b"a LOGIN joe {8192}\r\n".to_vec();
        input.extend_from_slice(&[b'p'; 8192]);
        input.extend_from_slice(b"\r\n");
        let t = transcript(&tls(), &[&input], &[]);
        assert_eq!(t.logins.len(), 1);
        assert_eq!(t.logins[0].1.len(), 8192);
    }

    #[test]
    fn non_synchronizing_literals() {
        let t = transcript(
            &tls(),
            &[b"a1 LOGIN {3+}\r\njoe {6+}\r\ns3cret\r\n"],
            &[ok_caps()],
        );
        assert_eq!(
            t.out,
            format!(
                "{}a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.logins, [login("joe", b"s3cret", Mechanism::Login)]);
        // A mix of both kinds, and an empty literal.
        let t = transcript(&tls(), &[b"a1 LOGIN {0}\r\n {6+}\r\ns3cret\r\n"], &[]);
        assert_eq!(t.out, format!("{}{PLUS}a1 {FAILED}", greeting(CAPS_TLS)));
        assert!(t.logins.is_empty());
    }

    #[test]
    fn non_synchronizing_literal_over_the_limit_closes() {
        let mut m = ServerMachine::new(tls());
        m.poll_action();
        let input = b"a1 LOGIN {9000+}\r\nxxxxxxxx";
        assert_eq!(m.receive(input), 18);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(
                b"* BYE [TOOBIG] Literal too large\r\n".to_vec()
            ))
        );
        assert_eq!(m.poll_action(), Some(Action::Close));
        assert_eq!(m.receive(&input[18..]), 0);
    }

    #[test]
    fn authenticate_plain() {
        let creds = login("joe", b"s3cret", Mechanism::Plain);
        // SASL-IR.
        let t = transcript(
            &tls(),
            &[b"a AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n"],
            &[ok_caps()],
        );
        assert_eq!(
            t.out,
            format!(
                "{}a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.logins, std::slice::from_ref(&creds));
        // Continuation.
        let t = transcript(
            &tls(),
            &[b"a authenticate plain\r\n", b"AGpvZQBzM2NyZXQ=\r\n"],
            &[ok_caps()],
        );
        assert_eq!(
            t.out,
            format!(
                "{}+ \r\na OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.logins, std::slice::from_ref(&creds));
        // Authorization identity equal to the user.
        let ir = sasl::encode_base64(b"joe\0joe\0s3cret");
        let t = transcript(
            &tls(),
            &[format!("a AUTHENTICATE PLAIN {ir}\r\n").as_bytes()],
            &[],
        );
        assert_eq!(t.logins, [creds]);
    }

    #[test]
    fn authenticate_plain_failures() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"a AUTHENTICATE PLAIN\r\n*\r\n",
                "+ \r\na BAD Authentication cancelled\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN =\r\n",
                "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN\r\n\r\n",
                "+ \r\na NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN !!!!\r\n",
                "a BAD Invalid base64 data\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN\r\n%%%%\r\n",
                "+ \r\na BAD Invalid base64 data\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN AGpvZQ\r\n",
                "a BAD Invalid base64 data\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN YWRtaW4Aam9lAHB3\r\n",
                "a NO [AUTHORIZATIONFAILED] Authorization identity must be the user's own\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN AGpvZQ==\r\n",
                "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN AGpvCmUAcHc=\r\n",
                "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            ),
            (
                b"a AUTHENTICATE CRAM-MD5\r\n",
                "a NO Unsupported authentication mechanism\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN \"AGpvZQBzM2NyZXQ=\"\r\n",
                "a BAD Invalid arguments\r\n",
            ),
            (
                b"a AUTHENTICATE PLAIN a b\r\n",
                "a BAD Too many arguments\r\n",
            ),
            (b"a AUTHENTICATE\r\n", "a BAD Missing arguments\r\n"),
        ];
        for (input, reply) in cases {
            let t = assert_split_invariant(&tls(), input, &[]);
            assert_eq!(
                t.out,
                format!("{}{reply}", greeting(CAPS_TLS)),
                "{}",
                String::from_utf8_lossy(input)
            );
            assert!(t.logins.is_empty());
            assert!(!t.closed);
        }
        // Base64 of "admin\0joe\0pw", as used above.
        assert_eq!(sasl::encode_base64(b"admin\0joe\0pw"), "YWRtaW4Aam9lAHB3");
    }

    #[test]
    fn authenticate_login() {
        let mut d = Driver::new(tls(), vec![ok_caps()]);
        d.feed(b"a AUTHENTICATE LOGIN\r\n");
        d.feed(b"am9l\r\n").feed(b"czNjcmV0\r\n");
        assert_eq!(
            d.out(),
            format!(
                "{}+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\na OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(d.t().logins, [login("joe", b"s3cret", Mechanism::Login)]);
        // User name as initial response.
        let t = transcript(
            &tls(),
            &[b"a AUTHENTICATE LOGIN am9l\r\nczNjcmV0\r\n"],
            &[ok_caps()],
        );
        assert!(t
            .out
            .ends_with("+ UGFzc3dvcmQ6\r\na OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"));
        assert_eq!(t.logins, [login("joe", b"s3cret", Mechanism::Login)]);
        // Cancelled at the password, empty password refused here? No: an empty password is
        // a valid (if unlikely) password; the backend decides.
        let t = transcript(&tls(), &[b"a AUTHENTICATE LOGIN am9l\r\n*\r\n"], &[]);
        assert!(t
            .out
            .ends_with("+ UGFzc3dvcmQ6\r\na BAD Authentication cancelled\r\n"));
        let t = transcript(&tls(), &[b"a AUTHENTICATE LOGIN am9l\r\n\r\n"], &[]);
        assert_eq!(t.logins, [login("joe", b"", Mechanism::Login)]);
        // Empty user name.
        let t = transcript(&tls(), &[b"a AUTHENTICATE LOGIN =\r\n"], &[]);
        assert!(t.out.ends_with(&format!("a {FAILED}")));
        assert!(t.logins.is_empty());
    }

    #[test]
    fn authentication_requires_tls() {
        let p = policy(ListenerTls::StartTls, false);
        let input = b"a LOGIN joe pw\r\n\
            b AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n\
            c LOGIN {3}\r\n\
            d LOGIN {3+}\r\njoe pw\r\n\
            e authenticate login\r\n\
            f ID NIL\r\n";
        let t = assert_split_invariant(&p, input, &[]);
        let no = "NO [PRIVACYREQUIRED] Plaintext authentication is disabled.\r\n";
        assert_eq!(
            t.out,
            format!(
                "{}a {no}b {no}c {no}d {no}e {no}* ID (\"name\" \"cutover\")\r\nf OK ID completed\r\n",
                greeting(CAPS_PLAIN)
            )
        );
        assert!(t.logins.is_empty());
        assert!(!t.closed, "not counted as failed logins");
        // The same after STARTTLS logs in.
        let t = transcript(
            &p,
            &[b"a STARTTLS\r\n", b"b LOGIN joe pw\r\n"],
            &[ok_caps()],
        );
        assert_eq!(t.logins, [login("joe", b"pw", Mechanism::Login)]);
        assert!(t.authenticated);
    }

    #[test]
    fn id_command() {
        const ID: &str = "* ID (\"name\" \"cutover\")\r\n";
        let cases: &[(&[u8], String)] = &[
            (
                b"a ID (\"name\" \"Thunderbird\" \"version\" NIL)\r\n",
                format!("{ID}a OK ID completed\r\n"),
            ),
            (b"a ID NIL\r\n", format!("{ID}a OK ID completed\r\n")),
            (b"a id nil\r\n", format!("{ID}a OK ID completed\r\n")),
            (b"a ID ()\r\n", format!("{ID}a OK ID completed\r\n")),
            (
                b"a ID (\"name\" {3}\r\nfoo)\r\n",
                format!("{PLUS}{ID}a OK ID completed\r\n"),
            ),
            (
                b"a ID (\"name\")\r\n",
                "a BAD Invalid ID parameters\r\n".into(),
            ),
            (
                b"a ID (name \"x\")\r\n",
                "a BAD Invalid ID parameters\r\n".into(),
            ),
            (
                b"a ID (\"a\" \"b\") x\r\n",
                "a BAD Invalid ID parameters\r\n".into(),
            ),
            (
                b"a ID ((\"a\" \"b\"))\r\n",
                "a BAD Invalid ID parameters\r\n".into(),
            ),
            (
                b"a ID NIL NIL\r\n",
                "a BAD Invalid ID parameters\r\n".into(),
            ),
            (b"a ID\r\n", "a BAD Missing arguments\r\n".into()),
            (b"a ID (\"a\"\r\n", "a BAD Missing arguments\r\n".into()),
            (b"a ID {3}\r\n", "a BAD Invalid ID parameters\r\n".into()),
        ];
        for (input, reply) in cases {
            let t = assert_split_invariant(&policy(ListenerTls::StartTls, false), input, &[]);
            assert_eq!(
                t.out,
                format!("{}{reply}", greeting(CAPS_PLAIN)),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn bad_commands() {
        let long_tag = "x".repeat(65);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"a FOO\r\n".to_vec(), "a BAD Unknown command\r\n"),
            (
                b"a SELECT INBOX\r\n".to_vec(),
                "a BAD Command not permitted before login\r\n",
            ),
            (
                b"a uid fetch 1 body[]\r\n".to_vec(),
                "a BAD Command not permitted before login\r\n",
            ),
            (b"+ NOOP\r\n".to_vec(), "* BAD Missing or invalid tag\r\n"),
            (b"* NOOP\r\n".to_vec(), "* BAD Missing or invalid tag\r\n"),
            (b"a+b NOOP\r\n".to_vec(), "* BAD Missing or invalid tag\r\n"),
            (
                format!("{long_tag} NOOP\r\n").into_bytes(),
                "* BAD Missing or invalid tag\r\n",
            ),
            (b"\r\n".to_vec(), "* BAD Missing or invalid tag\r\n"),
            (b" a NOOP\r\n".to_vec(), "* BAD Missing or invalid tag\r\n"),
            (b"a\r\n".to_vec(), "a BAD Missing command\r\n"),
            (b"a \r\n".to_vec(), "a BAD Missing command\r\n"),
            (b"a  NOOP\r\n".to_vec(), "a BAD Unexpected space\r\n"),
            (b"a \"NOOP\"\r\n".to_vec(), "a BAD Missing command\r\n"),
            (
                b"a NOOP extra\r\n".to_vec(),
                "a BAD Unexpected arguments\r\n",
            ),
            (b"a NOOP \r\n".to_vec(), "a BAD Trailing space\r\n"),
            (b"a LOGIN joe\r\n".to_vec(), "a BAD Missing arguments\r\n"),
            (
                b"a LOGIN a b c\r\n".to_vec(),
                "a BAD Too many arguments\r\n",
            ),
            (b"a LOGIN (a) b\r\n".to_vec(), "a BAD Invalid arguments\r\n"),
            (
                b"a LOGIN \"joe\r\n".to_vec(),
                "a BAD Unterminated quoted string\r\n",
            ),
            (
                b"a LOGIN \"j\\oe\" x\r\n".to_vec(),
                "a BAD Invalid escape in quoted string\r\n",
            ),
            (
                b"a LOGIN joe\"x\" y\r\n".to_vec(),
                "a BAD Missing space between arguments\r\n",
            ),
            (
                b"a LOGIN jo\x01e x\r\n".to_vec(),
                "a BAD Missing space between arguments\r\n",
            ),
            (
                b"a LOGIN \x01 x\r\n".to_vec(),
                "a BAD Invalid character\r\n",
            ),
            (b"a FOO {3}\r\n".to_vec(), "a BAD Unknown command\r\n"),
            (
                b"a LOGIN a b {3}\r\n".to_vec(),
                "a BAD Too many arguments\r\n",
            ),
            (
                b"a LOGIN{3}\r\n".to_vec(),
                "a BAD A literal must follow a space or a parenthesis\r\n",
            ),
            (b"a NOOP {3}\r\n".to_vec(), "a BAD Unexpected arguments\r\n"),
            (b"a{3}\r\n".to_vec(), "* BAD Missing or invalid tag\r\n"),
            (
                b"a LOGIN {3+}\r\njoe{3+}\r\npw!\r\n".to_vec(),
                "a BAD A literal must follow a space or a parenthesis\r\n",
            ),
            (
                b"a LOGIN {3+}\r\njoe\r\n".to_vec(),
                "a BAD Missing arguments\r\n",
            ),
            (
                b"a LOGIN {3+}\r\njoepw\r\n".to_vec(),
                "a BAD Missing space between arguments\r\n",
            ),
        ];
        for (input, reply) in cases {
            let t = assert_split_invariant(&tls(), &input, &[]);
            assert_eq!(
                t.out,
                format!("{}{reply}", greeting(CAPS_TLS)),
                "{}",
                String::from_utf8_lossy(&input)
            );
            assert!(t.logins.is_empty());
            assert!(!t.closed);
            assert!(t.left.is_empty());
        }
    }

    #[test]
    fn invalid_credentials_never_reach_login() {
        let cases: &[&[u8]] = &[
            b"a LOGIN \"\" pw\r\n",
            b"a LOGIN {5+}\r\njo\r\ne pw\r\n",
            b"a LOGIN {3+}\r\n\xffoe pw\r\n",
            b"a LOGIN \xffoe pw\r\n",
            b"a LOGIN {4+}\r\njo\0e pw\r\n",
            b"a LOGIN joe {3+}\r\np\0w\r\n",
            b"a AUTHENTICATE LOGIN am8Kbw==\r\n",
            b"a AUTHENTICATE LOGIN am9l\r\ncAB3\r\n",
        ];
        for input in cases {
            let t = assert_split_invariant(&tls(), input, &[]);
            assert!(t.logins.is_empty(), "{}", String::from_utf8_lossy(input));
            assert!(t.out.ends_with(&format!("a {FAILED}")), "{}", t.out);
        }
    }

    #[test]
    fn too_many_authentication_failures() {
        let p = policy(ListenerTls::None, true);
        let t = assert_split_invariant(
            &p,
            b"a LOGIN joe x\r\nb LOGIN joe y\r\nc AUTHENTICATE PLAIN AGpvZQB6\r\nd NOOP\r\n",
            &[
                failed(),
                LoginOutcome::AuthFailed {
                    response: Some("[AUTHENTICATIONFAILED] Invalid\r\n* OK credentials".into()),
                },
                failed(),
            ],
        );
        assert_eq!(
            t.out,
            format!(
                "{}a {FAILED}b NO [AUTHENTICATIONFAILED] Invalid * OK credentials\r\nc {FAILED}\
                 * BYE Too many authentication failures\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.logins.len(), 3);
        assert!(t.closed);
        // Local rejections count too.
        let t = transcript(
            &p,
            &[b"a LOGIN \"\" x\r\nb LOGIN \"\" x\r\nc LOGIN \"\" x\r\n"],
            &[],
        );
        assert!(t.closed);
        assert!(t
            .out
            .ends_with("* BYE Too many authentication failures\r\n"));
    }

    #[test]
    fn other_login_outcomes() {
        let t = transcript(
            &tls(),
            &[
                b"a LOGIN joe pw\r\n",
                b"b LOGIN joe pw\r\n",
                b"c LOGIN joe pw\r\n",
                b"d LOGIN joe pw\r\n",
            ],
            &[
                LoginOutcome::Unavailable,
                LoginOutcome::Refused {
                    reason: "no route\r\nfor you",
                },
                LoginOutcome::Unavailable,
                LoginOutcome::Ok {
                    capabilities: Some("IMAP4rev1 [X]".into()),
                },
            ],
        );
        assert_eq!(
            t.out,
            format!(
                "{}a NO [UNAVAILABLE] Server temporarily unavailable, try again later.\r\n\
                 b NO [AUTHENTICATIONFAILED] no route for you\r\n\
                 c NO [UNAVAILABLE] Server temporarily unavailable, try again later.\r\n\
                 d OK Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert!(t.authenticated);
        let t = transcript(
            &tls(),
            &[b"a LOGIN joe pw\r\n"],
            &[LoginOutcome::Ok {
                capabilities: Some("IMAP4rev1\r\n* BYE".into()),
            }],
        );
        assert!(t
            .out
            .ends_with("a OK [CAPABILITY IMAP4rev1 * BYE] Logged in\r\n"));
    }

    #[test]
    fn overlong_lines() {
        let mut p = tls();
        p.limits.max_line = 20;
        let mut m = ServerMachine::new(p.clone());
        m.poll_action();
        assert_eq!(m.receive(&[b'a'; 19]), 0);
        assert_eq!(m.poll_action(), None);
        assert_eq!(m.receive(&[b'a'; 25]), 25);
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(
                b"* BAD [TOOBIG] Line too long\r\n* BYE Line too long\r\n".to_vec()
            ))
        );
        assert_eq!(m.poll_action(), Some(Action::Close));
        assert_eq!(m.receive(b"a NOOP\r\n"), 0);
        // Twenty bytes with the CRLF is the most.
        let t = transcript(&p, &[b"a LOGIN joe s3cret\r\n"], &[]);
        assert_eq!(t.logins.len(), 1);
        let t = transcript(&p, &[b"a LOGIN joe s3cret1\r\n"], &[]);
        assert!(t.closed && t.logins.is_empty());
        // A command line using the whole budget leaves none for the line after a
        // literal: the close comes with the next byte, not before.
        let mut m = ServerMachine::new(p.clone());
        m.poll_action();
        assert_eq!(m.receive(b"a LOGIN joooe {3+}\r\n"), 20);
        assert_eq!(m.receive(b"pw!"), 3);
        assert_eq!(m.receive(b""), 0);
        assert_eq!(m.poll_action(), None);
        assert_eq!(m.receive(b"\r\n"), 2);
        assert!(m.poll_action().is_some());
        assert_eq!(m.poll_action(), Some(Action::Close));
        // The lines of one command share the budget.
        let t = transcript(&p, &[b"a LOGIN {3+}\r\njoe s3cret\r\n"], &[]);
        assert!(t.out.ends_with("* BYE Line too long\r\n"));
        let t = transcript(&p, &[b"a LOGIN {3+}\r\njoe pw\r\n"], &[]);
        assert_eq!(t.logins.len(), 1);
        // SASL lines too.
        p.limits.max_line = 24;
        let t = transcript(
            &p,
            &[b"a AUTHENTICATE PLAIN\r\n", b"AGpvZQBzM2NyZXQ=AAAAAAAA\r\n"],
            &[],
        );
        assert!(t
            .out
            .ends_with("+ \r\n* BAD [TOOBIG] Line too long\r\n* BYE Line too long\r\n"));
        // And the default limit.
        let t = transcript(&tls(), &[&vec![b'a'; 9000]], &[]);
        assert!(t.closed);
        assert!(t.left.is_empty());
    }

    #[test]
    fn pipelined_commands_after_login_stay_unconsumed() {
        let mut m = ServerMachine::new(tls());
        m.poll_action();
        let input = b"a1 LOGIN joe s3cret\r\na2 SELECT INBOX\r\n";
        let used = m.receive(input);
        assert_eq!(&input[used..], b"a2 SELECT INBOX\r\n");
        assert!(matches!(m.poll_action(), Some(Action::Login(_))));
        assert_eq!(m.receive(&input[used..]), 0);
        m.login_done(ok_caps());
        assert!(m.is_authenticated());
        assert_eq!(m.receive(&input[used..]), 0);

        for input in [
            &b"a1 LOGIN joe s3cret\r\na2 SELECT INBOX\r\n"[..],
            b"a0 NOOP\r\na1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\na2 SELECT INBOX\r\n",
            b"a1 AUTHENTICATE PLAIN\r\nAGpvZQBzM2NyZXQ=\r\na2 SELECT INBOX\r\n",
            b"a1 LOGIN {3+}\r\njoe s3cret\r\na2 SELECT INBOX\r\n",
        ] {
            let t = assert_split_invariant(&tls(), input, &[ok_caps()]);
            assert!(t.authenticated);
            assert_eq!(t.left, b"a2 SELECT INBOX\r\n");
        }
    }

    #[test]
    fn transcripts_do_not_depend_on_read_boundaries() {
        let t = assert_split_invariant(
            &tls(),
            b"a0 CAPABILITY\r\na1 LOGIN {3}\r\njoe {6}\r\ns3cret\r\na2 SELECT INBOX\r\n",
            &[ok_caps()],
        );
        assert_eq!(
            t.out,
            format!(
                "{}* CAPABILITY {CAPS_TLS}\r\na0 OK CAPABILITY completed\r\n{PLUS}{PLUS}\
                 a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert_eq!(t.left, b"a2 SELECT INBOX\r\n");

        let t = assert_split_invariant(
            &tls(),
            b"a ID (\"name\" {2+}\r\nxy)\r\nb AUTHENTICATE LOGIN\r\nam9l\r\nczNjcmV0\r\n\
              x FOO {4+}\r\nabcd\r\nc AUTHENTICATE PLAIN\r\n*\r\nd LOGIN \"a\\\\b\" {3+}\r\npw!\r\ne NOOP\r\n",
            &[failed(), ok_caps()],
        );
        assert_eq!(
            t.logins,
            [
                login("joe", b"s3cret", Mechanism::Login),
                login("a\\b", b"pw!", Mechanism::Login)
            ]
        );
        assert_eq!(t.left, b"e NOOP\r\n");

        let t = assert_split_invariant(
            &policy(ListenerTls::StartTls, false),
            b"a NOOP\nb STARTTLS\r\n",
            &[],
        );
        assert_eq!(t.starttls, 1);
        assert!(!t.closed);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut m = ServerMachine::new(tls());
        m.receive(b"a LOGIN joe {10}\r\n");
        m.receive(b"hunter2");
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("hunter"), "{dbg}");
        m.receive(b"xyz\r\n");
        let dbg = format!("{m:?}");
        assert!(!dbg.contains("hunter"), "{dbg}");
        let action = loop {
            match m.poll_action() {
                Some(Action::Login(c)) => break Action::Login(c),
                Some(_) => {}
                None => panic!("no login"),
            }
        };
        assert!(!format!("{action:?}").contains("hunter"));

        for input in [
            &b"a LOGIN joe \"hunter2\"\r\n"[..],
            b"a AUTHENTICATE PLAIN AGpvZQBodW50ZXIy\r\n",
        ] {
            let mut m = ServerMachine::new(tls());
            m.receive(input);
            let dbg = format!("{m:?}");
            assert!(dbg.contains("Login"), "{dbg}");
            assert!(!dbg.contains("hunter2"), "{dbg}");
            assert!(!dbg.contains("AGpvZQBodW50ZXIy"), "{dbg}");
        }
        let mut m = ServerMachine::new(tls());
        m.receive(b"a LOGIN {3+}\r\njoe {9+}\r\nhunter");
        assert!(!format!("{m:?}").contains("hunter"));
    }

    #[test]
    fn command_limit() {
        let mut p = tls();
        p.limits.max_commands = 3;
        let t = transcript(&p, &[b"a NOOP\r\nb FOO\r\n\r\nd NOOP\r\n"], &[]);
        assert_eq!(
            t.out,
            format!(
                "{}a OK NOOP completed\r\nb BAD Unknown command\r\n* BAD Missing or invalid tag\r\n\
                 * BYE Too many commands\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert!(t.closed);
    }

    #[test]
    fn timeouts_shutdown_and_logout() {
        let mut d = Driver::new(tls(), vec![]);
        d.0.end(false);
        assert!(d.t().closed);
        assert!(d.out().ends_with("* BYE Disconnected for inactivity.\r\n"));
        let m = &mut d.0.machine;
        assert_eq!(m.receive(b"a NOOP\r\n"), 0);
        m.timed_out();
        m.shutting_down();
        assert_eq!(m.poll_action(), None);

        let mut d = Driver::new(tls(), vec![]);
        d.feed(b"a LOGIN {5}\r\n");
        d.0.end(true);
        assert!(d.t().closed);
        assert!(d.out().ends_with(&format!(
            "{PLUS}* BYE [UNAVAILABLE] Server shutting down\r\n"
        )));

        // Shutting down during a login: the late outcome is ignored.
        let mut m = ServerMachine::new(tls());
        m.poll_action();
        m.receive(b"a LOGIN joe pw\r\n");
        assert!(matches!(m.poll_action(), Some(Action::Login(_))));
        m.shutting_down();
        m.login_done(ok_caps());
        assert!(!m.is_authenticated());
        assert_eq!(
            m.poll_action(),
            Some(Action::Send(
                b"* BYE [UNAVAILABLE] Server shutting down\r\n".to_vec()
            ))
        );
        assert_eq!(m.poll_action(), Some(Action::Close));
        assert_eq!(m.poll_action(), None);

        let t = transcript(&tls(), &[b"a LOGOUT\r\nb NOOP\r\n"], &[]);
        assert_eq!(
            t.out,
            format!(
                "{}* BYE Logging out\r\na OK LOGOUT completed\r\n",
                greeting(CAPS_TLS)
            )
        );
        assert!(t.closed);
        assert_eq!(t.left, b"b NOOP\r\n");
    }

    #[test]
    fn ignores_calls_out_of_order() {
        let mut m = ServerMachine::new(tls());
        m.poll_action();
        m.login_done(ok_caps());
        m.tls_established();
        assert_eq!(m.poll_action(), None);
        assert!(!m.is_authenticated());
        assert_eq!(m.receive(b""), 0);
    }
}

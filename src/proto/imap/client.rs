//! The backend-facing IMAP machine: speaks as a client to one backend, from its greeting
//! to the end of the login (or, without credentials, to a health verdict).
//!
//! Steps: greeting (`* OK`, with or without a `[CAPABILITY ...]` code), `CAPABILITY` if
//! the greeting had none, `STARTTLS` when the pool requires it (then capabilities are
//! read again: nothing said before the handshake is trusted), `ID` with the client's
//! address when asked to and offered, then the credentials' replay:
//!
//! * `AUTHENTICATE PLAIN` when `AUTH=PLAIN` is offered, the response inline with
//!   `SASL-IR`, else after the server's `+`;
//! * otherwise `LOGIN`, unless `LOGINDISABLED`, each argument as a quoted string when it
//!   is printable ASCII, else as a literal: `{n+}` with `LITERAL+` (or `LITERAL-` up to
//!   4096 bytes), else `{n}` and the data only after the server's `+`.
//!
//! Either way a user name or password is always exactly one argument of one command,
//! whatever bytes it holds; a value with NUL cannot be carried and is refused unsent.
//!
//! Untagged data before the login ends is read and dropped (`* OK [ALERT]`, referrals,
//! `* ID`, ...), except capabilities. Lines are bounded ([`MAX_LINE`]); a literal at the
//! end of an untagged data line (not a status line, whose text is not a literal) is
//! skipped, bounded by [`MAX_LITERAL`]. The login ends with the tagged reply to the login
//! command, or to the `CAPABILITY` sent after it when the OK carried no capabilities;
//! nothing after that line is consumed: it belongs to the client.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;

use super::syntax::{
    find_line, has_cap, is_quotable, line_content, push_quoted, sanitize_text, split_code,
    split_literal, split_word, LineEnd,
};
use crate::proto::sasl;
use crate::proto::{
    BackendAction, BackendLogin, BackendPolicy, BackendResult, BackendTls, Credentials,
    Unavailable,
};

/// Longest line accepted from a backend, terminator included.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest literal skipped in an untagged response before login.
pub const MAX_LITERAL: usize = 64 * 1024;
/// Largest value sent as a non-synchronizing literal to a `LITERAL-` server (RFC 7888).
const LITERAL_MINUS_MAX: usize = 4096;
/// Longest backend text kept in an `AuthFailed` response.
const MAX_RESPONSE_TEXT: usize = 256;
const AUTH_FAILED: &str = "[AUTHENTICATIONFAILED] Authentication failed.";
/// Response codes of a tagged NO that are passed on to the client (RFC 5530).
const KEPT_CODES: &[&str] = &[
    "AUTHENTICATIONFAILED",
    "AUTHORIZATIONFAILED",
    "EXPIRED",
    "CONTACTADMIN",
    "PRIVACYREQUIRED",
    "LIMIT",
];

/// The rest of a login command, sent one piece per `+` from the server. Wiped on drop.
struct Pieces(VecDeque<Vec<u8>>);

impl Drop for Pieces {
    fn drop(&mut self) {
        for p in &mut self.0 {
            crate::proto::wipe(p);
        }
    }
}

impl fmt::Debug for Pieces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pieces({} left)", self.0.len())
    }
}

#[derive(Debug)]
enum State {
    /// Waiting for the greeting.
    Greeting,
    /// `CAPABILITY` sent before login.
    Capability,
    /// `STARTTLS` sent.
    StartTls,
    /// `StartTls` asked of the driver.
    AwaitTls,
    /// `ID` sent.
    Id,
    /// The login command (partly) sent; the pieces wait for the server's `+`.
    Login(Pieces),
    /// `CAPABILITY` sent after a successful login.
    PostLoginCapability,
    /// `Done` queued.
    Done,
}

/// The backend-facing IMAP login machine (a probe without credentials). Its `Debug`
/// output never shows the password.
#[derive(Debug)]
pub struct BackendMachine {
    policy: BackendPolicy,
    creds: Option<Credentials>,
    state: State,
    /// Number of the last tag used (`C1`, `C2`, ...).
    tags: u32,
    /// Tag of the command in flight.
    tag: String,
    /// Trusted capabilities (read over TLS when TLS is required).
    caps: Option<String>,
    /// Capabilities seen in untagged data since the last command was sent.
    seen_caps: Option<String>,
    tls_active: bool,
    /// Literal bytes of an untagged response still to skip.
    skip: usize,
    /// The next line continues an untagged response (after a skipped literal).
    continued: bool,
    actions: VecDeque<BackendAction>,
}

impl BackendMachine {
    /// A machine for a new backend connection: with `creds` it logs in with them, without
    /// it probes the server's health and logs out.
    pub fn new(policy: BackendPolicy, creds: Option<Credentials>) -> BackendMachine {
        BackendMachine {
            tls_active: policy.tls == BackendTls::Implicit,
            policy,
            creds,
            state: State::Greeting,
            tags: 0,
            tag: String::new(),
            caps: None,
            seen_caps: None,
            skip: 0,
            continued: false,
            actions: VecDeque::new(),
        }
    }

    fn done(&mut self, result: BackendResult) {
        self.actions.push_back(BackendAction::Done(result));
        self.state = State::Done;
    }

    fn unavailable(&mut self, why: Unavailable) {
        self.done(BackendResult::Unavailable(why));
    }

    fn next_tag(&mut self) -> String {
        self.tags = self.tags.saturating_add(1);
        self.tag = format!("C{}", self.tags);
        self.seen_caps = None;
        self.tag.clone()
    }

    /// Sends `<tag> <command>`.
    fn command(&mut self, command: &str) {
        let tag = self.next_tag();
        let line = format!("{tag} {command}\r\n");
        self.actions.push_back(BackendAction::Send(line.into_bytes()));
    }

    /// Capabilities are known: next step.
    fn proceed(&mut self) {
        let caps = self.caps.clone().unwrap_or_default();
        if self.policy.tls == BackendTls::StartTls && !self.tls_active {
            if !has_cap(&caps, "STARTTLS") {
                return self.unavailable(Unavailable::Tls);
            }
            self.command("STARTTLS");
            self.state = State::StartTls;
            return;
        }
        if self.creds.is_none() {
            self.command("LOGOUT");
            let capabilities = caps.split_whitespace().map(str::to_owned).collect();
            return self.done(BackendResult::Ready { capabilities });
        }
        if let Some(info) = &self.policy.forward_client {
            // Sent at most once: after the ID reply the login starts directly.
            if has_cap(&caps, "ID") {
                let args = format!(
                    "ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\")",
                    info.ip, info.port
                );
                self.command(&args);
                self.state = State::Id;
                return;
            }
        }
        self.start_login();
    }

    fn start_login(&mut self) {
        let Some(creds) = self.creds.take() else {
            return self.unavailable(Unavailable::Protocol);
        };
        let caps = self.caps.clone().unwrap_or_default();
        let tag = self.next_tag();
        let pieces = if has_cap(&caps, "AUTH=PLAIN") {
            plain_pieces(&tag, &creds, has_cap(&caps, "SASL-IR"))
        } else if !has_cap(&caps, "LOGINDISABLED") {
            let plus = has_cap(&caps, "LITERAL+");
            let minus = has_cap(&caps, "LITERAL-");
            login_pieces(&tag, &creds, plus, minus)
        } else {
            return self.unavailable(Unavailable::NoMechanism);
        };
        drop(creds);
        let Some(mut pieces) = pieces else {
            return self.done(BackendResult::AuthFailed {
                response: AUTH_FAILED.to_owned(),
            });
        };
        if let Some(first) = pieces.0.pop_front() {
            self.actions.push_back(BackendAction::Send(first));
        }
        self.state = State::Login(pieces);
    }

    fn line(&mut self, line: &[u8]) {
        if self.continued {
            return self.untagged_data(line);
        }
        if let Some(rest) = line.strip_prefix(b"* ") {
            self.untagged(rest);
        } else if matches!(self.state, State::Greeting) {
            self.unavailable(Unavailable::Greeting);
        } else if line.starts_with(b"+") {
            self.continuation();
        } else {
            self.tagged(line);
        }
    }

    fn untagged(&mut self, rest: &[u8]) {
        let (word, text) = split_word(rest);
        let word = word.to_ascii_uppercase();
        if matches!(self.state, State::Greeting) {
            if word != b"OK" {
                // BYE, PREAUTH (we must log in ourselves) or nonsense.
                return self.unavailable(Unavailable::Greeting);
            }
            self.caps = code_caps(text);
            if self.caps.is_some() {
                self.proceed();
            } else {
                self.command("CAPABILITY");
                self.state = State::Capability;
            }
            return;
        }
        match &word[..] {
            b"BYE" => self.unavailable(match self.state {
                State::StartTls => Unavailable::Tls,
                _ => Unavailable::Protocol,
            }),
            b"OK" | b"NO" | b"BAD" | b"PREAUTH" => {
                if let Some(caps) = code_caps(text) {
                    self.seen_caps = Some(caps);
                }
            }
            b"CAPABILITY" => self.seen_caps = Some(sanitize_text(text, MAX_LINE)),
            _ => self.untagged_data(rest),
        }
    }

    /// An untagged data line (or its continuation after a literal): skip any literal
    /// announced at its end.
    fn untagged_data(&mut self, line: &[u8]) {
        self.continued = false;
        if let (_, Some(spec)) = split_literal(line) {
            match usize::try_from(spec.len) {
                Ok(len) if len <= MAX_LITERAL => {
                    self.skip = len;
                    self.continued = true;
                }
                _ => self.unavailable(Unavailable::Protocol),
            }
        }
    }

    fn continuation(&mut self) {
        match &mut self.state {
            State::Login(pieces) => match pieces.0.pop_front() {
                Some(next) => self.actions.push_back(BackendAction::Send(next)),
                // More SASL steps than PLAIN has: nothing sensible to answer.
                None => self.unavailable(Unavailable::Protocol),
            },
            _ => self.unavailable(Unavailable::Protocol),
        }
    }

    fn tagged(&mut self, line: &[u8]) {
        let (tag, rest) = split_word(line);
        if tag != self.tag.as_bytes() {
            return self.unavailable(Unavailable::Protocol);
        }
        let (status, text) = split_word(rest);
        let status = status.to_ascii_uppercase();
        let ok = match &status[..] {
            b"OK" => true,
            b"NO" | b"BAD" => false,
            _ => return self.unavailable(Unavailable::Protocol),
        };
        match std::mem::replace(&mut self.state, State::Done) {
            State::Capability if ok => {
                self.caps = Some(self.seen_caps.take().unwrap_or_default());
                self.proceed();
            }
            State::StartTls if ok => {
                self.actions.push_back(BackendAction::StartTls);
                self.state = State::AwaitTls;
            }
            State::StartTls => self.unavailable(Unavailable::Tls),
            // Whatever the answer to ID, log in.
            State::Id => self.start_login(),
            State::Login(_) if ok => {
                let caps = code_caps(text).or_else(|| self.seen_caps.take());
                match caps {
                    Some(caps) => self.done(BackendResult::LoggedIn {
                        capabilities: Some(caps),
                    }),
                    None => {
                        self.command("CAPABILITY");
                        self.state = State::PostLoginCapability;
                    }
                }
            }
            State::Login(_) if status == b"NO" => match no_response(text) {
                Some(response) => self.done(BackendResult::AuthFailed { response }),
                None => self.unavailable(Unavailable::Protocol),
            },
            // BAD to our login: the server disliked the arguments. Never a reason to
            // mark it down (a strange user name would take the pool out).
            State::Login(_) => self.done(BackendResult::AuthFailed {
                response: AUTH_FAILED.to_owned(),
            }),
            State::PostLoginCapability => {
                let capabilities = if ok { self.seen_caps.take() } else { None };
                self.done(BackendResult::LoggedIn { capabilities });
            }
            _ => self.unavailable(Unavailable::Protocol),
        }
    }
}

/// `AUTHENTICATE PLAIN`: one line with SASL-IR, else the command and then the response
/// after the server's `+`. `None` if the credentials hold NUL.
fn plain_pieces(tag: &str, creds: &Credentials, sasl_ir: bool) -> Option<Pieces> {
    let b64 = sasl::encode_plain(creds)?;
    let mut b64 = b64.into_bytes();
    let mut pieces = VecDeque::new();
    let mut line = Vec::with_capacity(tag.len() + b64.len() + 32);
    line.extend_from_slice(tag.as_bytes());
    line.extend_from_slice(b" AUTHENTICATE PLAIN");
    if sasl_ir {
        line.push(b' ');
        line.extend_from_slice(&b64);
        line.extend_from_slice(b"\r\n");
        pieces.push_back(line);
    } else {
        line.extend_from_slice(b"\r\n");
        pieces.push_back(line);
        let mut resp = Vec::with_capacity(b64.len() + 2);
        resp.extend_from_slice(&b64);
        resp.extend_from_slice(b"\r\n");
        pieces.push_back(resp);
    }
    crate::proto::wipe(&mut b64);
    Some(Pieces(pieces))
}

/// `LOGIN user password`, split where the server's `+` must be awaited. `None` if a value
/// holds NUL, which no IMAP string can carry.
fn login_pieces(tag: &str, creds: &Credentials, plus: bool, minus: bool) -> Option<Pieces> {
    let user = creds.user.as_bytes();
    let pass = creds.secret.expose();
    if user.contains(&0) || pass.contains(&0) {
        return None;
    }
    // Room for everything, so no buffer holding the password is ever reallocated.
    let cap = tag.len() + 2 * (user.len() + pass.len()) + 64;
    let mut pieces = Pieces(VecDeque::new());
    let mut cur = Vec::with_capacity(cap);
    cur.extend_from_slice(tag.as_bytes());
    cur.extend_from_slice(b" LOGIN ");
    for (i, value) in [user, pass].into_iter().enumerate() {
        if i == 1 {
            cur.push(b' ');
        }
        if is_quotable(value) {
            push_quoted(&mut cur, value);
        } else if plus || (minus && value.len() <= LITERAL_MINUS_MAX) {
            let _ = write!(cur, "{{{}+}}\r\n", value.len());
            cur.extend_from_slice(value);
        } else {
            let _ = write!(cur, "{{{}}}\r\n", value.len());
            pieces.0.push_back(std::mem::replace(&mut cur, Vec::with_capacity(cap)));
            cur.extend_from_slice(value);
        }
    }
    cur.extend_from_slice(b"\r\n");
    pieces.0.push_back(cur);
    Some(pieces)
}

/// Capabilities from a `[CAPABILITY ...]` code at the start of `text`.
fn code_caps(text: &[u8]) -> Option<String> {
    match split_code(text) {
        (Some(code), _) if code.name.eq_ignore_ascii_case(b"CAPABILITY") => {
            Some(sanitize_text(code.args, MAX_LINE))
        }
        _ => None,
    }
}

/// The client-facing text of a tagged NO to the login: kept response codes and the
/// sanitized text. `None` for `[UNAVAILABLE]`, a temporary server failure.
fn no_response(text: &[u8]) -> Option<String> {
    let (code, rest) = split_code(text);
    let mut out = String::new();
    if let Some(code) = code {
        if code.name.eq_ignore_ascii_case(b"UNAVAILABLE") {
            return None;
        }
        if let Some(kept) = KEPT_CODES
            .iter()
            .find(|k| k.as_bytes().eq_ignore_ascii_case(code.name))
        {
            out.push('[');
            out.push_str(kept);
            out.push_str("] ");
        }
    }
    let rest = sanitize_text(rest, MAX_RESPONSE_TEXT);
    out.push_str(if rest.is_empty() {
        "Authentication failed."
    } else {
        &rest
    });
    Some(out)
}

impl BackendLogin for BackendMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            if matches!(self.state, State::Done | State::AwaitTls) {
                return pos;
            }
            let rest = &input[pos..];
            if self.skip > 0 {
                let take = self.skip.min(rest.len());
                if take == 0 {
                    return pos;
                }
                self.skip -= take;
                pos += take;
                continue;
            }
            match find_line(rest, MAX_LINE) {
                LineEnd::Incomplete => return pos,
                LineEnd::TooLong => {
                    let why = match self.state {
                        State::Greeting => Unavailable::Greeting,
                        _ => Unavailable::Protocol,
                    };
                    self.unavailable(why);
                    return pos;
                }
                LineEnd::Complete(n) => {
                    pos += n;
                    self.line(line_content(&rest[..n]));
                }
            }
        }
    }

    fn poll_action(&mut self) -> Option<BackendAction> {
        self.actions.pop_front()
    }

    fn tls_established(&mut self) {
        if matches!(self.state, State::AwaitTls) {
            self.tls_active = true;
            // Nothing said before the handshake is trusted: ask again.
            self.caps = None;
            self.skip = 0;
            self.continued = false;
            self.command("CAPABILITY");
            self.state = State::Capability;
        }
    }
}

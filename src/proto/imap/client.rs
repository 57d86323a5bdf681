//! The backend-facing IMAP machine: speaks as a client to one backend, from its greeting
//! to the end of the login (or, without credentials, to a health verdict).
//!
//! Steps: greeting (`* OK`, with or without a `[CAPABILITY ...]` code), `CAPABILITY` if
//! the greeting had none, `STARTTLS` when the pool requires it (then capabilities are
//! read again: nothing said before the handshake is trusted), `ID` with the client's
//! address when asked to and offered, then the credentials' replay, in the fewest round
//! trips the server allows:
//!
//! * `AUTHENTICATE PLAIN` with the response inline when `AUTH=PLAIN` and `SASL-IR` are
//!   offered;
//! * otherwise `LOGIN` with two quoted strings, unless `LOGINDISABLED`, when both values
//!   are printable ASCII (older servers offer PLAIN without SASL-IR: that would take two
//!   round trips);
//! * otherwise `AUTHENTICATE PLAIN` with the response after the server's `+`;
//! * otherwise `LOGIN` with literals: `{n+}` with `LITERAL+` (or `LITERAL-` up to 4096
//!   bytes), else `{n}` and the data only after the server's `+`;
//! * otherwise `AUTHENTICATE LOGIN` when `AUTH=LOGIN` is offered (Dovecot with PLAIN
//!   disabled says `LOGINDISABLED AUTH=LOGIN`), user name and password each after a `+`.
//!
//! Either way a user name or password is always exactly one argument of one command,
//! whatever bytes it holds; a value with NUL cannot be carried and is refused unsent.
//!
//! Untagged data before the login ends is read and dropped (`* OK [ALERT]`, referrals,
//! `* ID`, ...), except capabilities. Lines are bounded ([`MAX_LINE`]); a literal at the
//! end of an untagged data line (not a status line, whose text is not a literal) is
//! skipped, bounded by [`MAX_LITERAL`]. The login ends with the tagged reply to the login
//! command (its capabilities, or those seen in untagged data meanwhile, go to the client;
//! without any, the client asks the server itself when it needs them); nothing after that
//! line is consumed: it belongs to the client.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;

use super::syntax::{has_cap, is_quotable, push_quoted, split_code, split_literal, split_word};
use crate::proto::line::{next_line, Line};
use crate::proto::sasl;
use crate::proto::text::sanitize;
use crate::proto::{
    BackendAction, BackendLogin, BackendPolicy, BackendResult, BackendTls, Credentials, Unavailable,
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
    /// An OAuth token was refused with this error challenge (base64 JSON); the dummy
    /// response was sent and the tagged NO is awaited.
    TokenChallenged(String),
    /// `CAPABILITY` sent after a login refused under remembered capabilities: if the
    /// server's list changed, the login is tried again under the new one, else this
    /// refusal stands.
    Relearn(BackendResult),
    /// `Done` queued.
    Done,
}

/// The backend-facing IMAP login machine (a probe without credentials). Its `Debug`
/// output never shows the password.
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
    /// `caps` are the policy's remembered ones, not read from the server this time.
    caps_remembered: bool,
    /// The credentials again, kept while logging in under remembered capabilities (for
    /// one retry under fresh ones).
    retry: Option<Credentials>,
    /// Capabilities seen in untagged data since the last command was sent.
    seen_caps: Option<String>,
    /// The login replays a token with this mechanism.
    token_mechanism: Option<crate::proto::Mechanism>,
    tls_active: bool,
    /// Literal bytes of an untagged response still to skip.
    skip: usize,
    /// The next line continues an untagged response (after a skipped literal).
    continued: bool,
    actions: VecDeque<BackendAction>,
}

/// Queued actions are only counted: a queued `Send` may hold the login command.
impl fmt::Debug for BackendMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendMachine")
            .field("policy", &self.policy)
            .field("creds", &self.creds)
            .field("state", &self.state)
            .field("tag", &self.tag)
            .field("caps", &self.caps)
            .field("tls_active", &self.tls_active)
            .field("queued_actions", &self.actions.len())
            .finish_non_exhaustive()
    }
}

impl BackendMachine {
    /// A machine for a new backend connection: with `creds` it logs in with them, without
    /// it probes the server's health and logs out.
    pub fn new(policy: BackendPolicy, creds: Option<Credentials>) -> BackendMachine {
        BackendMachine {
            tls_active: policy.tls == BackendTls::Implicit,
            token_mechanism: creds
                .as_ref()
                .and_then(|c| c.token_payload().map(|(_, m)| m)),
            policy,
            creds,
            state: State::Greeting,
            tags: 0,
            tag: String::new(),
            caps: None,
            caps_remembered: false,
            retry: None,
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
        self.actions
            .push_back(BackendAction::Send(line.into_bytes()));
    }

    /// No capability list from the server: for a login use the remembered one, else ask
    /// (a probe always asks: it is what keeps the remembered list current).
    fn capabilities_needed(&mut self) {
        let known = self.policy.known_capabilities.as_deref();
        match known.filter(|_| self.creds.is_some()) {
            Some(known) => {
                self.caps = Some(known.to_owned());
                self.caps_remembered = true;
                self.proceed();
            }
            None => {
                self.command("CAPABILITY");
                self.state = State::Capability;
            }
        }
    }

    /// Capabilities are known: next step.
    fn proceed(&mut self) {
        let caps = self.caps.clone().unwrap_or_default();
        if self.policy.tls == BackendTls::StartTls && !self.tls_active {
            // Remembered capabilities are those after TLS (which need not list STARTTLS):
            // ask for it; a server that no longer offers it refuses.
            if !self.caps_remembered && !has_cap(&caps, "STARTTLS") {
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
        if self.caps_remembered {
            self.retry = Some(creds.clone());
        }
        let caps = self.caps.clone().unwrap_or_default();
        let tag = self.next_tag();
        if let Some((payload, mechanism)) = creds.token_payload() {
            // A token goes with the mechanism it came with, or not at all.
            if !has_cap(&caps, &format!("AUTH={}", mechanism.sasl_name())) {
                return self.unavailable(Unavailable::NoMechanism);
            }
            let sasl_ir = has_cap(&caps, "SASL-IR");
            let mut pieces = token_pieces(&tag, payload.expose(), mechanism, sasl_ir);
            if let Some(first) = pieces.0.pop_front() {
                self.actions.push_back(BackendAction::Send(first));
            }
            self.state = State::Login(pieces);
            return;
        }
        let plain = has_cap(&caps, "AUTH=PLAIN");
        let login = !has_cap(&caps, "LOGINDISABLED");
        let login_pieces = |tag: &str, creds: &Credentials| {
            let plus = has_cap(&caps, "LITERAL+");
            let minus = has_cap(&caps, "LITERAL-");
            login_pieces(tag, creds, plus, minus)
        };
        // Fewest round trips first: PLAIN with an initial response, else LOGIN with quoted
        // strings (older servers offer PLAIN without SASL-IR: two round trips), else
        // whatever the server takes.
        let pieces = if plain && has_cap(&caps, "SASL-IR") {
            plain_pieces(&tag, &creds, true)
        } else if login && quotable(&creds) {
            login_pieces(&tag, &creds)
        } else if plain {
            plain_pieces(&tag, &creds, false)
        } else if login {
            login_pieces(&tag, &creds)
        } else if has_cap(&caps, "AUTH=LOGIN") {
            sasl_login_pieces(&tag, &creds)
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
        } else if let Some(data) = line.strip_prefix(b"+") {
            self.continuation(data);
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
                self.capabilities_needed();
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
            b"CAPABILITY" => self.seen_caps = Some(sanitize(text, MAX_LINE)),
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

    fn continuation(&mut self, data: &[u8]) {
        let token = self.token_mechanism;
        match &mut self.state {
            State::Login(pieces) => match pieces.0.pop_front() {
                Some(next) => self.actions.push_back(BackendAction::Send(next)),
                // A challenge after the whole token: RFC 7628's error challenge. The
                // dummy response ends the exchange; the client is shown the challenge.
                None if token.is_some() => {
                    let challenge = String::from_utf8_lossy(trim_leading_space(data))
                        .chars()
                        .filter(char::is_ascii_graphic)
                        .take(MAX_CHALLENGE)
                        .collect::<String>();
                    let dummy: &[u8] = match token {
                        Some(crate::proto::Mechanism::OAuthBearer) => b"AQ==\r\n",
                        _ => b"\r\n",
                    };
                    self.actions.push_back(BackendAction::Send(dummy.to_vec()));
                    self.state = State::TokenChallenged(challenge);
                }
                // More SASL steps than PLAIN has: nothing sensible to answer.
                None => self.unavailable(Unavailable::Protocol),
            },
            _ => self.unavailable(Unavailable::Protocol),
        }
    }

    fn tagged(&mut self, line: &[u8]) {
        let (tag, rest) = split_word(line);
        if tag != self.tag.as_bytes() {
            // After a refused login under stale capabilities the server may have read
            // part of our command as another one (a literal it did not expect): its
            // answers to that are not ours to judge.
            if matches!(self.state, State::Relearn(_)) {
                return;
            }
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
            // The capabilities after login go to the client when the server gave them;
            // otherwise the client asks the server itself if it needs them (no extra
            // round trip here).
            State::Login(_) if ok => {
                let capabilities = code_caps(text).or_else(|| self.seen_caps.take());
                self.done(BackendResult::LoggedIn { capabilities });
            }
            State::Login(_) => {
                let refusal = if status == b"NO" {
                    match no_response(text) {
                        Some(response) => BackendResult::AuthFailed { response },
                        None => BackendResult::Unavailable(Unavailable::Protocol),
                    }
                } else {
                    // BAD to our login: the server disliked the arguments. Never a reason
                    // to mark it down (a strange user name would take the pool out).
                    BackendResult::AuthFailed {
                        response: AUTH_FAILED.to_owned(),
                    }
                };
                if self.retry.is_some() {
                    // Chosen under remembered capabilities: check they still hold.
                    self.command("CAPABILITY");
                    self.state = State::Relearn(refusal);
                } else {
                    self.done(refusal);
                }
            }
            State::Relearn(refusal) if ok => {
                let fresh = self.seen_caps.take().unwrap_or_default();
                let changed = self.caps.as_deref() != Some(fresh.as_str());
                self.caps = Some(fresh);
                self.caps_remembered = false;
                match self.retry.take() {
                    Some(creds) if changed => {
                        self.creds = Some(creds);
                        self.start_login();
                    }
                    _ => self.done(refusal),
                }
            }
            State::Relearn(refusal) => self.done(refusal),
            State::TokenChallenged(challenge) if !ok => {
                let response = no_response(text).unwrap_or_else(|| AUTH_FAILED.to_owned());
                self.done(BackendResult::TokenRefused {
                    challenge,
                    response,
                });
            }
            _ => self.unavailable(Unavailable::Protocol),
        }
    }
}

/// `AUTHENTICATE OAUTHBEARER|XOAUTH2` with the client's own message: one line with
/// SASL-IR, else the command and then the message after the server's `+`.
fn token_pieces(
    tag: &str,
    payload: &[u8],
    mechanism: crate::proto::Mechanism,
    sasl_ir: bool,
) -> Pieces {
    let b64 = sasl::encode_base64(payload).into_bytes();
    sasl_pieces(tag, mechanism.sasl_name(), b64, sasl_ir)
}

/// `tag AUTHENTICATE MECHANISM` with the base64 response: on the same line with SASL-IR,
/// else as the piece sent after the server's `+`. The response buffer is wiped.
fn sasl_pieces(tag: &str, mechanism: &str, mut b64: Vec<u8>, sasl_ir: bool) -> Pieces {
    let mut line = Vec::with_capacity(tag.len() + mechanism.len() + b64.len() + 20);
    line.extend_from_slice(tag.as_bytes());
    line.extend_from_slice(b" AUTHENTICATE ");
    line.extend_from_slice(mechanism.as_bytes());
    let mut pieces = VecDeque::new();
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
    Pieces(pieces)
}

fn trim_leading_space(s: &[u8]) -> &[u8] {
    s.strip_prefix(b" ").unwrap_or(s)
}

/// Longest error challenge kept for the client.
const MAX_CHALLENGE: usize = 4096;

/// `AUTHENTICATE PLAIN`: one line with SASL-IR, else the command and then the response
/// after the server's `+`. `None` if the credentials hold NUL.
fn plain_pieces(tag: &str, creds: &Credentials, sasl_ir: bool) -> Option<Pieces> {
    let b64 = sasl::encode_plain(creds)?.into_bytes();
    Some(sasl_pieces(tag, "PLAIN", b64, sasl_ir))
}

/// Whether the user name and password fit quoted strings (one line, no literal).
fn quotable(creds: &Credentials) -> bool {
    is_quotable(creds.user.as_bytes()) && creds.secret().is_some_and(|s| is_quotable(s.expose()))
}

/// `AUTHENTICATE LOGIN`: the command, then the user name and the password, each after
/// the server's `+`. `None` if the credentials hold NUL.
fn sasl_login_pieces(tag: &str, creds: &Credentials) -> Option<Pieces> {
    let pass = creds.secret()?.expose();
    if creds.user.as_bytes().contains(&0) || pass.contains(&0) {
        return None;
    }
    let mut pieces = Pieces(VecDeque::new());
    pieces
        .0
        .push_back(format!("{tag} AUTHENTICATE LOGIN\r\n").into_bytes());
    for value in [creds.user.as_bytes(), pass] {
        let mut b64 = sasl::encode_base64(value).into_bytes();
        let mut line = Vec::with_capacity(b64.len() + 2);
        line.extend_from_slice(&b64);
        line.extend_from_slice(b"\r\n");
        crate::proto::wipe(&mut b64);
        pieces.0.push_back(line);
    }
    Some(pieces)
}

/// `LOGIN user password`, split where the server's `+` must be awaited. `None` if a value
/// holds NUL, which no IMAP string can carry.
fn login_pieces(tag: &str, creds: &Credentials, plus: bool, minus: bool) -> Option<Pieces> {
    let user = creds.user.as_bytes();
    let pass = creds.secret()?.expose();
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
            pieces
                .0
                .push_back(std::mem::replace(&mut cur, Vec::with_capacity(cap)));
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
            Some(sanitize(code.args, MAX_LINE))
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
    let rest = sanitize(rest, MAX_RESPONSE_TEXT);
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
            match next_line(rest, MAX_LINE) {
                Line::Incomplete => return pos,
                Line::TooLong => {
                    let why = match self.state {
                        State::Greeting => Unavailable::Greeting,
                        _ => Unavailable::Protocol,
                    };
                    self.unavailable(why);
                    return pos;
                }
                Line::Complete { content, len } => {
                    pos += len;
                    self.line(content);
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
            // Nothing said before the handshake is trusted: ask again (or use what
            // this server said over TLS last time).
            self.caps = None;
            self.caps_remembered = false;
            self.skip = 0;
            self.continued = false;
            self.capabilities_needed();
        }
    }

    fn fresh_capabilities(&self) -> Option<&str> {
        let over_tls_if_required = self.policy.tls == BackendTls::None || self.tls_active;
        if self.caps_remembered || !over_tls_if_required {
            return None;
        }
        self.caps.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::imap::ServerMachine;
    use crate::proto::{Action, ClientInfo, ListenerTls, Mechanism, PreAuth, Secret, ServerPolicy};

    fn creds(user: &str, pass: &[u8]) -> Credentials {
        Credentials::password(user.into(), pass.to_vec(), Mechanism::Login)
    }

    fn joe() -> Option<Credentials> {
        Some(creds("joe", b"s3cret"))
    }

    fn policy(tls: BackendTls) -> BackendPolicy {
        BackendPolicy {
            tls,
            forward_client: None,
            helo: "proxy.example".into(),
            known_capabilities: None,
        }
    }

    fn plain() -> BackendPolicy {
        policy(BackendTls::None)
    }

    /// Feeds `input` once and drains: (bytes consumed, bytes sent, other actions).
    fn feed(m: &mut BackendMachine, input: &[u8]) -> (usize, String, Vec<BackendAction>) {
        let used = m.receive(input);
        assert!(used <= input.len());
        let mut sent = Vec::new();
        let mut other = Vec::new();
        while let Some(action) = m.poll_action() {
            match action {
                BackendAction::Send(bytes) => sent.extend_from_slice(&bytes),
                action => other.push(action),
            }
        }
        (used, String::from_utf8_lossy(&sent).into_owned(), other)
    }

    fn done(result: BackendResult) -> Vec<BackendAction> {
        vec![BackendAction::Done(result)]
    }

    fn logged_in(caps: &str) -> Vec<BackendAction> {
        done(BackendResult::LoggedIn {
            capabilities: Some(caps.into()),
        })
    }

    fn unavailable(why: Unavailable) -> Vec<BackendAction> {
        done(BackendResult::Unavailable(why))
    }

    fn auth_failed(response: &str) -> Vec<BackendAction> {
        done(BackendResult::AuthFailed {
            response: response.into(),
        })
    }

    /// Drives a whole conversation (no STARTTLS) fed in `chunks`: (bytes sent, actions,
    /// bytes left unconsumed).
    fn conversation(
        policy: &BackendPolicy,
        creds: Option<Credentials>,
        chunks: &[&[u8]],
    ) -> (String, Vec<BackendAction>, Vec<u8>) {
        let mut m = BackendMachine::new(policy.clone(), creds);
        let mut buf = Vec::new();
        let mut sent = String::new();
        let mut other = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let (used, s, o) = feed(&mut m, &buf);
                sent.push_str(&s);
                other.extend(o);
                buf.drain(..used);
                if used == 0 {
                    break;
                }
            }
        }
        (sent, other, buf)
    }

    fn token(mechanism: Mechanism) -> Credentials {
        Credentials::token(
            "joe".into(),
            b"n,a=joe,\x01auth=Bearer abc.def.ghi\x01\x01".to_vec(),
            mechanism,
        )
    }

    #[test]
    fn tokens_are_replayed_with_their_own_mechanism() {
        let b64 = sasl::encode_base64(b"n,a=joe,\x01auth=Bearer abc.def.ghi\x01\x01");
        // SASL-IR: one line.
        let input = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=OAUTHBEARER] hi\r\n\
                      C1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n";
        let creds = Some(token(Mechanism::OAuthBearer));
        let (sent, actions, _) = assert_split_invariant(&plain(), &creds, input);
        assert_eq!(sent, format!("C1 AUTHENTICATE OAUTHBEARER {b64}\r\n"));
        assert_eq!(actions, logged_in("IMAP4rev1 IDLE"));
        // Without SASL-IR: the message after the server's `+`.
        let input = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n+ \r\nC1 OK Logged in\r\n";
        let creds = Some(token(Mechanism::XOAuth2));
        let (sent, actions, _) = assert_split_invariant(&plain(), &creds, input);
        assert_eq!(sent, format!("C1 AUTHENTICATE XOAUTH2\r\n{b64}\r\n"));
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
        // Not offered: this server cannot serve the login (never a password login).
        let input = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n";
        let (sent, actions, _) = assert_split_invariant(&plain(), &creds, input);
        assert_eq!(sent, "");
        assert_eq!(actions, unavailable(Unavailable::NoMechanism));
    }

    #[test]
    fn a_refused_token_s_error_challenge_is_kept_for_the_client() {
        let input = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER AUTH=XOAUTH2] hi\r\n\
                      + eyJzdGF0dXMiOiI0MDEifQ==\r\nC1 NO [AUTHENTICATIONFAILED] Bad token\r\n";
        for (mechanism, dummy) in [(Mechanism::OAuthBearer, "AQ=="), (Mechanism::XOAuth2, "")] {
            let creds = Some(token(mechanism));
            let (sent, actions, _) = assert_split_invariant(&plain(), &creds, input);
            assert!(sent.ends_with(&format!("\r\n{dummy}\r\n")), "{sent:?}");
            assert_eq!(
                actions,
                done(BackendResult::TokenRefused {
                    challenge: "eyJzdGF0dXMiOiI0MDEifQ==".into(),
                    response: "[AUTHENTICATIONFAILED] Bad token".into(),
                })
            );
        }
    }

    /// The same conversation whatever the read boundaries.
    fn assert_split_invariant(
        policy: &BackendPolicy,
        creds: &Option<Credentials>,
        input: &[u8],
    ) -> (String, Vec<BackendAction>, Vec<u8>) {
        let whole = conversation(policy, creds.clone(), &[input]);
        for cut in 0..=input.len() {
            let split = conversation(policy, creds.clone(), &[&input[..cut], &input[cut..]]);
            assert_eq!(split, whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            conversation(policy, creds.clone(), &bytes),
            whole,
            "byte by byte"
        );
        whole
    }

    #[test]
    fn greeting_with_capabilities_and_sasl_ir() {
        let mut m = BackendMachine::new(plain(), joe());
        assert_eq!(m.poll_action(), None);
        let (used, sent, other) = feed(
            &mut m,
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] Dovecot ready.\r\n",
        );
        assert_eq!(used, 63);
        assert_eq!(sent, "C1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert!(other.is_empty());
        let reply = b"C1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 1 EXISTS\r\n";
        let (used, sent, other) = feed(&mut m, reply);
        assert_eq!(&reply[used..], b"* 1 EXISTS\r\n");
        assert_eq!(sent, "");
        assert_eq!(other, logged_in("IMAP4rev1 IDLE"));
        assert_eq!(m.receive(&reply[used..]), 0);
        assert_eq!(m.poll_action(), None);
    }

    #[test]
    fn greeting_without_capabilities_and_a_quoted_login() {
        // An older server: no capabilities in the greeting, PLAIN without SASL-IR. LOGIN
        // with quoted strings takes one round trip where PLAIN would take two.
        let input: &[u8] = b"* OK ready\r\n\
            * CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC1 OK done\r\n\
            C2 OK Logged in\r\n\
            * 1 EXISTS\r\n";
        let (sent, actions, left) = assert_split_invariant(&plain(), &joe(), input);
        assert_eq!(sent, "C1 CAPABILITY\r\nC2 LOGIN \"joe\" \"s3cret\"\r\n");
        // No capabilities after the login, and none asked for: the client asks itself.
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
        assert_eq!(left, b"* 1 EXISTS\r\n");
    }

    fn remembering(caps: &str, tls: BackendTls) -> BackendPolicy {
        BackendPolicy {
            known_capabilities: Some(caps.into()),
            ..policy(tls)
        }
    }

    /// The machine's `fresh_capabilities` after a whole conversation fed at once.
    fn learned(policy: &BackendPolicy, creds: Option<Credentials>, input: &[u8]) -> Option<String> {
        let mut m = BackendMachine::new(policy.clone(), creds);
        let mut buf = input.to_vec();
        loop {
            let (used, _, _) = feed(&mut m, &buf);
            buf.drain(..used);
            if used == 0 {
                break;
            }
        }
        m.fresh_capabilities().map(str::to_owned)
    }

    #[test]
    fn remembered_capabilities_save_the_capability_round_trip() {
        let known = remembering("IMAP4rev1 AUTH=PLAIN", BackendTls::None);
        let input: &[u8] = b"* OK ready\r\nC1 OK Logged in\r\n* 1 EXISTS\r\n";
        let (sent, actions, left) = assert_split_invariant(&known, &joe(), input);
        assert_eq!(sent, "C1 LOGIN \"joe\" \"s3cret\"\r\n");
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
        assert_eq!(left, b"* 1 EXISTS\r\n");
        // Nothing new learned: the list came from the policy.
        assert_eq!(learned(&known, joe(), input), None);
        // Without a remembered list the machine asks, and reports what it read.
        let asked = b"* OK ready\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC1 OK\r\nC2 OK hi\r\n";
        assert_eq!(
            learned(&plain(), joe(), asked).as_deref(),
            Some("IMAP4rev1 AUTH=PLAIN")
        );
        // A greeting's own list wins over the remembered one.
        let greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\nC1 OK\r\n";
        let (sent, actions, _) = assert_split_invariant(&known, &joe(), greeting);
        assert_eq!(sent, "C1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
        assert_eq!(
            learned(&known, joe(), greeting).as_deref(),
            Some("IMAP4rev1 AUTH=PLAIN SASL-IR")
        );
        // A probe always asks: it keeps the remembered list current.
        let (sent, actions, _) = assert_split_invariant(
            &known,
            &None,
            b"* OK ready\r\n* CAPABILITY IMAP4rev1 X\r\nC1 OK\r\n",
        );
        assert_eq!(sent, "C1 CAPABILITY\r\nC2 LOGOUT\r\n");
        assert_eq!(
            actions,
            done(BackendResult::Ready {
                capabilities: vec!["IMAP4rev1".into(), "X".into()]
            })
        );
    }

    #[test]
    fn stale_remembered_capabilities_are_relearned_once() {
        // Remembered SASL-IR, no longer offered: the server refuses the one-line PLAIN,
        // the machine asks, sees a different list and logs in under it.
        let stale = remembering("IMAP4rev1 AUTH=PLAIN SASL-IR", BackendTls::None);
        let input: &[u8] = b"* OK ready\r\n\
            C1 BAD Unexpected argument\r\n\
            * CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC2 OK\r\n\
            C3 OK Logged in\r\n";
        let (sent, actions, _) = assert_split_invariant(&stale, &joe(), input);
        assert_eq!(
            sent,
            "C1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\nC2 CAPABILITY\r\nC3 LOGIN \"joe\" \"s3cret\"\r\n"
        );
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
        assert_eq!(
            learned(&stale, joe(), input).as_deref(),
            Some("IMAP4rev1 AUTH=PLAIN")
        );
        // The same list: the refusal was the password's, and it stands (no second try).
        let same = remembering("IMAP4rev1 AUTH=PLAIN", BackendTls::None);
        let input: &[u8] = b"* OK ready\r\n\
            C1 NO [AUTHENTICATIONFAILED] Bad password\r\n\
            * CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC2 OK\r\n";
        let (sent, actions, _) = assert_split_invariant(&same, &joe(), input);
        assert_eq!(sent, "C1 LOGIN \"joe\" \"s3cret\"\r\nC2 CAPABILITY\r\n");
        assert_eq!(actions, auth_failed("[AUTHENTICATIONFAILED] Bad password"));
        // A second refusal under the fresh list is final.
        let input: &[u8] = b"* OK ready\r\n\
            C1 BAD no\r\n\
            * CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC2 OK\r\n\
            C3 NO [AUTHENTICATIONFAILED] Bad password\r\n";
        let (sent, actions, _) = assert_split_invariant(&stale, &joe(), input);
        assert_eq!(sent.matches("CAPABILITY").count(), 1);
        assert_eq!(actions, auth_failed("[AUTHENTICATIONFAILED] Bad password"));
        // Stale LITERAL+: the server took the literal's bytes for a command of its own;
        // its answer to that (another tag) is skipped while relearning.
        let eight_bit = Some(creds("joe", "s3cr\u{e9}t".as_bytes()));
        let stale = remembering("IMAP4rev1 LITERAL+", BackendTls::None);
        let input: &[u8] = b"* OK ready\r\n\
            C1 BAD Unknown literal\r\n\
            s3cr BAD Error in IMAP command\r\n\
            * CAPABILITY IMAP4rev1\r\nC2 OK\r\n\
            + go ahead\r\n\
            C3 OK Logged in\r\n";
        let (sent, actions, _) = assert_split_invariant(&stale, &eight_bit, input);
        assert!(sent.starts_with("C1 LOGIN \"joe\" {7+}\r\n"), "{sent}");
        assert!(
            sent.ends_with("C2 CAPABILITY\r\nC3 LOGIN \"joe\" {7}\r\ns3cr\u{e9}t\r\n"),
            "{sent}"
        );
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
    }

    #[test]
    fn remembered_capabilities_after_starttls() {
        // Remembered: the list after TLS. STARTTLS is asked for without a CAPABILITY
        // first, and none is asked after the handshake either.
        let known = remembering("IMAP4rev1 AUTH=PLAIN SASL-IR", BackendTls::StartTls);
        let mut m = BackendMachine::new(known, joe());
        let (_, sent, _) = feed(&mut m, b"* OK ready\r\n");
        assert_eq!(sent, "C1 STARTTLS\r\n");
        let (_, sent, other) = feed(&mut m, b"C1 OK go\r\n");
        assert_eq!((sent.as_str(), other), ("", vec![BackendAction::StartTls]));
        m.tls_established();
        let (_, sent, _) = feed(&mut m, b"");
        assert_eq!(sent, "C2 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(m.fresh_capabilities(), None);
        // A server that stopped offering STARTTLS refuses it: unavailable, as before.
        let known = remembering("IMAP4rev1 AUTH=PLAIN", BackendTls::StartTls);
        let (_, actions, _) = conversation(&known, joe(), &[b"* OK ready\r\nC1 BAD no\r\n"]);
        assert_eq!(actions, unavailable(Unavailable::Tls));
        // Without a remembered list, the pre-TLS list is never reported as learned.
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
        feed(&mut m, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n");
        assert_eq!(m.fresh_capabilities(), None);
        feed(&mut m, b"C1 OK go\r\n");
        m.tls_established();
        feed(&mut m, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC2 OK\r\n");
        assert_eq!(m.fresh_capabilities(), Some("IMAP4rev1 AUTH=PLAIN"));
    }

    #[test]
    fn unquotable_credentials_use_plain_with_a_continuation() {
        let input: &[u8] = b"* OK ready\r\n\
            * CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC1 OK done\r\n\
            + \r\n\
            C2 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n\
            * 1 EXISTS\r\n";
        let eight_bit = Some(creds("joe", "s3cr\u{e9}t".as_bytes()));
        let (sent, actions, left) = assert_split_invariant(&plain(), &eight_bit, input);
        assert_eq!(
            sent,
            "C1 CAPABILITY\r\nC2 AUTHENTICATE PLAIN\r\nAGpvZQBzM2Nyw6l0\r\n"
        );
        assert_eq!(actions, logged_in("IMAP4rev1 IDLE"));
        assert_eq!(left, b"* 1 EXISTS\r\n");
    }

    #[test]
    fn bad_greetings() {
        let long = vec![b'x'; MAX_LINE + 1];
        let cases: &[&[u8]] = &[
            b"* PREAUTH IMAP4rev1 logged in\r\n",
            b"* BYE Too busy\r\n",
            b"* NO nope\r\n",
            b"hello\r\n",
            b"+ go ahead\r\n",
            b"C1 OK hi\r\n",
            b"\r\n",
            b"*OK\r\n",
            &long,
        ];
        for input in cases {
            let mut m = BackendMachine::new(plain(), joe());
            let (_, sent, other) = feed(&mut m, input);
            assert_eq!(sent, "");
            assert_eq!(
                other,
                unavailable(Unavailable::Greeting),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let mut m = BackendMachine::new(plain(), joe());
        assert_eq!(feed(&mut m, b"* OK still talk").0, 0);
        assert_eq!(m.poll_action(), None);
    }

    #[test]
    fn starttls_then_capabilities_read_again() {
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
        let (_, sent, other) = feed(
            &mut m,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n",
        );
        assert_eq!(sent, "C1 STARTTLS\r\n");
        assert!(other.is_empty());
        // Injected data after the OK stays for the driver to discard.
        let input =
            b"C1 OK Begin TLS now\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\nC2 OK\r\n";
        let (used, sent, other) = feed(&mut m, input);
        assert_eq!(used, 21);
        assert_eq!(sent, "");
        assert_eq!(other, vec![BackendAction::StartTls]);
        assert_eq!(m.receive(&input[used..]), 0);
        m.tls_established();
        assert_eq!(
            m.poll_action(),
            Some(BackendAction::Send(b"C2 CAPABILITY\r\n".to_vec()))
        );
        // Over TLS the server tells the truth: no SASL-IR, so a quoted LOGIN.
        let (_, sent, _) = feed(
            &mut m,
            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC2 OK done\r\n",
        );
        assert_eq!(sent, "C3 LOGIN \"joe\" \"s3cret\"\r\n");
        let (_, _, other) = feed(&mut m, b"C3 OK [CAPABILITY IMAP4rev1] ok\r\n");
        assert_eq!(other, logged_in("IMAP4rev1"));

        // Capabilities from a CAPABILITY command before TLS are not trusted either.
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
        let (_, sent, _) = feed(
            &mut m,
            b"* OK hi\r\n* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\nC1 OK\r\n",
        );
        assert_eq!(sent, "C1 CAPABILITY\r\nC2 STARTTLS\r\n");
        let (_, _, other) = feed(&mut m, b"C2 OK go\r\n");
        assert_eq!(other, vec![BackendAction::StartTls]);
        m.tls_established();
        let (_, sent, _) = feed(&mut m, b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\nC3 OK\r\n");
        assert_eq!(sent, "C3 CAPABILITY\r\n");
        assert_eq!(m.poll_action(), None);
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
        feed(
            &mut m,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\nC1 OK\r\n",
        );
        m.tls_established();
        m.poll_action();
        let (_, sent, other) = feed(&mut m, b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\nC2 OK\r\n");
        assert_eq!(sent, "");
        assert_eq!(other, unavailable(Unavailable::NoMechanism));
    }

    #[test]
    fn starttls_refused_or_hidden() {
        let cases: &[&[u8]] = &[
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n",
            b"* OK hi\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC1 OK\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\nC1 NO no TLS today\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\nC1 BAD what\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n* BYE bye\r\n",
        ];
        for input in cases {
            let (sent, actions, _) =
                assert_split_invariant(&policy(BackendTls::StartTls), &joe(), input);
            assert!(
                !sent.contains("LOGIN") && !sent.contains("AUTHENTICATE"),
                "{sent}"
            );
            assert_eq!(
                actions,
                unavailable(Unavailable::Tls),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn implicit_tls_trusts_the_first_capabilities() {
        let (sent, _, _) = conversation(
            &policy(BackendTls::Implicit),
            joe(),
            &[b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN SASL-IR] hi\r\n"],
        );
        assert_eq!(sent, "C1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n");
    }

    #[test]
    fn login_command_encodings() {
        let greeting = |caps: &str| format!("* OK [CAPABILITY {caps}] hi\r\n").into_bytes();
        let cases: Vec<(&str, Credentials, &str)> = vec![
            (
                "IMAP4rev1",
                creds("joe", b"s3cret"),
                "C1 LOGIN \"joe\" \"s3cret\"\r\n",
            ),
            (
                "IMAP4rev1",
                creds("j\"o\\e x", b"{5}"),
                "C1 LOGIN \"j\\\"o\\\\e x\" \"{5}\"\r\n",
            ),
            ("IMAP4rev1", creds("joe", b""), "C1 LOGIN \"joe\" \"\"\r\n"),
            (
                "IMAP4rev1 LITERAL+",
                creds("jöe", b"pa\r\nss"),
                "C1 LOGIN {4+}\r\njöe {6+}\r\npa\r\nss\r\n",
            ),
            (
                "IMAP4rev1 LITERAL-",
                creds("joe", "pässword".as_bytes()),
                "C1 LOGIN \"joe\" {9+}\r\npässword\r\n",
            ),
            // Sync literals: only the part up to the first literal goes out at once.
            ("IMAP4rev1", creds("jöe", b"s3cret"), "C1 LOGIN {4}\r\n"),
            (
                "IMAP4rev1 AUTH=LOGIN",
                creds("joe", b"s3cret"),
                "C1 LOGIN \"joe\" \"s3cret\"\r\n",
            ),
        ];
        for (caps, c, expected) in cases {
            let (sent, actions, _) = conversation(&plain(), Some(c), &[&greeting(caps)]);
            assert_eq!(sent, expected, "{caps}");
            assert!(actions.is_empty());
        }
        // LITERAL- above 4096 bytes: synchronizing.
        let long = vec![b'\x01'; 4097];
        let (sent, _, _) = conversation(
            &plain(),
            Some(creds("joe", &long)),
            &[&greeting("IMAP4rev1 LITERAL-")],
        );
        assert_eq!(sent, "C1 LOGIN \"joe\" {4097}\r\n");
    }

    #[test]
    fn synchronizing_literals_wait_for_continuation() {
        let mut m = BackendMachine::new(plain(), Some(creds("jöe", b"pa\r\nss")));
        let (_, sent, _) = feed(&mut m, b"* OK [CAPABILITY IMAP4rev1] hi\r\n");
        assert_eq!(sent, "C1 LOGIN {4}\r\n");
        assert_eq!(feed(&mut m, b"").1, "");
        let (_, sent, _) = feed(&mut m, b"+ Ready\r\n");
        assert_eq!(sent, "jöe {6}\r\n");
        let (_, sent, _) = feed(&mut m, b"* OK [ALERT] noise\r\n+ Ready\r\n");
        assert_eq!(sent, "pa\r\nss\r\n");
        let (_, _, other) = feed(&mut m, b"C1 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n");
        assert_eq!(other, logged_in("IMAP4rev1 IDLE"));

        // A refusal instead of the continuation ends the login.
        let (sent, actions, _) = assert_split_invariant(
            &plain(),
            &Some(creds("jöe", b"x")),
            b"* OK [CAPABILITY IMAP4rev1] hi\r\nC1 BAD [TOOBIG] no literals\r\n",
        );
        assert_eq!(sent, "C1 LOGIN {4}\r\n");
        assert_eq!(actions, auth_failed(AUTH_FAILED));
        // A continuation too many is a protocol error.
        let (_, actions, _) = conversation(
            &plain(),
            joe(),
            &[b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n+ more?\r\n"],
        );
        assert_eq!(actions, unavailable(Unavailable::Protocol));
    }

    /// The login a backend sees is exactly one command holding exactly the credentials,
    /// whatever bytes they hold: replayed against our own server machine.
    #[test]
    fn credentials_are_one_command_whatever_they_hold() {
        let users = [
            "joe", "jo\"e", "jo\\e", "j oe", "{5}", "jöe", "a{5}", "x) (y", "*", "NIL",
        ];
        let long_pass = "é".repeat(3000);
        let passes: Vec<&[u8]> = vec![
            b"s3cret",
            b"p\"w",
            b"p\\w",
            b"p w",
            b"{5}",
            b"{5+}",
            b"pa\r\nss",
            b"a\r\nC2 LOGOUT\r\n",
            "pä".as_bytes(),
            b"",
            b"\"",
            b"\xff\xfe",
            long_pass.as_bytes(),
        ];
        let cap_sets = [
            "IMAP4rev1",
            "IMAP4rev1 LITERAL+",
            "IMAP4rev1 LITERAL-",
            "IMAP4rev1 AUTH=PLAIN",
            "IMAP4rev1 AUTH=PLAIN SASL-IR",
            "IMAP4rev1 LOGINDISABLED AUTH=LOGIN",
        ];
        for caps in cap_sets {
            for user in users {
                for pass in &passes {
                    let c = creds(user, pass);
                    let got = match replay(caps, c.clone()) {
                        Ok(got) => got,
                        Err(e) => panic!("{caps} {user:?} {pass:?}: {e}"),
                    };
                    assert_eq!(got.user, c.user, "{caps}");
                    assert_eq!(
                        got.secret().map(Secret::expose),
                        c.secret().map(Secret::expose),
                        "{caps} {user:?}"
                    );
                }
            }
        }
    }

    /// Runs a login from a [`BackendMachine`] into a [`ServerMachine`] and returns the
    /// credentials the server machine asks to log in with, checking that every byte sent
    /// was consumed, by one command.
    fn replay(caps: &str, c: Credentials) -> Result<Credentials, String> {
        let mut b = BackendMachine::new(plain(), Some(c));
        let mut s = ServerMachine::new(ServerPolicy {
            tls: ListenerTls::Implicit,
            allow_plaintext_auth: false,
            limits: crate::proto::Limits::default(),
            hostname: "x".into(),
            mechanisms: Default::default(),
        });
        s.poll_action();
        let greeting = format!("* OK [CAPABILITY {caps}] hi\r\n");
        assert!(b.receive(greeting.as_bytes()) > 0);
        let mut to_server = Vec::new();
        let mut s_buf = Vec::new();
        for _ in 0..10 {
            while let Some(action) = b.poll_action() {
                match action {
                    BackendAction::Send(bytes) => to_server.extend_from_slice(&bytes),
                    other => return Err(format!("backend: {other:?}")),
                }
            }
            s_buf.append(&mut to_server);
            let mut to_backend = Vec::new();
            loop {
                let used = s.receive(&s_buf);
                s_buf.drain(..used);
                while let Some(action) = s.poll_action() {
                    match action {
                        Action::Send(bytes) => to_backend.extend_from_slice(&bytes),
                        Action::Login(c) if s_buf.is_empty() => return Ok(c),
                        other => return Err(format!("server: {other:?}, left {s_buf:?}")),
                    }
                }
                if used == 0 {
                    break;
                }
            }
            let used = b.receive(&to_backend);
            if used != to_backend.len() {
                return Err(format!("backend left {:?}", &to_backend[used..]));
            }
        }
        Err("no login".into())
    }

    #[test]
    fn login_failures() {
        let greeting: &[u8] = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n";
        let cases: &[(&[u8], Vec<BackendAction>)] = &[
            (
                b"C1 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n",
                auth_failed("[AUTHENTICATIONFAILED] Invalid credentials"),
            ),
            (
                b"C1 no [authorizationfailed] Not you\r\n",
                auth_failed("[AUTHORIZATIONFAILED] Not you"),
            ),
            (
                b"C1 NO [EXPIRED]\r\n",
                auth_failed("[EXPIRED] Authentication failed."),
            ),
            (
                b"C1 NO [CONTACTADMIN] call\r\n",
                auth_failed("[CONTACTADMIN] call"),
            ),
            (
                b"C1 NO [LIMIT] too many\r\n",
                auth_failed("[LIMIT] too many"),
            ),
            (
                b"C1 NO [PRIVACYREQUIRED] tls\r\n",
                auth_failed("[PRIVACYREQUIRED] tls"),
            ),
            (
                b"C1 NO [REFERRAL imap://evil.example/] Go elsewhere\r\n",
                auth_failed("Go elsewhere"),
            ),
            (
                b"C1 NO [ALERT] Bad\x00 news \x1b[31m\r\n",
                auth_failed("Bad news [31m"),
            ),
            (b"C1 NO\r\n", auth_failed("Authentication failed.")),
            (
                b"C1 NO [UNAVAILABLE] Backend down\r\n",
                unavailable(Unavailable::Protocol),
            ),
            (
                b"C1 BAD Invalid characters in atom\r\n",
                auth_failed(AUTH_FAILED),
            ),
            (
                b"* BYE Shutting down\r\n",
                unavailable(Unavailable::Protocol),
            ),
            (b"C9 OK wrong tag\r\n", unavailable(Unavailable::Protocol)),
            (b"C1 MAYBE\r\n", unavailable(Unavailable::Protocol)),
        ];
        for (reply, expected) in cases {
            let input = [greeting, reply].concat();
            let (_, actions, left) = assert_split_invariant(&plain(), &joe(), &input);
            assert_eq!(&actions, expected, "{}", String::from_utf8_lossy(reply));
            assert!(left.is_empty());
        }
    }

    #[test]
    fn capabilities_after_login() {
        // From an untagged CAPABILITY after the login command.
        let (sent, actions, left) = assert_split_invariant(
            &plain(),
            &joe(),
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n\
              * CAPABILITY IMAP4rev1 MOVE\r\nC1 OK Logged in\r\n* 3 EXISTS\r\n",
        );
        assert_eq!(sent, "C1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(actions, logged_in("IMAP4rev1 MOVE"));
        assert_eq!(left, b"* 3 EXISTS\r\n");
        // Caps seen before the login command do not count, and none are asked for after.
        let (sent, actions, _) = conversation(
            &plain(),
            joe(),
            &[b"* OK hi\r\n* CAPABILITY IMAP4rev1\r\nC1 OK\r\nC2 OK Logged in\r\n"],
        );
        assert_eq!(sent, "C1 CAPABILITY\r\nC2 LOGIN \"joe\" \"s3cret\"\r\n");
        assert_eq!(
            actions,
            done(BackendResult::LoggedIn { capabilities: None })
        );
    }

    #[test]
    fn probe() {
        let (sent, actions, _) = assert_split_invariant(
            &plain(),
            &None,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n",
        );
        assert_eq!(sent, "C1 LOGOUT\r\n");
        let caps = ["IMAP4rev1", "STARTTLS", "AUTH=PLAIN"]
            .map(String::from)
            .to_vec();
        assert_eq!(actions, done(BackendResult::Ready { capabilities: caps }));

        let mut m = BackendMachine::new(policy(BackendTls::StartTls), None);
        let (_, sent, _) = feed(
            &mut m,
            b"* OK hi\r\n* CAPABILITY IMAP4rev1 STARTTLS\r\nC1 OK\r\n",
        );
        assert_eq!(sent, "C1 CAPABILITY\r\nC2 STARTTLS\r\n");
        let (_, _, other) = feed(&mut m, b"C2 OK\r\n");
        assert_eq!(other, vec![BackendAction::StartTls]);
        m.tls_established();
        let (_, sent, other) = feed(&mut m, b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC3 OK\r\n");
        assert_eq!(sent, "C3 CAPABILITY\r\nC4 LOGOUT\r\n");
        let caps = ["IMAP4rev1", "AUTH=PLAIN"].map(String::from).to_vec();
        assert_eq!(other, done(BackendResult::Ready { capabilities: caps }));

        let (_, actions, _) = conversation(&plain(), None, &[b"* BYE busy\r\n"]);
        assert_eq!(actions, unavailable(Unavailable::Greeting));
    }

    #[test]
    fn id_forwarding() {
        let mut p = plain();
        p.forward_client = Some(ClientInfo {
            ip: "203.0.113.7".parse().unwrap(),
            port: 51234,
        });
        let (sent, actions, _) = assert_split_invariant(
            &p,
            &joe(),
            b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN SASL-IR] hi\r\n\
              * ID (\"name\" \"Dovecot\")\r\nC1 NO not trusted\r\n\
              C2 OK [CAPABILITY IMAP4rev1] ok\r\n",
        );
        assert_eq!(
            sent,
            "C1 ID (\"x-originating-ip\" \"203.0.113.7\" \"x-originating-port\" \"51234\")\r\n\
             C2 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n"
        );
        assert_eq!(actions, logged_in("IMAP4rev1"));
        // Only when offered.
        let (sent, _, _) = conversation(
            &p,
            joe(),
            &[b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n"],
        );
        assert_eq!(sent, "C1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n");
        // IPv6, and not for a probe.
        p.forward_client = Some(ClientInfo {
            ip: "2001:db8::1".parse().unwrap(),
            port: 1,
        });
        let (sent, _, _) = conversation(&p, joe(), &[b"* OK [CAPABILITY IMAP4rev1 ID] hi\r\n"]);
        assert_eq!(
            sent,
            "C1 ID (\"x-originating-ip\" \"2001:db8::1\" \"x-originating-port\" \"1\")\r\n"
        );
        let (sent, _, _) = conversation(&p, None, &[b"* OK [CAPABILITY IMAP4rev1 ID] hi\r\n"]);
        assert_eq!(sent, "C1 LOGOUT\r\n");
    }

    #[test]
    fn sasl_login_when_login_is_disabled() {
        let (sent, actions, left) = assert_split_invariant(
            &plain(),
            &joe(),
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ LOGINDISABLED AUTH=LOGIN] hi\r\n\
              + VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\nC1 OK [CAPABILITY IMAP4rev1] ok\r\nrest",
        );
        assert_eq!(sent, "C1 AUTHENTICATE LOGIN\r\nam9l\r\nczNjcmV0\r\n");
        assert_eq!(actions, logged_in("IMAP4rev1"));
        assert_eq!(left, b"rest");
        // AUTH=PLAIN and the LOGIN command come first.
        let (sent, _, _) = conversation(
            &plain(),
            joe(),
            &[b"* OK [CAPABILITY IMAP4rev1 AUTH=LOGIN] hi\r\n"],
        );
        assert_eq!(sent, "C1 LOGIN \"joe\" \"s3cret\"\r\n");
    }

    #[test]
    fn no_usable_mechanism_or_unsendable_credentials() {
        let (sent, actions, _) = conversation(
            &plain(),
            joe(),
            &[b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=GSSAPI] hi\r\n"],
        );
        assert_eq!(sent, "");
        assert_eq!(actions, unavailable(Unavailable::NoMechanism));
        for caps in [
            "IMAP4rev1",
            "IMAP4rev1 AUTH=PLAIN SASL-IR",
            "IMAP4rev1 LITERAL+",
            "IMAP4rev1 LOGINDISABLED AUTH=LOGIN",
        ] {
            let greeting = format!("* OK [CAPABILITY {caps}] hi\r\n");
            let (sent, actions, _) = conversation(
                &plain(),
                Some(creds("joe", b"a\0b")),
                &[greeting.as_bytes()],
            );
            assert_eq!(sent, "", "{caps}");
            assert_eq!(actions, auth_failed(AUTH_FAILED));
        }
    }

    #[test]
    fn untagged_literals_are_skipped() {
        let (sent, actions, _) = assert_split_invariant(
            &plain(),
            &joe(),
            b"* OK hi\r\n\
              * ID (\"name\" {5}\r\nC1 OK {3}\r\nC1 )\r\n\
              * OK [ALERT] see {5}\r\n\
              * CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\nC1 OK done\r\n",
        );
        assert_eq!(
            sent,
            "C1 CAPABILITY\r\nC2 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\n"
        );
        assert!(actions.is_empty());
        let (_, actions, _) = conversation(
            &plain(),
            joe(),
            &[b"* OK hi\r\n* 1 FETCH (BODY[] {65537}\r\n"],
        );
        assert_eq!(actions, unavailable(Unavailable::Protocol));
    }

    #[test]
    fn overlong_backend_line() {
        let mut input = b"* OK hi\r\n* CAPABILITY ".to_vec();
        input.extend(vec![b'X'; MAX_LINE]);
        let (_, actions, _) = conversation(&plain(), joe(), &[&input]);
        assert_eq!(actions, unavailable(Unavailable::Protocol));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut m = BackendMachine::new(plain(), Some(creds("jöe", b"hunter2")));
        assert!(!format!("{m:?}").contains("hunter2"));
        m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n");
        let dbg = format!("{m:?}");
        assert!(dbg.contains("Pieces(1 left)"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let mut m = BackendMachine::new(plain(), Some(creds("joe", b"hunter2")));
        m.receive(b"* OK [CAPABILITY IMAP4rev1] hi\r\n");
        let dbg = format!("{m:?}");
        assert!(dbg.contains("queued_actions: 1"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let mut m = BackendMachine::new(plain(), Some(creds("joe", b"hunter2")));
        m.receive(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n");
        m.poll_action();
        let dbg = format!("{m:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("AGpvZQBodW50ZXIy"),
            "{dbg}"
        );
    }

    #[test]
    fn calls_out_of_order_are_ignored() {
        let mut m = BackendMachine::new(plain(), joe());
        m.tls_established();
        assert_eq!(m.poll_action(), None);
        let (_, _, actions) = feed(&mut m, b"* BYE\r\n");
        assert_eq!(actions, unavailable(Unavailable::Greeting));
        assert_eq!(m.receive(b"* OK hi\r\n"), 0);
        m.tls_established();
        assert_eq!(m.poll_action(), None);
    }
}

//! The one model of the socket drivers, for unit tests and fuzzing: [`ServerDriver`] drives
//! any [`PreAuth`] machine the way `session.rs` does, [`BackendDriver`] any
//! [`BackendLogin`] machine the way `backend/` does, both without sockets, and both
//! assert the input contract of [`crate::proto`] on every step:
//!
//! * `receive` never consumes more than it was given, nothing while a login or a TLS
//!   handshake is pending, nothing after `Close` / `Done`; no action follows them;
//! * every reply or command is CRLF-terminated, and one step's output is bounded;
//! * credentials handed out hold a non-empty user name without NUL, CR or LF.
//!
//! Protocols add their own checks through hooks (a reply's shape, how much one `receive`
//! may consume), and the tests read the transcript: everything sent, with the other
//! actions as markers (`<starttls>`, `<discard N>`, `<login USER SECRET MECHANISM>`,
//! `<close>`), the logins asked for, and the bytes the driver still holds.

use super::{
    Action, BackendAction, BackendLogin, BackendResult, Credentials, LoginOutcome, PreAuth,
};

/// Most bytes one event may make a machine send (a greeting, a reply, a login command).
pub const MAX_STEP_OUTPUT: usize = 16 * 1024;

/// What the driver does with input it holds when the machine asks for STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsInput {
    /// Discard it, as `session.rs` does (plaintext pipelined behind STARTTLS is never
    /// executed inside TLS); `<discard N>` is recorded when there was any.
    Discard,
    /// Keep it as if it had come through TLS: the transcript then cannot depend on how
    /// the input was split, which is what split-invariance checks need.
    Keep,
    /// Treat it as an attack and close (`<plaintext after STARTTLS: closed>`).
    Refuse,
}

/// One login a machine asked for: user, password bytes (empty for the bridge), mechanism.
pub type LoginSeen = (String, Vec<u8>, &'static str);

/// What a client-facing session did, comparable across read boundaries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// Everything sent, in order, with the other actions as markers (when enabled).
    pub out: Vec<u8>,
    /// The logins asked for, in order.
    pub logins: Vec<LoginSeen>,
    /// STARTTLS handshakes asked for.
    pub starttls: usize,
    /// `Close` was asked for.
    pub closed: bool,
    /// The machine handed over to the relay.
    pub authenticated: bool,
    /// What the driver's buffer still holds: after a hand-off, what the relay sends to the
    /// backend first.
    pub left: Vec<u8>,
}

impl Transcript {
    /// The output as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

type BytesHook<'a> = Box<dyn FnMut(&[u8]) + 'a>;
type LoginHook<'a> = Box<dyn FnMut(&Credentials) -> LoginOutcome + 'a>;
type SendHook<'a, M> = Box<dyn FnMut(&M, &[u8]) + 'a>;
type ConsumedHook<'a, M> = Box<dyn FnMut(&M, Consumed<'_>) + 'a>;

/// What one `receive` consumed, for [`ServerDriver::on_consumed`] checks.
pub struct Consumed<'b> {
    /// The bytes consumed.
    pub bytes: &'b [u8],
    /// The bytes still held after them.
    pub left: &'b [u8],
    /// Whether the machine has closed.
    pub closed: bool,
}

/// Drives one [`PreAuth`] machine: one input buffer, chunks appended as they arrive,
/// `receive` while it consumes, every action drained after every event, logins answered
/// by a closure.
pub struct ServerDriver<'a, M: PreAuth> {
    /// The machine.
    pub machine: M,
    buf: Vec<u8>,
    t: Transcript,
    login: LoginHook<'a>,
    on_send: Option<SendHook<'a, M>>,
    on_consumed: Option<ConsumedHook<'a, M>>,
    tls_input: TlsInput,
    markers: bool,
    max_step_output: usize,
    max_buffer: usize,
}

impl<'a, M: PreAuth> ServerDriver<'a, M> {
    /// A driver for `machine` whose logins are answered by `login`; drains the greeting.
    /// Markers on, STARTTLS discards (as the session does).
    pub fn new(machine: M, login: impl FnMut(&Credentials) -> LoginOutcome + 'a) -> Self {
        let mut d = ServerDriver {
            machine,
            buf: Vec::new(),
            t: Transcript::default(),
            login: Box::new(login),
            on_send: None,
            on_consumed: None,
            tls_input: TlsInput::Discard,
            markers: true,
            max_step_output: MAX_STEP_OUTPUT,
            max_buffer: usize::MAX,
        };
        d.pump();
        d
    }

    /// The most the driver may have to hold while the machine makes no progress (the
    /// bound [`super::Limits`] promises: `max_line + max_literal`).
    pub fn max_buffer(mut self, max: usize) -> Self {
        self.max_buffer = max;
        self
    }

    /// Logins answered from `outcomes` in order, then by `otherwise` for good.
    pub fn scripted(machine: M, outcomes: &[LoginOutcome], otherwise: LoginOutcome) -> Self {
        let mut queue: std::collections::VecDeque<LoginOutcome> =
            outcomes.iter().cloned().collect();
        Self::new(machine, move |_| {
            queue.pop_front().unwrap_or_else(|| otherwise.clone())
        })
    }

    /// What to do with held input at STARTTLS.
    pub fn tls_input(mut self, mode: TlsInput) -> Self {
        self.tls_input = mode;
        self
    }

    /// Whether actions other than `Send` are recorded in the output as markers.
    pub fn markers(mut self, on: bool) -> Self {
        self.markers = on;
        self
    }

    /// The most one event may make the machine send.
    pub fn max_step_output(mut self, max: usize) -> Self {
        self.max_step_output = max;
        self
    }

    /// A check run on every `Send`.
    pub fn on_send(mut self, hook: impl FnMut(&M, &[u8]) + 'a) -> Self {
        self.on_send = Some(Box::new(hook));
        self
    }

    /// A check run after every `receive` that consumed bytes (and the actions it queued
    /// were drained).
    pub fn on_consumed(mut self, hook: impl FnMut(&M, Consumed<'_>) + 'a) -> Self {
        self.on_consumed = Some(Box::new(hook));
        self
    }

    /// One read from the client.
    pub fn feed(&mut self, chunk: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(chunk);
        // Bytes keep arriving after a hand-off or Close: they stay in the buffer (relayed
        // to the backend, or dropped with the connection).
        while !self.t.closed && !self.t.authenticated {
            let used = self.machine.receive(&self.buf);
            assert!(
                used <= self.buf.len(),
                "consumed {used} of {}",
                self.buf.len()
            );
            let consumed: Vec<u8> = self.buf.drain(..used).collect();
            self.pump();
            if let (Some(hook), true) = (self.on_consumed.as_mut(), used > 0) {
                let consumed = Consumed {
                    bytes: &consumed,
                    left: &self.buf,
                    closed: self.t.closed,
                };
                hook(&self.machine, consumed);
            }
            if used == 0 {
                break;
            }
        }
        if self.t.closed {
            assert_eq!(
                self.machine.receive(&self.buf),
                0,
                "input consumed after Close"
            );
            assert!(self.machine.poll_action().is_none(), "action after Close");
        } else if !self.t.authenticated {
            assert!(
                self.buf.len() <= self.max_buffer,
                "{} bytes buffered without progress (limit {})",
                self.buf.len(),
                self.max_buffer
            );
        }
        self.t.left = self.buf.clone();
        self
    }

    /// Every chunk in turn.
    pub fn feed_all(&mut self, chunks: &[&[u8]]) -> &mut Self {
        for chunk in chunks {
            self.feed(chunk);
        }
        self
    }

    /// Ends an open session as the driver does when the client stays silent
    /// (`timed_out`) or the proxy drains (`shutting_down`): both must close.
    pub fn end(&mut self, shutting_down: bool) -> &mut Self {
        if !self.t.closed && !self.t.authenticated {
            if shutting_down {
                self.machine.shutting_down();
            } else {
                self.machine.timed_out();
            }
            self.pump();
            assert!(self.t.closed, "timed_out / shutting_down must Close");
        }
        self
    }

    /// What happened so far.
    pub fn transcript(&self) -> &Transcript {
        &self.t
    }

    /// Takes the output so far (the rest of the transcript stays).
    pub fn take_text(&mut self) -> String {
        let out = std::mem::take(&mut self.t.out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The whole transcript, consuming the driver.
    pub fn finish(self) -> Transcript {
        self.t
    }

    fn mark(&mut self, marker: &str) {
        if self.markers {
            self.t.out.extend_from_slice(marker.as_bytes());
        }
    }

    /// STARTTLS asked for: nothing may be consumed meanwhile; the held input is handled
    /// as configured. False when the driver closed the session instead.
    fn start_tls(&mut self) -> bool {
        self.t.starttls += 1;
        self.mark("<starttls>");
        assert_eq!(
            self.machine.receive(&self.buf),
            0,
            "consumed during STARTTLS"
        );
        assert!(
            self.machine.poll_action().is_none(),
            "action during STARTTLS"
        );
        if !self.buf.is_empty() {
            match self.tls_input {
                TlsInput::Keep => {}
                TlsInput::Discard => {
                    self.mark(&format!("<discard {}>", self.buf.len()));
                    self.buf.clear();
                }
                TlsInput::Refuse => {
                    self.t
                        .out
                        .extend_from_slice(b"<plaintext after STARTTLS: closed>");
                    self.t.closed = true;
                    return false;
                }
            }
        }
        self.machine.tls_established();
        true
    }

    /// A login asked for: checked, recorded, answered.
    fn login(&mut self, creds: &Credentials) {
        let user = &creds.user;
        // A token may claim no identity (OAUTHBEARER without `a=`): the token has one.
        let token = creds.token_payload().map(|(p, _)| p.expose().to_vec());
        assert!(!user.is_empty() || token.is_some(), "empty user name");
        assert!(
            !user.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')),
            "NUL, CR or LF in user name {user:?}"
        );
        let secret = creds
            .secret()
            .map(|s| s.expose().to_vec())
            .or(token)
            .unwrap_or_default();
        if self.markers {
            let marker = format!(
                "<login {user} {} {}>",
                String::from_utf8_lossy(&secret),
                creds.mechanism()
            );
            self.t.out.extend_from_slice(marker.as_bytes());
        }
        self.t
            .logins
            .push((user.clone(), secret, creds.mechanism()));
        assert_eq!(self.machine.receive(&self.buf), 0, "consumed during login");
        assert!(self.machine.poll_action().is_none(), "action after Login");
        let outcome = (self.login)(creds);
        self.machine.login_done(outcome);
    }

    fn pump(&mut self) {
        let mut output = 0;
        while let Some(action) = self.machine.poll_action() {
            assert!(!self.t.closed, "action after Close: {action:?}");
            assert!(
                !self.machine.is_authenticated() || matches!(action, Action::Send(_)),
                "action other than the final reply after the hand-off: {action:?}"
            );
            match action {
                Action::Send(bytes) => {
                    assert!(
                        bytes.ends_with(b"\r\n"),
                        "reply not CRLF-terminated: {:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                    output += bytes.len();
                    assert!(
                        output <= self.max_step_output,
                        "{output} bytes of output in one step"
                    );
                    if let Some(hook) = self.on_send.as_mut() {
                        hook(&self.machine, &bytes);
                    }
                    self.t.out.extend_from_slice(&bytes);
                }
                Action::StartTls => {
                    if !self.start_tls() {
                        return;
                    }
                }
                Action::Login(creds) => self.login(&creds),
                Action::Close => {
                    self.mark("<close>");
                    self.t.closed = true;
                }
            }
        }
        self.t.authenticated = self.machine.is_authenticated();
    }
}

/// Runs `make()`'s driver on `chunks` twice with the buffer kept across STARTTLS, once
/// split as given and once joined into one read, ends an open session with `timed_out`,
/// and asserts both transcripts agree. What is left unread counts only after a hand-off
/// (the relay sends it to the backend); after a Close it is dropped, and how much of it
/// there is may depend on the reads. Returns the split transcript.
pub fn assert_split_invariant<'a, M: PreAuth>(
    make: impl Fn() -> ServerDriver<'a, M>,
    chunks: &[&[u8]],
) -> Transcript {
    let run = |chunks: &[&[u8]]| {
        let mut d = make().tls_input(TlsInput::Keep);
        d.feed_all(chunks).end(false);
        let mut t = d.finish();
        if !t.authenticated {
            t.left.clear();
        }
        t
    };
    let split = run(chunks);
    let joined = run(&[&chunks.concat()]);
    assert!(
        split == joined,
        "transcript depends on read boundaries:\n split: {:?}\njoined: {:?}",
        split.text(),
        joined.text()
    );
    split
}

/// Drives one [`BackendLogin`] machine as `backend/` does: one buffer, `receive` while it
/// consumes, every action drained, STARTTLS answered at once.
pub struct BackendDriver<'a, M: BackendLogin> {
    /// The machine.
    pub machine: M,
    buf: Vec<u8>,
    log: Vec<u8>,
    result: Option<BackendResult>,
    discard_on_tls: bool,
    max_buffer: usize,
    on_send: Option<BytesHook<'a>>,
}

impl<'a, M: BackendLogin> BackendDriver<'a, M> {
    /// A driver for `machine`; drains what it sends first. STARTTLS discards the buffer
    /// (as `backend/` does: bytes before the handshake are not trusted).
    pub fn new(machine: M) -> Self {
        let mut d = BackendDriver {
            machine,
            buf: Vec::new(),
            log: Vec::new(),
            result: None,
            discard_on_tls: true,
            max_buffer: usize::MAX,
            on_send: None,
        };
        d.pump();
        d
    }

    /// Whether STARTTLS discards the buffer (false: kept, for split-invariance checks).
    pub fn discard_on_tls(mut self, discard: bool) -> Self {
        self.discard_on_tls = discard;
        self
    }

    /// The most the driver may have to hold without the machine making progress.
    pub fn max_buffer(mut self, max: usize) -> Self {
        self.max_buffer = max;
        self
    }

    /// A check run on every `Send`.
    pub fn on_send(mut self, hook: impl FnMut(&[u8]) + 'a) -> Self {
        self.on_send = Some(Box::new(hook));
        self
    }

    /// One read from the backend.
    pub fn feed(&mut self, chunk: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(chunk);
        while self.result.is_none() {
            let used = self.machine.receive(&self.buf);
            assert!(
                used <= self.buf.len(),
                "consumed {used} of {}",
                self.buf.len()
            );
            self.buf.drain(..used);
            self.pump();
            if used == 0 {
                break;
            }
        }
        if self.result.is_none() {
            assert!(
                self.buf.len() <= self.max_buffer,
                "{} bytes buffered without progress",
                self.buf.len()
            );
        } else {
            assert_eq!(self.machine.receive(&self.buf), 0, "consumed after Done");
            assert!(self.machine.poll_action().is_none(), "action after Done");
        }
        self
    }

    /// Every chunk in turn.
    pub fn feed_all(&mut self, chunks: &[&[u8]]) -> &mut Self {
        for chunk in chunks {
            self.feed(chunk);
        }
        self
    }

    /// Everything sent, with `<starttls>` and `<discard N>` markers.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log).into_owned()
    }

    /// The result, once the machine is done.
    pub fn result(&self) -> Option<&BackendResult> {
        self.result.as_ref()
    }

    /// Bytes not consumed: after `Done`, what belongs to the client.
    pub fn left(&self) -> &[u8] {
        &self.buf
    }

    fn pump(&mut self) {
        let mut output = 0;
        while let Some(action) = self.machine.poll_action() {
            assert!(self.result.is_none(), "action after Done: {action:?}");
            match action {
                BackendAction::Send(bytes) => {
                    assert!(bytes.ends_with(b"\r\n"), "command not CRLF-terminated");
                    output += bytes.len();
                    assert!(output <= MAX_STEP_OUTPUT, "{output} bytes sent in one step");
                    if let Some(hook) = self.on_send.as_mut() {
                        hook(&bytes);
                    }
                    self.log.extend_from_slice(&bytes);
                }
                BackendAction::StartTls => {
                    self.log.extend_from_slice(b"<starttls>");
                    assert_eq!(
                        self.machine.receive(&self.buf),
                        0,
                        "consumed during STARTTLS"
                    );
                    if self.discard_on_tls && !self.buf.is_empty() {
                        let marker = format!("<discard {}>", self.buf.len());
                        self.log.extend_from_slice(marker.as_bytes());
                        self.buf.clear();
                    }
                    self.machine.tls_established();
                }
                BackendAction::Done(result) => self.result = Some(result),
            }
        }
    }
}

/// Runs `make()`'s backend machine on `chunks` with the buffer kept across STARTTLS,
/// split as given and joined, and asserts both agree (log and leftover).
pub fn assert_backend_split_invariant<'a, M: BackendLogin>(
    make: impl Fn() -> BackendDriver<'a, M>,
    chunks: &[&[u8]],
) {
    let mut split = make().discard_on_tls(false);
    split.feed_all(chunks);
    let mut joined = make().discard_on_tls(false);
    joined.feed(&chunks.concat());
    let left = |d: &BackendDriver<'a, M>| {
        if d.result.is_some() {
            d.buf.clone()
        } else {
            Vec::new()
        }
    };
    assert!(
        split.log == joined.log && split.result == joined.result && left(&split) == left(&joined),
        "backend transcript depends on read boundaries:\n split: {:?}\njoined: {:?}",
        split.log(),
        joined.log()
    );
}

//! Protocol handling before login, sans-IO.
//!
//! Nothing in this module (or below it) touches a socket, a clock, DNS or tokio: every
//! machine takes bytes in and gives [`Action`]s / [`BackendAction`]s out. The drivers in
//! `session.rs` (client side) and `backend/` (server side) own the sockets, the single
//! input buffer per connection, and the timers.
//!
//! Two kinds of machine exist per protocol:
//!
//! * a [`PreAuth`] machine speaks to the *client* as a server would, up to the moment the
//!   client has authenticated (IMAP LOGIN/AUTHENTICATE, POP3 USER+PASS/AUTH, SMTP AUTH);
//! * a [`BackendLogin`] machine speaks to one *backend* as a client would: greeting,
//!   STARTTLS if the pool requires it, capability discovery, and the replay of the
//!   client's credentials (or, with no credentials, a health probe).
//!
//! # The input contract (both kinds)
//! `receive(input)` looks at the front of the driver's buffer and returns how many bytes
//! it consumed. It never consumes past the end of the first complete command (or, on the
//! backend side, past the response that ends the login), so bytes a peer pipelined stay in
//! the driver's buffer: after login they are relayed, after STARTTLS they are discarded.
//! A machine may keep a partial command inside (for example an IMAP command waiting for a
//! literal), bounded by [`Limits`]. After every call the driver drains `poll_action()`
//! until it returns `None`, and calls `receive` again while it keeps consuming.

pub mod boundary;
pub mod drive;
pub mod imap;
pub mod line;
pub mod pop3;
pub mod proxy;
pub mod sasl;
pub mod smtp;
pub mod text;

use std::fmt;

/// A password or other secret. Its `Debug` output is redacted in every build profile and
/// its bytes are overwritten when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }
    /// The secret bytes; only the login replay should call this.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites a buffer that held secret material. `black_box` keeps the compiler from
/// proving the writes dead and removing them.
pub fn wipe(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *b = 0;
    }
    std::hint::black_box(buf);
}

/// The SASL mechanism (or plain command) a client logged in with. For a password it is
/// for logs and metrics only (the backend replay picks its own mechanism from what the
/// backend offers); a token is replayed with the mechanism it came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// IMAP LOGIN, POP3 USER/PASS, SASL LOGIN.
    Login,
    /// SASL PLAIN (RFC 4616).
    Plain,
    /// SASL OAUTHBEARER (RFC 7628).
    OAuthBearer,
    /// SASL XOAUTH2 (Google's and Microsoft's).
    XOAuth2,
}

impl Mechanism {
    /// A stable lowercase name, for logs, metrics and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
            Mechanism::OAuthBearer => "oauthbearer",
            Mechanism::XOAuth2 => "xoauth2",
        }
    }

    /// The SASL name, as advertised and sent (`OAUTHBEARER`).
    pub fn sasl_name(self) -> &'static str {
        match self {
            Mechanism::Login => "LOGIN",
            Mechanism::Plain => "PLAIN",
            Mechanism::OAuthBearer => "OAUTHBEARER",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }

    /// Every mechanism, in the order they are advertised.
    pub const ALL: [Mechanism; 4] = [
        Mechanism::Plain,
        Mechanism::Login,
        Mechanism::OAuthBearer,
        Mechanism::XOAuth2,
    ];

    /// The mechanism a SASL name (case-insensitive) or configuration name names.
    pub fn from_name(name: &[u8]) -> Option<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .find(|m| name.eq_ignore_ascii_case(m.sasl_name().as_bytes()))
    }

    /// Carries a bearer token rather than a password.
    pub fn is_token(self) -> bool {
        matches!(self, Mechanism::OAuthBearer | Mechanism::XOAuth2)
    }
}

/// The SASL mechanisms a listener offers (a small set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms(u8);

impl Mechanisms {
    /// No mechanism.
    pub const NONE: Mechanisms = Mechanisms(0);

    /// This set with `m` added.
    pub const fn with(self, m: Mechanism) -> Mechanisms {
        Mechanisms(self.0 | Mechanisms::bit(m))
    }

    const fn bit(m: Mechanism) -> u8 {
        match m {
            Mechanism::Plain => 1,
            Mechanism::Login => 2,
            Mechanism::OAuthBearer => 4,
            Mechanism::XOAuth2 => 8,
        }
    }

    /// Offered.
    pub fn has(self, m: Mechanism) -> bool {
        self.0 & Mechanisms::bit(m) != 0
    }

    /// The offered mechanisms, in advertising order.
    pub fn iter(self) -> impl Iterator<Item = Mechanism> {
        Mechanism::ALL.into_iter().filter(move |m| self.has(*m))
    }

    /// Their SASL names joined by spaces (`PLAIN LOGIN OAUTHBEARER`).
    pub fn names(self) -> String {
        self.iter()
            .map(Mechanism::sasl_name)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Some offered mechanism carries tokens (their responses may be long).
    pub fn has_tokens(self) -> bool {
        self.iter().any(Mechanism::is_token)
    }
}

/// PLAIN and LOGIN: what every listener offers unless told otherwise.
impl Default for Mechanisms {
    fn default() -> Self {
        Mechanisms::NONE
            .with(Mechanism::Plain)
            .with(Mechanism::Login)
    }
}

/// How a login is authorized, from the client machine down to the backend machine: one
/// name for each way, never renamed on the way.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// A password: replayed to the backend (or, for a `pop-before-smtp` SMTP pool,
    /// verified with a POP3 login on the same host first).
    Password {
        /// The password.
        secret: Secret,
        /// How the client sent it (logs only).
        mechanism: Mechanism,
    },
    /// No password: pop-before-smtp vouches for the client. Either the SMTP bridge saw a
    /// recent POP3 or IMAP login from the client's address, or the proxy itself just
    /// verified the password with POP3 on a legacy host. The backend SMTP session is
    /// opened without AUTH.
    Bridged,
    /// An OAuth bearer token (OAUTHBEARER or XOAUTH2): the client's whole SASL response
    /// (GS2 header, token, everything), replayed to the backend with the same mechanism,
    /// never turned into a password login.
    Token {
        /// The decoded SASL response as the client sent it.
        payload: Secret,
        /// OAUTHBEARER or XOAUTH2.
        mechanism: Mechanism,
    },
}

/// Who wants to log in, and how. The user is the authentication identity exactly as the
/// client sent it (normalization is routing's job); it is valid UTF-8 and contains no NUL,
/// CR or LF: the machines refuse anything else before it gets here.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Authentication identity as sent by the client.
    pub user: String,
    /// The password, or the bridge.
    pub auth: Auth,
}

impl Credentials {
    /// A user with a password.
    pub fn password(user: String, secret: Vec<u8>, mechanism: Mechanism) -> Credentials {
        Credentials {
            user,
            auth: Auth::Password {
                secret: Secret::new(secret),
                mechanism,
            },
        }
    }

    /// A user the pop-before-smtp bridge vouches for.
    pub fn bridged(user: String) -> Credentials {
        Credentials {
            user,
            auth: Auth::Bridged,
        }
    }

    /// A user with an OAuth token (`user` is the identity the SASL message claims, or
    /// empty when it claims none).
    pub fn token(user: String, payload: Vec<u8>, mechanism: Mechanism) -> Credentials {
        Credentials {
            user,
            auth: Auth::Token {
                payload: Secret::new(payload),
                mechanism,
            },
        }
    }

    /// The password, if this is a password login.
    pub fn secret(&self) -> Option<&Secret> {
        match &self.auth {
            Auth::Password { secret, .. } => Some(secret),
            Auth::Bridged | Auth::Token { .. } => None,
        }
    }

    /// The token login's SASL payload and mechanism.
    pub fn token_payload(&self) -> Option<(&Secret, Mechanism)> {
        match &self.auth {
            Auth::Token { payload, mechanism } => Some((payload, *mechanism)),
            _ => None,
        }
    }

    /// The same authorization for another name (the backend may get the normalized one).
    pub fn with_user(&self, user: String) -> Credentials {
        Credentials {
            user,
            auth: self.auth.clone(),
        }
    }

    /// How the client logged in, for logs and metrics: `login`, `plain`, `oauthbearer`,
    /// `xoauth2` or `bridged`.
    pub fn mechanism(&self) -> &'static str {
        match &self.auth {
            Auth::Password { mechanism, .. } | Auth::Token { mechanism, .. } => mechanism.as_str(),
            Auth::Bridged => "bridged",
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Credentials");
        d.field("user", &self.user);
        if let Some(secret) = self.secret() {
            d.field("secret", secret);
        }
        if let Some((token, _)) = self.token_payload() {
            d.field("token", token);
        }
        d.field("mechanism", &self.mechanism()).finish()
    }
}

/// Whether and how a client-facing listener does TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    /// Plaintext only; STARTTLS is not offered.
    None,
    /// Plaintext first, STARTTLS/STLS offered.
    StartTls,
    /// TLS from the first byte (993, 995, 465); the machine starts in the TLS state.
    Implicit,
}

/// Whether and how the proxy does TLS towards a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendTls {
    /// Plaintext.
    #[default]
    None,
    /// STARTTLS/STLS, required: a backend that refuses or hides it is unavailable.
    StartTls,
    /// TLS from the first byte.
    Implicit,
}

/// Every bound a pre-auth machine enforces. The driver enforces the byte bound on its
/// buffer too (`max_line` plus a literal is the most it ever holds before login).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest command line, CRLF included, not counting literal data.
    pub max_line: usize,
    /// Largest literal or SASL payload accepted before login.
    pub max_literal: usize,
    /// Failed logins on one connection before it is closed.
    pub max_auth_failures: u32,
    /// Commands accepted before login, after which the connection is closed.
    pub max_commands: u32,
    /// Longest OAuth SASL response (OAUTHBEARER, XOAUTH2), in bytes of base64 as the
    /// client sends it: tokens are larger than passwords.
    pub max_sasl_token: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 8 * 1024,
            max_literal: 8 * 1024,
            max_auth_failures: 3,
            max_commands: 100,
            max_sasl_token: 32 * 1024,
        }
    }
}

/// How a client-facing machine behaves; built by the session from the listener config.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    /// The listener's TLS mode. With `Implicit` the machine starts in the TLS state.
    pub tls: ListenerTls,
    /// Allow authentication before TLS (off by default: IMAP then says LOGINDISABLED).
    pub allow_plaintext_auth: bool,
    /// Bounds.
    pub limits: Limits,
    /// Host name used in greetings (`* OK [CAPABILITY ...] cutover ready`, `220 host ESMTP`).
    pub hostname: String,
    /// The SASL mechanisms offered (once authentication is allowed).
    pub mechanisms: Mechanisms,
}

/// What a client-facing machine asks its driver to do. `Debug` shows only the length of
/// `Send` payloads: pre-auth bytes may carry secrets.
#[derive(PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// Flush, then run the TLS handshake as server. The driver must check that its input
    /// buffer is empty first (anything there was pipelined in plaintext after STARTTLS: it
    /// is discarded, never executed), then call [`PreAuth::tls_established`].
    StartTls,
    /// Route the user and log in to a backend with these credentials, then report the
    /// outcome with [`PreAuth::login_done`]. No other action follows until then.
    Login(Credentials),
    /// Flush what was sent and close the connection.
    Close,
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Send(b) => write!(f, "Send({} bytes)", b.len()),
            Action::StartTls => f.write_str("StartTls"),
            Action::Login(c) => f.debug_tuple("Login").field(c).finish(),
            Action::Close => f.write_str("Close"),
        }
    }
}

impl fmt::Debug for BackendAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAction::Send(b) => write!(f, "Send({} bytes)", b.len()),
            BackendAction::StartTls => f.write_str("StartTls"),
            BackendAction::Done(r) => f.debug_tuple("Done").field(r).finish(),
        }
    }
}

/// What came of a login the machine asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in. For IMAP, the backend's capability list after login (without the
    /// `CAPABILITY` word) for the client's tagged OK.
    Ok {
        /// Backend capabilities, when the protocol reports them at login.
        capabilities: Option<String>,
    },
    /// The backend rejected the credentials. `response` is the backend's text after the
    /// status (IMAP: keeps its response code such as `[AUTHENTICATIONFAILED]`), when known.
    AuthFailed {
        /// Backend's human-readable text, response code included.
        response: Option<String>,
    },
    /// The backend refused an OAuth token with an RFC 7628 error challenge (base64 JSON):
    /// the client is sent the challenge, its answer (`AQ==` or an empty line) is awaited,
    /// and then the failure is said as for [`LoginOutcome::AuthFailed`].
    Challenged {
        /// The backend's challenge, base64 as it sent it.
        challenge: String,
        /// The backend's final text, response code included, when known.
        response: Option<String>,
    },
    /// No server of the pool could be reached. The client gets a temporary failure
    /// (IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, SMTP `454 4.7.0`) and may retry.
    Unavailable,
    /// The credentials cannot be routed or replayed (bad user name, NUL in password, …):
    /// a permanent failure for this attempt, said as an auth failure.
    Refused {
        /// Why, safe to show to the client (never contains the secret).
        reason: &'static str,
    },
}

/// A client-facing pre-authentication machine (one per protocol).
pub trait PreAuth {
    /// Consumes from the front of `input`, never past the end of the first complete
    /// command. Returns the number of bytes consumed. Protocol errors are answered in
    /// protocol (IMAP BAD, POP3 -ERR, SMTP 5xx) through `poll_action`, never by panicking.
    fn receive(&mut self, input: &[u8]) -> usize;
    /// The next thing to do; call until `None` after every event.
    fn poll_action(&mut self) -> Option<Action>;
    /// The TLS handshake asked for with [`Action::StartTls`] completed.
    fn tls_established(&mut self);
    /// The result of the [`Action::Login`] last asked for.
    fn login_done(&mut self, outcome: LoginOutcome);
    /// The client sent nothing for the phase's idle timeout: queue the goodbye and Close.
    fn timed_out(&mut self);
    /// The proxy is shutting down: queue the goodbye and Close.
    fn shutting_down(&mut self);
    /// True once the success reply has been queued: after draining `poll_action` the
    /// driver hands the connection to the relay.
    fn is_authenticated(&self) -> bool;
    /// The name the client gave for itself (SMTP EHLO/HELO argument), for the backend's
    /// EHLO. `None` for protocols without one.
    fn client_name(&self) -> Option<&str> {
        None
    }
}

/// What a backend-facing machine asks its driver to do. `Debug` shows only the length of
/// `Send` payloads: they carry the replayed credentials.
#[derive(PartialEq, Eq)]
pub enum BackendAction {
    /// Write these bytes to the backend.
    Send(Vec<u8>),
    /// Discard every byte still buffered from the backend (it arrived before the
    /// handshake and must not be trusted), run the TLS handshake as client, then call
    /// [`BackendLogin::tls_established`].
    StartTls,
    /// The machine is finished; no more input is consumed. On `LoggedIn`, any bytes still
    /// buffered from the backend belong to the client and are relayed to it.
    Done(BackendResult),
}

/// Why a backend counts as unavailable (drives failover and the metrics' `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No greeting, a negative greeting (`* BYE`, `-ERR`, `4xx`/`5xx`), or PREAUTH when
    /// the proxy has to log in itself.
    Greeting,
    /// TLS was required but the backend refused, hid or botched STARTTLS.
    Tls,
    /// The backend said something the machine could not make sense of, or a temporary
    /// failure (`NO [UNAVAILABLE]`, `-ERR [SYS/TEMP]`, `4xx` to AUTH).
    Protocol,
    /// The backend offers no way to log in that the machine can use safely.
    NoMechanism,
}

impl Unavailable {
    /// Stable label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Unavailable::Greeting => "greeting",
            Unavailable::Tls => "tls",
            Unavailable::Protocol => "protocol",
            Unavailable::NoMechanism => "no_mechanism",
        }
    }
}

/// How a backend login (or probe) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendResult {
    /// Logged in. IMAP: the capability list after login (without the `CAPABILITY` word).
    LoggedIn {
        /// Post-login capabilities, when the protocol has them.
        capabilities: Option<String>,
    },
    /// The backend rejected the credentials; `response` is its text after the status word
    /// (IMAP keeps the `[AUTHENTICATIONFAILED]` code). Never a reason to fail over.
    AuthFailed {
        /// Backend's text, response code included.
        response: String,
    },
    /// The backend refused an OAuth token with an error challenge (RFC 7628), answered
    /// with the dummy response, and then failed the login. Never a reason to fail over.
    TokenRefused {
        /// The challenge (base64 JSON), for the client.
        challenge: String,
        /// Backend's final text, response code included.
        response: String,
    },
    /// A health probe (no credentials) found the server ready. `capabilities` are what it
    /// advertised (IMAP CAPABILITY, POP3 CAPA, SMTP EHLO keywords), one per line.
    Ready {
        /// Advertised capabilities.
        capabilities: Vec<String>,
    },
    /// The server is unavailable: try the next one.
    Unavailable(Unavailable),
}

/// Information about the client the backend may be told (IMAP ID, XCLIENT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Client address.
    pub ip: std::net::IpAddr,
    /// Client port.
    pub port: u16,
}

/// How a backend-facing machine behaves.
#[derive(Debug, Clone)]
pub struct BackendPolicy {
    /// TLS towards this backend.
    pub tls: BackendTls,
    /// When set, tell the backend who the client is (IMAP: `ID ("x-originating-ip" ...)`,
    /// SMTP: `XCLIENT` when the backend advertises it).
    pub forward_client: Option<ClientInfo>,
    /// The name to give in EHLO (SMTP): the client's own EHLO name when known, else the
    /// proxy's host name.
    pub helo: String,
    /// IMAP: the capabilities this server advertised before login (after TLS when TLS is
    /// required) at its last probe or login. With them a greeting without a capability
    /// list costs no `CAPABILITY` round trip; a login refused under them is retried once
    /// with a fresh list if the server's list has changed.
    pub known_capabilities: Option<std::sync::Arc<str>>,
}

/// A backend-facing login (or probe) machine (one per protocol). Same input contract as
/// [`PreAuth`]; for a TLS backend the driver performs the handshake before the first
/// `receive`, and the machine is told so at construction through its policy.
pub trait BackendLogin {
    /// Consumes from the front of `input`; never past the end of the response that
    /// finished the login.
    fn receive(&mut self, input: &[u8]) -> usize;
    /// The next thing to do; call until `None` after every event.
    fn poll_action(&mut self) -> Option<BackendAction>;
    /// The handshake asked for with [`BackendAction::StartTls`] completed.
    fn tls_established(&mut self);
    /// IMAP: the capabilities read from the server itself during this exchange and in
    /// force at its end (to remember for the next login; see
    /// [`BackendPolicy::known_capabilities`]). `None` if none were read (or they came from
    /// the policy).
    fn fresh_capabilities(&self) -> Option<&str> {
        None
    }
}

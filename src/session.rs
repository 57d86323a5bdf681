//! One client connection: TLS (implicit or STARTTLS), the protocol's pre-auth machine,
//! the login (decided by [`crate::login`]), then the relay.
//!
//! The driver owns the only input buffer. The machine consumes whole commands from its
//! front; whatever is left when the client is authenticated was pipelined behind the
//! login and goes to the backend first. Anything buffered when STARTTLS is asked for was
//! sent in plaintext after the command and is discarded, never executed inside TLS.
//!
//! # Which configuration a session uses
//! One snapshot at a time, each taken once. Before login: the one in force when the
//! connection was accepted (listener settings, limits, TLS, holds and throttle). The login
//! pipeline takes the one in force when it routes (after any hold, see [`crate::login`]),
//! and a served session keeps that one to its end (the pool it is relayed in). A reload
//! never changes a running session's view. A reload (or a stage start) that lands between
//! the routing and the session's registration is settled right after it: if the
//! configuration now in force routes the user elsewhere, the session is moved like every
//! other session of a moved user (`on_move`), see [`Control::settle`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::backend::Connected;
use crate::config::{Listener, Protocol, ProxyMode};
use crate::control::sessions::{Entry, Kick, KickReason, Registration};
use crate::control::Control;
use crate::front::{FrontRefusal, Origin};
use crate::login::{self, LoginDone, LoginRequest, Place, Refusal};
use crate::metrics as m;
use crate::proto::{self, proxy, Action, ListenerTls, PreAuth, ServerPolicy};
use crate::relay;
use crate::snapshot::Snapshot;
use crate::stream::{ClientStream, Stream};

/// What a session needs from the process.
#[derive(Clone)]
pub struct SessionCtx {
    /// The configuration in force when the connection was accepted (see the module
    /// documentation for when the session moves to another one).
    pub snap: Arc<Snapshot>,
    /// The listener that accepted it (shared by its sessions).
    pub listener: Arc<Listener>,
    /// Live process state: backends, shared state, shutdown.
    pub control: Arc<Control>,
}

impl SessionCtx {
    fn place(&self) -> Place<'_> {
        Place {
            snap: &self.snap,
            listener: &self.listener,
            control: &self.control,
        }
    }
}

/// How a session ended: the `outcome` of its summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Closed before anything else happened.
    Closed,
    /// The TLS handshake failed or timed out.
    TlsFailed,
    /// Writing to or reading from the client failed.
    ClientError,
    /// Writing the client's pipelined bytes to the backend failed.
    BackendError,
    /// The machine closed the connection (QUIT, LOGOUT, limits).
    ClosedPreauth,
    /// The client closed before logging in.
    ClientClosedPreauth,
    /// The client said nothing for the pre-auth timeout.
    Timeout,
    /// The proxy started draining before the client logged in.
    Shutdown,
    /// The client sent more than a command may hold.
    InputTooLarge,
    /// The last login succeeded (and the relay had not started).
    LoggedIn,
    /// The last login was rejected by the backend.
    AuthFailed,
    /// The last login found no server that could serve.
    BackendUnavailable,
    /// The last login was refused by the proxy (throttled, no route).
    Refused,
    /// The last login waited for a hold longer than `admin.hold_max_wait`.
    HeldTooLong,
    /// Relayed until one side closed.
    Relayed,
    /// The backend connection ended (EOF, reset, timeout) with the client still there and
    /// not leaving: the client got the protocol's goodbye if it stood between responses.
    BackendDied,
    /// The backend said its own goodbye (IMAP BYE, SMTP 421, POP3 -ERR) and closed, with
    /// the client still there (an idle timeout, a restart).
    BackendClosed,
    /// The relay failed.
    RelayError,
    /// Ended by the drain timeout on shutdown.
    Stopped,
    /// Ended by a kick (admin, or the user moved).
    Kicked,
}

impl SessionEnd {
    /// The label in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEnd::Closed => "closed",
            SessionEnd::TlsFailed => "tls_failed",
            SessionEnd::ClientError => "client_error",
            SessionEnd::BackendError => "backend_error",
            SessionEnd::ClosedPreauth => "closed_preauth",
            SessionEnd::ClientClosedPreauth => "client_closed_preauth",
            SessionEnd::Timeout => "timeout",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::InputTooLarge => "input_too_large",
            SessionEnd::LoggedIn => "ok",
            SessionEnd::AuthFailed => "auth_failed",
            SessionEnd::BackendUnavailable => "backend_unavailable",
            SessionEnd::Refused => "refused",
            SessionEnd::HeldTooLong => "held_too_long",
            SessionEnd::Relayed => "relayed",
            SessionEnd::BackendDied => "backend_died",
            SessionEnd::BackendClosed => "backend_closed",
            SessionEnd::RelayError => "relay_error",
            SessionEnd::Stopped => "stopped",
            SessionEnd::Kicked => "kicked",
        }
    }

    fn of_login(done: &LoginDone) -> SessionEnd {
        match done {
            LoginDone::Served(_) => SessionEnd::LoggedIn,
            LoginDone::AuthFailed { .. } => SessionEnd::AuthFailed,
            LoginDone::Unavailable { .. } => SessionEnd::BackendUnavailable,
            LoginDone::Refused {
                refusal: Refusal::HeldTooLong,
                ..
            } => SessionEnd::HeldTooLong,
            LoginDone::Refused { .. } => SessionEnd::Refused,
        }
    }
}

/// Which side ended a relayed session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// What the session learned, for its summary line.
struct Summary {
    user: Option<String>,
    pool: Option<String>,
    server: Option<String>,
    end: SessionEnd,
    closed_by: Option<Side>,
    up: u64,
    down: u64,
}

impl Summary {
    fn login(&mut self, done: &LoginDone) {
        self.user = Some(done.user().to_string());
        self.pool = done.pool().map(str::to_string);
        self.server = done.server().map(str::to_string);
        self.end = SessionEnd::of_login(done);
    }
}

/// Counts a gauge up now and down when dropped, on every path.
struct GaugeGuard(metrics::Gauge);
impl GaugeGuard {
    fn new(g: metrics::Gauge) -> Self {
        g.increment(1.0);
        GaugeGuard(g)
    }
}
impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn new_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Extensions the SMTP listener may advertise: those every probed SMTP server of every
/// pool supports (the client's pool is not known before AUTH).
fn smtp_extensions(ctx: &SessionCtx) -> Vec<String> {
    let mut lists = Vec::new();
    for pool in ctx.snap.config.pools.values() {
        let Some(pp) = pool.protocols.get(&Protocol::Smtp) else {
            continue;
        };
        for addr in &pp.servers {
            let caps = ctx
                .control
                .backends
                .registry
                .get(&pool.name, Protocol::Smtp, addr.as_str())
                .capabilities();
            if !caps.is_empty() {
                lists.push(caps);
            }
        }
    }
    proto::smtp::intersect_extensions(&lists)
}

async fn new_machine(ctx: &SessionCtx, peer: SocketAddr) -> Box<dyn PreAuth + Send> {
    let cfg = &ctx.snap.config;
    let policy = ServerPolicy {
        tls: ctx.listener.tls,
        allow_plaintext_auth: ctx.listener.allow_plaintext_auth,
        limits: cfg.limits.clone(),
        hostname: cfg.hostname.clone(),
        mechanisms: ctx.listener.sasl,
    };
    match ctx.listener.protocol {
        Protocol::Imap => Box::new(proto::imap::ServerMachine::new(policy)),
        Protocol::Pop3 => Box::new(proto::pop3::ServerMachine::new(policy)),
        Protocol::Smtp => {
            let mut sm = proto::smtp::ServerMachine::new(policy, smtp_extensions(ctx));
            if let Some(window) = ctx.listener.bridge_window {
                let state = &ctx.control.state;
                if let Some(user) = state.bridge_user(peer.ip(), window).await {
                    tracing::debug!(%user, "pop-before-smtp bridge: address authorized by a recent login");
                    sm.preauthorize(user);
                }
            }
            Box::new(sm)
        }
    }
}

/// How a relay ended.
enum RelayEnd {
    Closed,
    Error(std::io::Error),
    Stopped,
    Kicked(KickReason),
}

/// Serves one accepted connection to its end; `ticket` is its admission, given back when
/// it ends.
///
/// Not an `async fn`: the session's future is built here in one piece (a nested `async`
/// layer would hold a second copy of its arguments for the whole session).
pub fn run(
    ctx: SessionCtx,
    tcp: TcpStream,
    origin: Origin,
    ticket: crate::control::limits::Ticket,
) -> impl std::future::Future<Output = ()> + Send {
    let id = new_id();
    let peer = origin.client;
    let span = tracing::info_span!(
        "session",
        id,
        instance = %ctx.snap.config.instance_name,
        listener = %ctx.listener.name,
        proto = ctx.listener.protocol.as_str(),
        %peer,
        via = tracing::field::Empty,
        user = tracing::field::Empty,
        pool = tracing::field::Empty,
        backend = tracing::field::Empty,
    );
    if let Some(via) = &origin.via {
        span.record("via", tracing::field::display(via.balancer));
        if via.client_tls.is_some() || via.authority.is_some() {
            tracing::debug!(parent: &span, client_tls = via.client_tls.as_deref(), authority = via.authority.as_deref(), "the balancer's view of the client");
        }
    }
    SESSION_ID.scope(id, session(ctx, tcp, origin, ticket).instrument(span))
}

/// The session's own future. An `async` block rather than an `async fn`: an `async fn`
/// keeps its arguments twice (as received, and moved into its body) for the whole session.
#[allow(clippy::manual_async_fn)]
fn session(
    ctx: SessionCtx,
    tcp: TcpStream,
    origin: Origin,
    ticket: crate::control::limits::Ticket,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let started = Instant::now();
        let handles = m::handles::listener(&ctx.listener.name, ctx.listener.protocol);
        handles.connections.increment(1);
        let _active = GaugeGuard::new(handles.connections_active.clone());
        drop(handles);
        let mut summary = Summary {
            user: None,
            pool: None,
            server: None,
            end: SessionEnd::Closed,
            closed_by: None,
            up: 0,
            down: 0,
        };
        serve(&ctx, tcp, &origin, &mut summary).await;
        drop(ticket);
        tracing::info!(
            outcome = summary.end.as_str(),
            user = summary.user.as_deref().unwrap_or("-"),
            pool = summary.pool.as_deref().unwrap_or("-"),
            server = summary.server.as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            closed_by = match summary.closed_by {
                Some(Side::Client) => "client",
                Some(Side::Backend) => "backend",
                None => "-",
            },
            bytes_up = summary.up,
            bytes_down = summary.down,
            "session end"
        );
    }
}

async fn serve(ctx: &SessionCtx, tcp: TcpStream, origin: &Origin, summary: &mut Summary) {
    let peer = origin.client;
    let client = if ctx.listener.tls == ListenerTls::Implicit {
        match Box::pin(tls_accept(ctx, Stream::Plain(tcp), "implicit")).await {
            Some(s) => s,
            None => {
                summary.end = SessionEnd::TlsFailed;
                return;
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    let mut sm = new_machine(ctx, peer).await;
    // Boxed: the pre-auth and login futures are large and only needed until login; the
    // session's own future stays small for the hours it may spend relaying.
    // The hand-off is boxed too: moved from here into the relay, it would otherwise take
    // its room twice in this future for as long as the session relays.
    let handoff = Box::pin(preauth(ctx, sm.as_mut(), client, origin, summary))
        .await
        .map(Box::new);
    drop(sm);
    if let Some(handoff) = handoff {
        relay_session(ctx, handoff, summary).await;
    }
}

/// Hand-off and relay: backend bytes that followed its login reply go to the client, the
/// client's pipelined bytes go to the backend, then bytes flow both ways until one side
/// closes, a kick, or the drain deadline.
#[allow(clippy::manual_async_fn)]
fn relay_session<'a>(
    ctx: &'a SessionCtx,
    mut handoff: Box<Handoff<'a>>,
    summary: &'a mut Summary,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    // An `async` block, not an `async fn`: the hand-off is not kept twice while relaying.
    async move {
        // Used in place (its `_registered` guard lives to the end): no copy of it is kept.
        let Handoff {
            snap,
            client,
            backend,
            pending,
            pool,
            kick,
            ..
        } = &mut *handoff;
        summary.end = SessionEnd::Relayed;
        let pool_metrics = m::handles::pool(pool, ctx.listener.protocol);
        let _sessions = GaugeGuard::new(pool_metrics.sessions_active.clone());
        if !backend.leftover.is_empty() && client.write_all(&backend.leftover).await.is_err() {
            summary.end = SessionEnd::ClientError;
            return;
        }
        if !pending.is_empty() && backend.stream.write_all(pending).await.is_err() {
            summary.end = SessionEnd::BackendError;
            return;
        }
        let (extra_down, extra_up) = (backend.leftover.len() as u64, pending.len() as u64);
        let relay_started = Instant::now();
        let mut relay = relay::Relay::new(&mut *client, &mut backend.stream)
            .tracking(relay::tracker(ctx.listener.protocol));
        relay.already_relayed(&backend.leftover, pending);
        // Neither is needed while relaying.
        backend.leftover = Vec::new();
        *pending = Vec::new();
        let end = tokio::select! {
            r = &mut relay => match r {
                Ok(()) => RelayEnd::Closed,
                Err(e) => RelayEnd::Error(e),
            },
            _ = ctx.control.hard_stop.cancelled() => RelayEnd::Stopped,
            reason = kick.requested() => RelayEnd::Kicked(reason),
        };
        let (up, down) = (relay.bytes_up(), relay.bytes_down());
        let backend_first = relay.backend_ended_first();
        let goodbye_asked = relay.client_said_goodbye();
        let died = relay.backend_end().filter(|_| !goodbye_asked);
        drop(relay);
        if let (Some(d), RelayEnd::Closed | RelayEnd::Error(_)) = (&died, &end) {
            d.record(pool, ctx.listener.protocol);
        }
        let ends = Ends {
            backend_first,
            died,
        };
        let pool_cfg = snap.config.pools.get(pool.as_str());
        let spread = pool_cfg.map(|p| p.disconnect_spread).unwrap_or_default();
        // Boxed: only needed at the end; the session's own future stays small while it relays.
        Box::pin(finish_relay(
            ctx, end, ends, spread, client, backend, summary,
        ))
        .await;
        summary.up = up + extra_up;
        summary.down = down + extra_down;
        pool_metrics
            .session_seconds
            .record(relay_started.elapsed().as_secs_f64());
        pool_metrics.bytes_up.increment(summary.up);
        pool_metrics.bytes_down.increment(summary.down);
    }
}

/// What the relay saw of how it ended.
struct Ends {
    /// The backend's side ended first.
    backend_first: bool,
    /// The backend's side ended first, the client not leaving (no LOGOUT/QUIT).
    died: Option<relay::BackendEnd>,
}

/// Closes both sides the way the end calls for: a backend that went away is relayed as a
/// close (spread when many go at once), a drain deadline and a kick get their goodbye.
async fn finish_relay(
    ctx: &SessionCtx,
    end: RelayEnd,
    ends: Ends,
    spread: Duration,
    client: &mut ClientStream,
    backend: &mut Connected,
    summary: &mut Summary,
) {
    let Ends {
        backend_first,
        died,
    } = ends;
    match end {
        RelayEnd::Closed | RelayEnd::Error(_) => {
            if let RelayEnd::Error(e) = &end {
                tracing::debug!(error = %e, backend_first, "relay ended with an error");
                summary.end = SessionEnd::RelayError;
            }
            summary.closed_by = Some(if backend_first || died.is_some() {
                Side::Backend
            } else {
                Side::Client
            });
            if backend_first && matches!(end, RelayEnd::Closed) {
                // The backend closed and everything it sent was relayed.
                backend.stream.reset_on_close();
            }
            if let Some(died) = died {
                // Spread like the closes; the goodbye (at a response boundary) goes last.
                spread_close(ctx, spread, backend, client).await;
                if let Some(bye) = died.goodbye() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), client.write_all(bye)).await;
                }
                summary.end = if died.backend_said_goodbye() {
                    SessionEnd::BackendClosed
                } else {
                    SessionEnd::BackendDied
                };
            }
            // TLS: close_notify. Plain TCP: the close when `client` drops sends the FIN; a
            // shutdown first would only cost a system call per session.
            if client.is_tls() {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
            }
        }
        RelayEnd::Stopped => {
            summary.end = SessionEnd::Stopped;
            if ctx.listener.protocol == Protocol::Imap {
                let bye = b"* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n";
                let _ = tokio::time::timeout(Duration::from_secs(5), client.write_all(bye)).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), backend.stream.shutdown()).await;
            count_kick(ctx, "shutdown");
        }
        RelayEnd::Kicked(reason) => {
            goodbye(ctx, client, reason).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), backend.stream.shutdown()).await;
            summary.end = SessionEnd::Kicked;
            count_kick(ctx, reason.as_str());
        }
    }
}

/// The backend went away with the client still there. If many sessions of this server
/// end together (it died), the closes are spread so the failover host does not take a
/// reconnect storm; a client that closes meanwhile ends the wait.
async fn spread_close(
    ctx: &SessionCtx,
    spread: Duration,
    backend: &Connected,
    client: &mut ClientStream,
) {
    let delay = ctx.control.disconnects.backend_closed(
        &backend.server,
        spread,
        session_id(),
        Instant::now(),
    );
    if delay.is_zero() {
        return;
    }
    tracing::debug!(
        delay_ms = delay.as_millis() as u64,
        "backend ended with many sessions: delaying the close"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = client_gone(client) => {}
        _ = ctx.control.hard_stop.cancelled() => {}
    }
}

/// The session's only input buffer before login. Whatever it held is wiped when it is
/// consumed, discarded, outgrown or dropped: pre-auth input carries passwords.
struct InputBuf(Vec<u8>);

impl InputBuf {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Removes the first `n` bytes.
    fn consume(&mut self, n: usize) {
        let n = n.min(self.0.len());
        if n == 0 {
            return;
        }
        let left = self.0.len() - n;
        self.0.copy_within(n.., 0);
        proto::wipe(&mut self.0[left..]);
        self.0.truncate(left);
    }
    fn clear(&mut self) {
        proto::wipe(&mut self.0);
        self.0.clear();
    }
    /// Makes room for at least `want` more bytes (never past `max` in all), moving the
    /// contents by hand so the old allocation is wiped before it is freed.
    fn reserve(&mut self, want: usize, max: usize) {
        let spare = self.0.capacity() - self.0.len();
        if spare >= want {
            return;
        }
        let grow = (self.0.capacity().max(512))
            .min(max.saturating_sub(self.0.len()))
            .max(want);
        let mut bigger = Vec::with_capacity(self.0.len() + grow);
        bigger.extend_from_slice(&self.0);
        proto::wipe(&mut self.0);
        self.0 = bigger;
    }
    /// Hands the remaining bytes over (they were pipelined behind the login).
    fn take(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for InputBuf {
    fn drop(&mut self) {
        proto::wipe(&mut self.0);
    }
}

/// Turns away a connection over a limit with the protocol's temporary-failure greeting
/// (on implicit-TLS listeners the connection is just closed: no handshake is spent on it).
pub async fn refuse(listener: Arc<Listener>, mut tcp: TcpStream) {
    if listener.tls != ListenerTls::Implicit {
        let msg: &[u8] = match listener.protocol {
            Protocol::Imap => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
            Protocol::Pop3 => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
            Protocol::Smtp => b"421 4.7.0 Too many connections, try again later\r\n",
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(msg)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.shutdown()).await;
}

/// Resolves when the client closes or resets (its further input is discarded).
async fn client_gone(client: &mut ClientStream) {
    let mut sink = [0u8; 512];
    loop {
        match client.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

tokio::task_local! {
    static SESSION_ID: u64;
}

fn session_id() -> u64 {
    SESSION_ID.try_with(|id| *id).unwrap_or(0)
}

fn count_kick(ctx: &SessionCtx, reason: &'static str) {
    metrics::counter!(m::KICKED, "protocol" => ctx.listener.protocol.as_str(), "reason" => reason)
        .increment(1);
}

/// Tells a kicked client why, where the protocol allows it, then closes. IMAP gets an
/// untagged BYE (clients reconnect, and land on the new pool); POP3 and SMTP cannot take
/// an unsolicited line mid-session and are just closed.
async fn goodbye(ctx: &SessionCtx, client: &mut ClientStream, reason: KickReason) {
    if ctx.listener.protocol == Protocol::Imap {
        let text: &[u8] = match reason {
            KickReason::Moved => {
                b"* BYE [UNAVAILABLE] Your mailbox has moved, please reconnect\r\n"
            }
            KickReason::Admin => {
                b"* BYE [UNAVAILABLE] Disconnected by the administrator, please reconnect\r\n"
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), client.write_all(text)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
}

async fn tls_accept(
    ctx: &SessionCtx,
    client: ClientStream,
    mode: &'static str,
) -> Option<ClientStream> {
    let Stream::Plain(tcp) = client else {
        return None;
    };
    let config = &ctx.snap.config;
    let timeout = config.timeouts.tls_handshake;
    let per_worker = config.conn_limits.tls_handshakes_per_worker;
    let cfg = ctx.snap.server_tls.clone()?;
    let count = |result: &'static str, version: &'static str| {
        metrics::counter!(m::TLS_HANDSHAKES, "listener" => ctx.listener.name.clone(), "mode" => mode, "result" => result, "version" => version)
            .increment(1);
    };
    let handshake = async {
        let _slot = crate::tls::handshake_slot(per_worker).await;
        crate::server_tls::ServerTls::accept(cfg, tcp).await
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(t)) => {
            let stream = Stream::Tls(Box::new(t));
            count("ok", crate::tls::version_label(stream.tls_version()));
            Some(stream)
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            count("error", "none");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            count("timeout", "none");
            None
        }
    }
}

/// A logged-in session, ready for the relay.
struct Handoff<'a> {
    /// The configuration the login was routed with.
    snap: Arc<Snapshot>,
    client: ClientStream,
    backend: Connected,
    /// Client bytes pipelined behind the login.
    pending: Vec<u8>,
    pool: String,
    /// In the sessions registry from before the client hears its login succeeded, so a
    /// kick or a move right after the login cannot miss it.
    _registered: Registration<'a>,
    kick: Arc<Kick>,
}

/// A login that succeeded, registered, waiting for the machine to hand over.
struct LoggedIn<'a> {
    /// The configuration the login was routed with: the session's from now on.
    snap: Arc<Snapshot>,
    backend: Connected,
    pool: String,
    registered: Registration<'a>,
    kick: Arc<Kick>,
}

/// What the pre-auth loop does after an action.
enum Next<'a> {
    /// Go on.
    Continue,
    /// A login succeeded.
    LoggedIn(LoggedIn<'a>),
    /// The session is over (the summary says why).
    End,
}

/// Runs the pre-auth machine until the client is logged in (returns the hand-off) or the
/// connection ends (returns None).
async fn preauth<'a>(
    ctx: &'a SessionCtx,
    sm: &mut (dyn PreAuth + Send),
    mut client: ClientStream,
    origin: &Origin,
    summary: &mut Summary,
) -> Option<Handoff<'a>> {
    let peer = origin.client;
    let cfg = &ctx.snap.config;
    let mut max_pending = cfg.limits.max_line + cfg.limits.max_literal + 1024;
    if ctx.listener.sasl.has_tokens() {
        // An OAuth token as initial response or SASL line.
        max_pending = max_pending.max(cfg.limits.max_sasl_token + 1024);
    }
    let mut inbuf = InputBuf(Vec::with_capacity(512));
    let mut logged_in = None;
    let mut wait = InputWait::new(ctx);
    // On a listener that takes PROXY headers, a client that was not relayed by a trusted
    // balancer must not send one: it would be claiming someone else's address.
    let mut screen = ctx.listener.proxy_protocol != ProxyMode::Off && origin.via.is_none();
    loop {
        if screen && !inbuf.is_empty() && untrusted_proxy_header(ctx, &mut screen, &inbuf.0) {
            summary.end = SessionEnd::Refused;
            return None;
        }
        // The machine consumes what it can, then says what to do. A machine may queue
        // actions without consuming (e.g. the SMTP bridge leaves MAIL for the backend).
        let used = if screen { 0 } else { sm.receive(&inbuf.0) };
        inbuf.consume(used);
        let mut acted = false;
        while let Some(action) = sm.poll_action() {
            acted = true;
            let next = match action {
                Action::StartTls => {
                    let Some(tls) = start_tls(ctx, client, &mut inbuf).await else {
                        summary.end = SessionEnd::TlsFailed;
                        return None;
                    };
                    client = tls;
                    sm.tls_established();
                    Next::Continue
                }
                other => act(ctx, sm, &mut client, other, peer, summary).await,
            };
            match next {
                Next::Continue => {}
                Next::LoggedIn(l) => logged_in = Some(l),
                Next::End => return None,
            }
        }
        if sm.is_authenticated() {
            if client.flush().await.is_err() {
                return None;
            }
            let l: LoggedIn<'a> = logged_in.take()?;
            return Some(Handoff {
                snap: l.snap,
                client,
                backend: l.backend,
                pending: inbuf.take(),
                pool: l.pool,
                _registered: l.registered,
                kick: l.kick,
            });
        }
        if used > 0 || acted {
            continue;
        }
        if inbuf.len() >= max_pending {
            tracing::debug!("pre-auth input over its bound");
            summary.end = SessionEnd::InputTooLarge;
            metrics::counter!(m::REFUSED, "listener" => ctx.listener.name.clone(), "protocol" => ctx.listener.protocol.as_str(), "reason" => "input_too_large").increment(1);
            return None;
        }
        inbuf.reserve(512, max_pending);
        match wait.input(&mut client, &mut inbuf.0).await {
            Waited::Input => {}
            Waited::TimedOut => {
                summary.end = SessionEnd::Timeout;
                sm.timed_out();
            }
            Waited::Draining => {
                summary.end = SessionEnd::Shutdown;
                sm.shutting_down();
            }
            Waited::Closed(end) => {
                summary.end = end;
                return None;
            }
        }
    }
}

/// Whether `input` starts with a PROXY header from a client no trusted balancer relayed
/// (counted as refused); clears `screen` once the input shows it does not.
fn untrusted_proxy_header(ctx: &SessionCtx, screen: &mut bool, input: &[u8]) -> bool {
    match proxy::screen(input) {
        Some(true) => {
            tracing::info!("PROXY header from an untrusted address: closing");
            let l = &ctx.listener;
            metrics::counter!(m::REFUSED, "listener" => l.name.clone(), "protocol" => l.protocol.as_str(), "reason" => FrontRefusal::Untrusted.as_str()).increment(1);
            true
        }
        Some(false) => {
            *screen = false;
            false
        }
        None => false,
    }
}

/// Does what the machine asked for, other than STARTTLS.
async fn act<'a>(
    ctx: &'a SessionCtx,
    sm: &mut (dyn PreAuth + Send),
    client: &mut ClientStream,
    action: Action,
    peer: SocketAddr,
    summary: &mut Summary,
) -> Next<'a> {
    match action {
        Action::Send(bytes) => {
            if client.write_all(&bytes).await.is_ok() {
                return Next::Continue;
            }
            summary.end = SessionEnd::ClientError;
            Next::End
        }
        Action::Login(creds) => {
            let helo = sm.client_name().map(str::to_owned);
            let request = LoginRequest {
                credentials: creds,
                peer,
                client_tls: client.is_tls(),
                helo: helo.as_deref(),
            };
            login(ctx, sm, request, summary).await
        }
        Action::Close => {
            let _ = client.flush().await;
            let _ = client.shutdown().await;
            if summary.end == SessionEnd::Closed {
                summary.end = SessionEnd::ClosedPreauth;
            }
            Next::End
        }
        // Handled by the caller, which owns the plaintext stream it replaces.
        Action::StartTls => Next::End,
    }
}

/// STARTTLS: flushes the go-ahead, discards what the client pipelined behind the
/// command in plaintext (never executed inside TLS), and runs the handshake.
async fn start_tls(
    ctx: &SessionCtx,
    mut client: ClientStream,
    inbuf: &mut InputBuf,
) -> Option<ClientStream> {
    client.flush().await.ok()?;
    if !inbuf.is_empty() {
        tracing::debug!(
            bytes = inbuf.len(),
            "discarding plaintext sent after STARTTLS"
        );
        inbuf.clear();
    }
    tls_accept(ctx, client, "starttls").await
}

/// Runs the login pipeline for the machine's credentials, registers a served session
/// before the client hears of it, and tells the machine the outcome.
async fn login<'a>(
    ctx: &'a SessionCtx,
    sm: &mut (dyn PreAuth + Send),
    request: LoginRequest<'_>,
    summary: &mut Summary,
) -> Next<'a> {
    let request_peer = request.peer;
    let done = login::log_in(ctx.place(), request).await;
    summary.login(&done);
    let outcome = done.outcome();
    let next = match done {
        LoginDone::Served(served) => {
            let kick = Arc::new(Kick::default());
            let protocol = ctx.listener.protocol;
            let entry = Entry {
                user: served.user.clone(),
                protocol,
                pool: served.pool.clone(),
                client: request_peer,
                kick: kick.clone(),
            };
            let registered = ctx.control.state.sessions().register(session_id(), entry);
            // Registered first: a reload installed from now on finds the session itself.
            let control = &ctx.control;
            control.settle(
                session_id(),
                &served.user,
                protocol,
                &served.pool,
                &served.snap,
            );
            Next::LoggedIn(LoggedIn {
                snap: served.snap,
                backend: served.backend,
                pool: served.pool,
                registered,
                kick,
            })
        }
        _ => Next::Continue,
    };
    // Only now does the client hear the outcome.
    sm.login_done(outcome);
    next
}

/// How a wait for client input ended.
enum Waited {
    /// Bytes arrived.
    Input,
    /// The pre-auth timeout passed.
    TimedOut,
    /// The proxy started draining.
    Draining,
    /// The client closed or failed.
    Closed(SessionEnd),
}

/// Waits for client input before login, with one timer and one drain waiter for the
/// whole phase. A wait may last the pre-auth timeout from when it started: time spent
/// logging in (or held) does not count.
struct InputWait<'a> {
    timeout: Duration,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    drain: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFuture<'a>>>,
    timed_out: bool,
    drained: bool,
    started: Option<tokio::time::Instant>,
}

impl<'a> InputWait<'a> {
    fn new(ctx: &'a SessionCtx) -> Self {
        let timeout = ctx.snap.config.timeouts.preauth;
        InputWait {
            timeout,
            idle: Box::pin(tokio::time::sleep(timeout)),
            drain: Box::pin(ctx.control.drain.cancelled()),
            timed_out: false,
            drained: false,
            started: None,
        }
    }

    async fn input(&mut self, client: &mut ClientStream, buf: &mut Vec<u8>) -> Waited {
        let started = *self.started.get_or_insert_with(tokio::time::Instant::now);
        loop {
            tokio::select! {
                r = client.read_buf(buf) => return match r {
                    Ok(0) => Waited::Closed(SessionEnd::ClientClosedPreauth),
                    Ok(_) => {
                        self.started = None;
                        Waited::Input
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "client read failed");
                        Waited::Closed(SessionEnd::ClientError)
                    }
                },
                _ = &mut self.idle, if !self.timed_out => {
                    let due = started + self.timeout;
                    if tokio::time::Instant::now() >= due {
                        self.timed_out = true;
                        return Waited::TimedOut;
                    }
                    // Armed for an earlier wait: re-arm for this one.
                    self.idle.as_mut().reset(due);
                }
                _ = &mut self.drain, if !self.drained => {
                    self.drained = true;
                    return Waited::Draining;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_buffer_keeps_the_rest_in_order_when_consuming_and_growing() {
        let mut b = InputBuf(Vec::with_capacity(64));
        b.0.extend_from_slice(b"a1 LOGIN joe s3cret\r\na2 NOOP\r\n");
        b.consume(21);
        assert_eq!(b.0, b"a2 NOOP\r\n");
        b.reserve(4096, 8192);
        assert!(b.0.capacity() >= b.0.len() + 4096);
        assert_eq!(b.0, b"a2 NOOP\r\n");
        b.clear();
        assert!(b.is_empty());
    }
}

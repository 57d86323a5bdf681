//! One client connection: TLS (implicit or STARTTLS), the protocol's pre-auth machine,
//! the backend login, then the relay.
//!
//! The driver owns the only input buffer. The machine consumes whole commands from its
//! front; whatever is left when the client is authenticated was pipelined behind the
//! login and goes to the backend first. Anything buffered when STARTTLS is asked for was
//! sent in plaintext after the command and is discarded, never executed inside TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::backend::{self, Connected, LoginResult};
use crate::config::{rfc3339, Listener, Protocol};
use crate::control::history::Login;
use crate::control::holds::HoldOutcome;
use crate::control::sessions::{Entry, Kick, KickReason, Registration};
use crate::control::Control;
use crate::metrics as m;
use crate::proto::{
    self, Action, ClientInfo, Credentials, ListenerTls, LoginOutcome, Mechanism, Phase, PreAuth,
    ServerPolicy,
};
use crate::relay;
use crate::route;
use crate::snapshot::Snapshot;
use crate::stream::{ClientStream, Stream};

/// What a session needs from the process.
#[derive(Clone)]
pub struct SessionCtx {
    /// The configuration in force when the connection was accepted.
    pub snap: Arc<Snapshot>,
    /// The listener that accepted it.
    pub listener: Listener,
    /// Live process state: backends, registry of sessions, holds, history, shutdown.
    pub control: Arc<Control>,
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

fn new_machine(ctx: &SessionCtx, peer: SocketAddr) -> Box<dyn PreAuth + Send> {
    let cfg = &ctx.snap.config;
    let policy = ServerPolicy {
        tls: ctx.listener.tls,
        allow_plaintext_auth: ctx.listener.allow_plaintext_auth,
        limits: cfg.limits.clone(),
        hostname: cfg.hostname.clone(),
    };
    match ctx.listener.protocol {
        Protocol::Imap => Box::new(proto::imap::ServerMachine::new(policy)),
        Protocol::Pop3 => Box::new(proto::pop3::ServerMachine::new(policy)),
        Protocol::Smtp => {
            let mut sm = proto::smtp::ServerMachine::new(policy, smtp_extensions(ctx));
            if let Some(window) = ctx.listener.bridge_window {
                let recent = ctx.control.history.recent_login(
                    peer.ip(),
                    window.as_millis() as i64,
                    rfc3339::now_ms(),
                );
                if let Some(user) = recent {
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

/// What the session learned, for its summary line.
#[derive(Default)]
struct Summary {
    user: Option<String>,
    pool: Option<String>,
    server: Option<String>,
    outcome: &'static str,
    /// Which side ended a relayed session: client | backend.
    closed_by: &'static str,
    up: u64,
    down: u64,
}

/// Serves one accepted connection to its end.
pub async fn run(ctx: SessionCtx, tcp: TcpStream, peer: SocketAddr) {
    let id = new_id();
    let span = tracing::info_span!(
        "session",
        id,
        listener = %ctx.listener.name,
        proto = ctx.listener.protocol.as_str(),
        %peer,
        user = tracing::field::Empty,
        pool = tracing::field::Empty,
        backend = tracing::field::Empty,
    );
    let fut = async move {
        let started = Instant::now();
        let handles = m::handles::listener(&ctx.listener.name, ctx.listener.protocol);
        handles.connections.increment(1);
        let _active = GaugeGuard::new(handles.connections_active.clone());
        drop(handles);
        let mut summary = Summary {
            outcome: "closed",
            closed_by: "-",
            ..Default::default()
        };
        serve(&ctx, tcp, peer, &mut summary).await;
        tracing::info!(
            outcome = summary.outcome,
            user = summary.user.as_deref().unwrap_or("-"),
            pool = summary.pool.as_deref().unwrap_or("-"),
            server = summary.server.as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            closed_by = summary.closed_by,
            bytes_up = summary.up,
            bytes_down = summary.down,
            "session end"
        );
    }
    .instrument(span);
    SESSION_ID.scope(id, fut).await
}

async fn serve(ctx: &SessionCtx, tcp: TcpStream, peer: SocketAddr, summary: &mut Summary) {
    let cfg = &ctx.snap.config;
    let handshake_timeout = cfg.timeouts.preauth.min(Duration::from_secs(30));
    let client = if ctx.listener.tls == ListenerTls::Implicit {
        match Box::pin(tls_accept(
            ctx,
            Stream::Plain(tcp),
            handshake_timeout,
            "implicit",
        ))
        .await
        {
            Some(s) => s,
            None => {
                summary.outcome = "tls_failed";
                return;
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    let mut sm = new_machine(ctx, peer);
    let Some(Handoff {
        mut client,
        mut backend,
        pending,
        pool,
        registered: _registered,
        kick,
    }) =
        // Boxed: the pre-auth and login futures are large and only needed until login; the
        // session's own future stays small for the hours it may spend relaying.
        Box::pin(preauth(ctx, sm.as_mut(), client, peer, summary)).await
    else {
        return;
    };
    drop(sm);
    // Hand-off: backend bytes that followed its login reply go to the client, the
    // client's pipelined bytes go to the backend, then the relay takes over.
    summary.outcome = "relayed";
    let pool_metrics = m::handles::pool(&pool, ctx.listener.protocol);
    let _sessions = GaugeGuard::new(pool_metrics.sessions_active.clone());
    if !backend.leftover.is_empty() && client.write_all(&backend.leftover).await.is_err() {
        summary.outcome = "client_error";
        return;
    }
    if !pending.is_empty() && backend.stream.write_all(&pending).await.is_err() {
        summary.outcome = "backend_error";
        return;
    }
    let (extra_down, extra_up) = (backend.leftover.len() as u64, pending.len() as u64);
    drop(pending);
    backend.leftover = Vec::new(); // its buffer is not needed while relaying
    let relay_started = Instant::now();
    let mut relay = relay::Relay::new(&mut client, &mut backend.stream);
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
    drop(relay);
    if let RelayEnd::Error(e) = &end {
        tracing::debug!(error = %e, backend_first, "relay ended with an error");
        summary.outcome = "relay_error";
    }
    match end {
        RelayEnd::Closed | RelayEnd::Error(_) => {
            summary.closed_by = if backend_first { "backend" } else { "client" };
            if backend_first && matches!(end, RelayEnd::Closed) {
                // The backend closed and everything it sent was relayed.
                backend.stream.reset_on_close();
            }
            if backend_first && !goodbye_asked {
                // The backend went away with the client still there. If many sessions of
                // this server end together (it died), spread the closes so the failover
                // host does not take a reconnect storm; a client that closes meanwhile ends
                // the wait.
                let spread = ctx
                    .snap
                    .config
                    .pools
                    .get(&pool)
                    .map(|p| p.disconnect_spread)
                    .unwrap_or_default();
                let delay = ctx.control.disconnects.backend_closed(
                    &backend.server,
                    spread,
                    session_id(),
                    Instant::now(),
                );
                if !delay.is_zero() {
                    tracing::debug!(
                        delay_ms = delay.as_millis() as u64,
                        "backend ended with many sessions: delaying the close"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = client_gone(&mut client) => {}
                        _ = ctx.control.hard_stop.cancelled() => {}
                    }
                }
            }
            // TLS: close_notify. Plain TCP: the close when `client` drops sends the FIN; a
            // shutdown first would only cost a system call per session.
            if client.is_tls() {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
            }
        }
        RelayEnd::Stopped => {
            summary.outcome = "stopped";
            if ctx.listener.protocol == Protocol::Imap {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.write_all(
                        b"* BYE [UNAVAILABLE] Server shutting down, please reconnect\r\n",
                    ),
                )
                .await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), backend.stream.shutdown()).await;
            count_kick(ctx, "shutdown");
        }
        RelayEnd::Kicked(reason) => {
            goodbye(ctx, &mut client, reason).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), backend.stream.shutdown()).await;
            summary.outcome = "kicked";
            count_kick(ctx, reason.as_str());
        }
    }
    summary.up = up + extra_up;
    summary.down = down + extra_down;
    pool_metrics
        .session_seconds
        .record(relay_started.elapsed().as_secs_f64());
    pool_metrics.bytes_up.increment(summary.up);
    pool_metrics.bytes_down.increment(summary.down);
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
pub async fn refuse(listener: Listener, mut tcp: TcpStream) {
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

fn tls_label(tls: bool) -> &'static str {
    if tls {
        "true"
    } else {
        "false"
    }
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
    crate::admin::count_kick(ctx.listener.protocol.as_str(), reason);
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
    timeout: Duration,
    mode: &'static str,
) -> Option<ClientStream> {
    let Stream::Plain(tcp) = client else {
        return None;
    };
    let cfg = ctx.snap.server_tls.clone()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let count = |result: &'static str, version: &'static str| {
        metrics::counter!(m::TLS_HANDSHAKES, "listener" => ctx.listener.name.clone(), "mode" => mode, "result" => result, "version" => version)
            .increment(1);
    };
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
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
    client: ClientStream,
    backend: Connected,
    /// Client bytes pipelined behind the login.
    pending: Vec<u8>,
    pool: String,
    /// In the sessions registry from before the client hears its login succeeded, so a
    /// kick or a move right after the login cannot miss it.
    registered: Registration<'a>,
    kick: Arc<Kick>,
}

/// Runs the pre-auth machine until the client is logged in (returns the hand-off) or the
/// connection ends (returns None).
async fn preauth<'a>(
    ctx: &'a SessionCtx,
    sm: &mut (dyn PreAuth + Send),
    mut client: ClientStream,
    peer: SocketAddr,
    summary: &mut Summary,
) -> Option<Handoff<'a>> {
    let cfg = &ctx.snap.config;
    let max_pending = cfg.limits.max_line + cfg.limits.max_literal + 1024;
    let mut inbuf = InputBuf(Vec::with_capacity(512));
    let mut backend: Option<(Connected, String, Registration<'a>, Arc<Kick>)> = None;
    // One waiter on the drain token for the whole pre-auth phase, not one per read.
    let drain = ctx.control.drain.cancelled();
    tokio::pin!(drain);
    let mut drained = false;
    // One timer for the phase too, re-armed only when it fires early. A wait for input may
    // last the pre-auth timeout from when that wait started: time spent logging in (or
    // held) does not count.
    let idle = tokio::time::sleep(cfg.timeouts.preauth);
    tokio::pin!(idle);
    let mut timed_out = false;
    let mut wait_started: Option<tokio::time::Instant> = None;
    loop {
        // The machine consumes what it can, then says what to do. A machine may queue
        // actions without consuming (e.g. the SMTP bridge leaves MAIL for the backend).
        let used = sm.receive(&inbuf.0);
        inbuf.consume(used);
        let mut acted = false;
        while let Some(action) = sm.poll_action() {
            acted = true;
            match action {
                Action::Send(bytes) => {
                    if client.write_all(&bytes).await.is_err() {
                        summary.outcome = "client_error";
                        return None;
                    }
                }
                Action::StartTls => {
                    if client.flush().await.is_err() {
                        return None;
                    }
                    if !inbuf.is_empty() {
                        // Plaintext pipelined behind STARTTLS: never executed inside TLS.
                        tracing::debug!(
                            bytes = inbuf.len(),
                            "discarding plaintext sent after STARTTLS"
                        );
                        inbuf.clear();
                    }
                    match tls_accept(
                        ctx,
                        client,
                        cfg.timeouts.preauth.min(Duration::from_secs(30)),
                        "starttls",
                    )
                    .await
                    {
                        Some(s) => client = s,
                        None => {
                            summary.outcome = "tls_failed";
                            return None;
                        }
                    }
                    sm.tls_established();
                }
                Action::Login(creds) => {
                    let helo = sm.client_name().map(str::to_owned);
                    let (outcome, conn) =
                        login(ctx, creds, peer, helo, client.is_tls(), summary).await;
                    if let Some((c, pool)) = conn {
                        let kick = Arc::new(Kick::default());
                        let registered = ctx.control.sessions.register(
                            session_id(),
                            Entry {
                                user: summary.user.clone().unwrap_or_default(),
                                protocol: ctx.listener.protocol,
                                pool: pool.clone(),
                                kick: kick.clone(),
                            },
                        );
                        backend = Some((c, pool, registered, kick));
                    }
                    // Only now does the client hear the outcome.
                    sm.login_done(outcome);
                }
                Action::Close => {
                    let _ = client.flush().await;
                    let _ = client.shutdown().await;
                    if summary.outcome == "closed" {
                        summary.outcome = "closed_preauth";
                    }
                    return None;
                }
            }
        }
        if sm.is_authenticated() {
            if client.flush().await.is_err() {
                return None;
            }
            let (backend, pool, registered, kick) = backend.take()?;
            return Some(Handoff {
                client,
                backend,
                pending: inbuf.take(),
                pool,
                registered,
                kick,
            });
        }
        if used > 0 || acted {
            continue;
        }
        if inbuf.len() >= max_pending {
            tracing::debug!("pre-auth input over its bound");
            summary.outcome = "input_too_large";
            metrics::counter!(m::REFUSED, "listener" => ctx.listener.name.clone(), "protocol" => ctx.listener.protocol.as_str(), "reason" => "input_too_large").increment(1);
            return None;
        }
        let timeout = match sm.phase() {
            Phase::PreAuth | Phase::Continuation => cfg.timeouts.preauth,
        };
        inbuf.reserve(512, max_pending);
        let started = *wait_started.get_or_insert_with(tokio::time::Instant::now);
        tokio::select! {
            r = client.read_buf(&mut inbuf.0) => match r {
                Ok(0) => { summary.outcome = "client_closed_preauth"; return None; }
                Ok(_) => wait_started = None,
                Err(e) => {
                    tracing::debug!(error = %e, "client read failed");
                    summary.outcome = "client_error";
                    return None;
                }
            },
            _ = &mut idle, if !timed_out => {
                let due = started + timeout;
                if tokio::time::Instant::now() >= due {
                    timed_out = true;
                    summary.outcome = "timeout";
                    sm.timed_out();
                } else {
                    idle.as_mut().reset(due);
                }
            }
            _ = &mut drain, if !drained => { drained = true; summary.outcome = "shutdown"; sm.shutting_down(); }
        }
    }
}

/// Routes the user and logs in to the chosen pool (or its fallback).
async fn login(
    ctx: &SessionCtx,
    creds: Credentials,
    peer: SocketAddr,
    helo: Option<String>,
    client_tls: bool,
    summary: &mut Summary,
) -> (LoginOutcome, Option<(Connected, String)>) {
    let protocol = ctx.listener.protocol;
    let cfg = &ctx.snap.config;
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let mut at_backend = Duration::ZERO;
    let user = route::normalize(&cfg.users, &creds.user);
    // A held user waits (a mailbox is being copied); the route is taken after the wait,
    // so a release lands the login on the route in force then.
    if ctx.control.holds.is_held(&user) {
        let max = cfg
            .admin
            .as_ref()
            .map(|a| a.hold_max_wait)
            .unwrap_or(Duration::from_secs(120));
        tracing::info!(%user, "login held");
        let hold_started = Instant::now();
        let outcome = ctx.control.holds.wait(&user, max).await;
        waited = hold_started.elapsed();
        let label = if outcome == HoldOutcome::Proceed {
            "released"
        } else {
            "timed_out"
        };
        metrics::counter!(m::HELD_LOGINS, "result" => label).increment(1);
        if outcome == HoldOutcome::TimedOut {
            metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => "held", "rule" => "none", "result" => "backend_unavailable", "tls" => tls_label(client_tls)).increment(1);
            return (LoginOutcome::Unavailable, None);
        }
    }
    // Password spraying: a blocked address or user name is refused without asking a
    // backend.
    if let Some(left) = ctx
        .control
        .throttle
        .blocked(peer.ip(), &user, Instant::now())
    {
        tracing::info!(%user, retry_in_s = left.as_secs(), "login refused: too many failures");
        metrics::counter!(m::REFUSED, "listener" => ctx.listener.name.clone(), "protocol" => protocol.as_str(), "reason" => "rate_limited").increment(1);
        metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => "throttled", "rule" => "none", "result" => "refused", "tls" => tls_label(client_tls)).increment(1);
        tokio::time::sleep(cfg.throttle.max_delay).await;
        return (
            LoginOutcome::Refused {
                reason: "Too many failed logins, try again later",
            },
            None,
        );
    }
    // Route with the configuration in force now (a reload or stage may have changed it
    // while the client typed its password).
    let snap = ctx.control.snapshot();
    let cfg = &snap.config;
    let decision = match route::route(cfg, &creds.user, protocol, rfc3339::now()) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "no route");
            metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => "none", "rule" => "none", "result" => "refused", "tls" => tls_label(client_tls)).increment(1);
            return (LoginOutcome::Unavailable, None);
        }
    };
    let span = tracing::Span::current();
    span.record("user", decision.user.as_str());
    summary.user = Some(decision.user.clone());
    let client = Some(ClientInfo {
        ip: peer.ip(),
        port: peer.port(),
    });
    let helo = helo.unwrap_or_else(|| cfg.hostname.clone());
    let bridge = creds.mechanism == Mechanism::PreAuthorized;

    let attempts = [
        Some((decision.pool.as_str(), decision.servers.as_slice())),
        decision
            .fallback
            .as_ref()
            .map(|f| (f.pool.as_str(), f.servers.as_slice())),
    ];
    let mut result = LoginResult::Unavailable;
    let mut pool = decision.pool.as_str();
    for (i, (pool_name, servers)) in attempts.into_iter().flatten().enumerate() {
        if i > 0 {
            let reason = match &result {
                LoginResult::AuthFailed { .. } => "auth_failed",
                _ => "unavailable",
            };
            tracing::info!(from = %decision.pool, to = %pool_name, reason, "trying the fallback pool");
            metrics::counter!(m::FALLBACKS, "from" => decision.pool.clone(), "to" => pool_name.to_string(), "reason" => reason).increment(1);
        }
        pool = pool_name;
        let login_name = match cfg.pools.get(pool_name) {
            Some(p) if p.login_original_name => creds.user.trim().to_string(),
            _ => decision.user.clone(),
        };
        let backend_creds = Credentials {
            user: login_name,
            secret: creds.secret.clone(),
            mechanism: creds.mechanism,
        };
        let auth = if bridge {
            backend::Auth::Bridge
        } else {
            backend::Auth::Replay(&backend_creds)
        };
        let backend_started = Instant::now();
        result = backend::login(
            &ctx.control.backends,
            &snap,
            pool_name,
            protocol,
            servers,
            auth,
            client.clone(),
            &helo,
        )
        .await;
        at_backend += backend_started.elapsed();
        drop(backend_creds);
        let try_next = match &result {
            LoginResult::LoggedIn(_) => false,
            LoginResult::AuthFailed { .. } => decision
                .fallback
                .as_ref()
                .is_some_and(|f| f.on_auth_failure),
            LoginResult::Unavailable => true,
        };
        if !try_next {
            break;
        }
    }
    drop(creds);
    span.record("pool", pool);
    summary.pool = Some(pool.to_string());
    let (result_label, outcome, conn) = match result {
        LoginResult::LoggedIn(c) => {
            span.record("backend", c.server.as_str());
            summary.server = Some(c.server.clone());
            tracing::debug!(server = %c.server, tls = client_tls, "login ok");
            ctx.control.history.record(&Login {
                user: &decision.user,
                pool,
                protocol,
                listener: &ctx.listener.name,
                tls: client_tls,
                ip: peer.ip(),
                now_ms: rfc3339::now_ms(),
            });
            let caps = c.capabilities.clone();
            (
                m::handles::LoginResult::Ok,
                LoginOutcome::Ok { capabilities: caps },
                Some((c, pool.to_string())),
            )
        }
        LoginResult::AuthFailed { response, server } => {
            tracing::info!(%server, "login rejected by backend");
            (
                m::handles::LoginResult::AuthFailed,
                LoginOutcome::AuthFailed {
                    response: Some(response),
                },
                None,
            )
        }
        LoginResult::Unavailable => {
            tracing::warn!("no server of the pool is available");
            (
                m::handles::LoginResult::BackendUnavailable,
                LoginOutcome::Unavailable,
                None,
            )
        }
    };
    summary.outcome = result_label.as_str();
    match result_label {
        m::handles::LoginResult::Ok => ctx.control.throttle.success(&decision.user),
        m::handles::LoginResult::AuthFailed => {
            // Tarpit: the answer to a failed login comes later and later.
            let delay = ctx.control.throttle.failure(
                peer.ip(),
                &decision.user,
                &cfg.throttle,
                Instant::now(),
            );
            tokio::time::sleep(delay).await;
        }
        m::handles::LoginResult::BackendUnavailable => {}
    }
    let pool_metrics = m::handles::pool(pool, protocol);
    pool_metrics
        .login_backend_seconds
        .record(at_backend.as_secs_f64());
    let at_proxy = started
        .elapsed()
        .saturating_sub(waited)
        .saturating_sub(at_backend);
    m::handles::login_proxy_seconds(protocol).record(at_proxy.as_secs_f64());
    pool_metrics
        .logins(&decision.rule_id, result_label, client_tls)
        .increment(1);
    (outcome, conn)
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

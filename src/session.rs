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
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{self, Backends, Connected, LoginResult};
use crate::config::{Listener, Protocol};
use crate::metrics as m;
use crate::proto::{
    self, Action, ClientInfo, Credentials, ListenerTls, LoginOutcome, Phase, PreAuth, ServerPolicy,
};
use crate::relay::{self, RelayEnd};
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
    /// Backend machinery.
    pub backends: Backends,
    /// Cancelled when the proxy starts draining: pre-auth sessions say goodbye.
    pub drain: CancellationToken,
    /// Cancelled when the drain grace period is over: relayed sessions are closed.
    pub hard_stop: CancellationToken,
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
                .backends
                .registry
                .get(&pool.name, Protocol::Smtp, &addr.to_string())
                .capabilities();
            if !caps.is_empty() {
                lists.push(caps);
            }
        }
    }
    proto::smtp::intersect_extensions(&lists)
}

fn new_machine(ctx: &SessionCtx) -> Box<dyn PreAuth + Send> {
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
        Protocol::Smtp => Box::new(proto::smtp::ServerMachine::new(
            policy,
            smtp_extensions(ctx),
        )),
    }
}

/// What the session learned, for its summary line.
#[derive(Default)]
struct Summary {
    user: Option<String>,
    pool: Option<String>,
    server: Option<String>,
    outcome: &'static str,
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
    async move {
        let started = Instant::now();
        let labels = [
            ("listener", ctx.listener.name.clone()),
            ("protocol", ctx.listener.protocol.as_str().to_string()),
        ];
        metrics::counter!(m::CONNECTIONS, &labels).increment(1);
        let _active = GaugeGuard::new(metrics::gauge!(m::CONNECTIONS_ACTIVE, &labels));
        let _ = tcp.set_nodelay(true);
        let mut summary = Summary {
            outcome: "closed",
            ..Default::default()
        };
        serve(&ctx, tcp, peer, &mut summary).await;
        tracing::info!(
            outcome = summary.outcome,
            user = summary.user.as_deref().unwrap_or("-"),
            pool = summary.pool.as_deref().unwrap_or("-"),
            server = summary.server.as_deref().unwrap_or("-"),
            duration_ms = started.elapsed().as_millis() as u64,
            bytes_up = summary.up,
            bytes_down = summary.down,
            "session end"
        );
    }
    .instrument(span)
    .await
}

async fn serve(ctx: &SessionCtx, tcp: TcpStream, peer: SocketAddr, summary: &mut Summary) {
    let cfg = &ctx.snap.config;
    let handshake_timeout = cfg.timeouts.preauth.min(Duration::from_secs(30));
    let client = if ctx.listener.tls == ListenerTls::Implicit {
        match tls_accept(ctx, Stream::Plain(tcp), handshake_timeout).await {
            Some(s) => s,
            None => {
                summary.outcome = "tls_failed";
                return;
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    let mut sm = new_machine(ctx);
    let Some((mut client, mut backend, pending, pool)) =
        preauth(ctx, sm.as_mut(), client, peer, summary).await
    else {
        return;
    };
    // Hand-off: backend bytes that followed its login reply go to the client, the
    // client's pipelined bytes go to the backend, then the relay takes over.
    summary.outcome = "relayed";
    let proto_label = ctx.listener.protocol.as_str();
    let _sessions = GaugeGuard::new(
        metrics::gauge!(m::SESSIONS_ACTIVE, "pool" => pool.clone(), "protocol" => proto_label),
    );
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
    let end = relay::relay(&mut client, &mut backend.stream, &ctx.hard_stop).await;
    let (up, down) = match end {
        RelayEnd::Closed(up, down) => (up, down),
        RelayEnd::Error(e) => {
            tracing::debug!(error = %e, "relay ended with an error");
            summary.outcome = "relay_error";
            (0, 0)
        }
        RelayEnd::Stopped => {
            summary.outcome = "stopped";
            if ctx.listener.protocol == Protocol::Imap {
                let _ = client.write_all(b"* BYE Server shutting down\r\n").await;
            }
            let _ = client.shutdown().await;
            let _ = backend.stream.shutdown().await;
            (0, 0)
        }
    };
    summary.up = up + extra_up;
    summary.down = down + extra_down;
    metrics::counter!(m::BYTES, "pool" => pool.clone(), "protocol" => proto_label, "direction" => "client_to_backend")
        .increment(summary.up);
    metrics::counter!(m::BYTES, "pool" => pool, "protocol" => proto_label, "direction" => "backend_to_client")
        .increment(summary.down);
}

async fn tls_accept(
    ctx: &SessionCtx,
    client: ClientStream,
    timeout: Duration,
) -> Option<ClientStream> {
    let Stream::Plain(tcp) = client else {
        return None;
    };
    let cfg = ctx.snap.server_tls.clone()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => Some(Stream::Tls(Box::new(t))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

type Handoff = (ClientStream, Connected, Vec<u8>, String);

/// Runs the pre-auth machine until the client is logged in (returns the hand-off) or the
/// connection ends (returns None).
async fn preauth(
    ctx: &SessionCtx,
    sm: &mut (dyn PreAuth + Send),
    mut client: ClientStream,
    peer: SocketAddr,
    summary: &mut Summary,
) -> Option<Handoff> {
    let cfg = &ctx.snap.config;
    let max_pending = cfg.limits.max_line + cfg.limits.max_literal + 1024;
    let mut inbuf: Vec<u8> = Vec::with_capacity(512);
    let mut backend: Option<(Connected, String)> = None;
    loop {
        while let Some(action) = sm.poll_action() {
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
                    if let Some(c) = conn {
                        backend = Some(c);
                    }
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
            let (conn, pool) = backend.take()?;
            return Some((client, conn, inbuf, pool));
        }
        let used = sm.receive(&inbuf);
        if used > 0 {
            inbuf.drain(..used.min(inbuf.len()));
            continue;
        }
        if inbuf.len() >= max_pending {
            tracing::debug!("pre-auth input over its bound");
            summary.outcome = "input_too_large";
            return None;
        }
        let timeout = match sm.phase() {
            Phase::PreAuth | Phase::Continuation => cfg.timeouts.preauth,
        };
        if inbuf.capacity() - inbuf.len() < 512 {
            inbuf.reserve(1024.min(max_pending - inbuf.len()).max(512));
        }
        tokio::select! {
            r = tokio::time::timeout(timeout, client.read_buf(&mut inbuf)) => match r {
                Ok(Ok(0)) => { summary.outcome = "client_closed_preauth"; return None; }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "client read failed");
                    summary.outcome = "client_error";
                    return None;
                }
                Err(_) => { summary.outcome = "timeout"; sm.timed_out(); }
            },
            _ = ctx.drain.cancelled() => { summary.outcome = "shutdown"; sm.shutting_down(); }
        }
    }
}

/// Routes the user and logs in to the chosen pool.
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
    let decision = match route::route(cfg, &creds.user, protocol) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "no route");
            metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => "none", "result" => "refused").increment(1);
            return (LoginOutcome::Unavailable, None);
        }
    };
    let span = tracing::Span::current();
    span.record("user", decision.user.as_str());
    span.record("pool", decision.pool.as_str());
    summary.user = Some(decision.user.clone());
    summary.pool = Some(decision.pool.clone());
    let backend_creds = Credentials {
        user: decision.user.clone(),
        secret: creds.secret.clone(),
        mechanism: creds.mechanism,
    };
    drop(creds);
    let client = Some(ClientInfo {
        ip: peer.ip(),
        port: peer.port(),
    });
    let helo = helo.unwrap_or_else(|| cfg.hostname.clone());
    let result = backend::login(
        &ctx.backends,
        &ctx.snap,
        &decision.pool,
        protocol,
        &decision.servers,
        &backend_creds,
        client,
        &helo,
    )
    .await;
    drop(backend_creds);
    let pool = decision.pool.clone();
    let (label, outcome, conn) = match result {
        LoginResult::LoggedIn(c) => {
            span.record("backend", c.server.as_str());
            summary.server = Some(c.server.clone());
            tracing::info!(server = %c.server, tls = client_tls, "login ok");
            let caps = c.capabilities.clone();
            (
                "ok",
                LoginOutcome::Ok { capabilities: caps },
                Some((c, pool.clone())),
            )
        }
        LoginResult::AuthFailed { response, server } => {
            tracing::info!(%server, "login rejected by backend");
            (
                "auth_failed",
                LoginOutcome::AuthFailed {
                    response: Some(response),
                },
                None,
            )
        }
        LoginResult::Unavailable => {
            tracing::warn!("no server of the pool is available");
            ("backend_unavailable", LoginOutcome::Unavailable, None)
        }
    };
    summary.outcome = label;
    metrics::counter!(m::LOGINS, "protocol" => protocol.as_str(), "pool" => pool, "result" => label).increment(1);
    (outcome, conn)
}

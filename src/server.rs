//! The running proxy: listeners, accept loops, health checks, metrics endpoint, and the
//! drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backends;
use crate::config::Listener;
use crate::session::{self, SessionCtx};
use crate::snapshot::Snapshot;

/// Listen backlog: tokio's default of 128 makes a burst of a few hundred connects wait for
/// SYN retransmits (a 1 s stall each).
pub const BACKLOG: u32 = 4096;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("listener {name} on {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A started proxy.
pub struct Running {
    /// Bound address of each listener, by name (useful when the config says port 0).
    pub listeners: Vec<(String, SocketAddr)>,
    /// Bound metrics address.
    pub metrics: Option<SocketAddr>,
    drain: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    background: CancellationToken,
    drain_timeout: Duration,
}

impl Running {
    /// The address of the listener named `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Stops accepting, lets relayed sessions finish for up to the drain timeout, then
    /// closes what is left and returns.
    pub async fn shutdown(self) {
        tracing::info!("draining: no new connections");
        self.drain.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "drain timeout expired; closing remaining sessions"
            );
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        self.background.cancel();
        tracing::info!("stopped");
    }
}

fn bind(l: &Listener) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind {
        name: l.name.clone(),
        addr: l.listen,
        source,
    };
    let sock = if l.listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.set_nodelay(true).map_err(err)?;
    sock.bind(l.listen).map_err(err)?;
    sock.listen(BACKLOG).map_err(err)
}

/// Binds every listener and the metrics endpoint and starts serving.
pub async fn start(snap: Arc<Snapshot>, backends: Backends) -> Result<Running, StartError> {
    let drain = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut bound = Vec::new();
    let mut sockets = Vec::new();
    for l in &snap.config.listeners {
        let sock = bind(l)?;
        let addr = sock.local_addr().map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.listen,
            source,
        })?;
        bound.push((l.name.clone(), addr));
        sockets.push((l.clone(), sock));
    }
    let metrics_addr = match snap.config.metrics {
        Some(addr) => {
            let handle = crate::metrics::install();
            let sock = crate::metrics::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    name: "metrics".into(),
                    addr,
                    source,
                })?;
            let local = sock.local_addr().ok();
            tokio::spawn(crate::metrics::serve(sock, handle, background.clone()));
            local
        }
        None => None,
    };
    tokio::spawn(crate::backend::run_health_checks(
        backends.clone(),
        snap.clone(),
        background.clone(),
    ));
    for (listener, sock) in sockets {
        tracing::info!(listener = %listener.name, protocol = %listener.protocol, addr = %listener.listen, tls = ?listener.tls, "listening");
        let ctx = SessionCtx {
            snap: snap.clone(),
            listener,
            backends: backends.clone(),
            drain: drain.clone(),
            hard_stop: hard_stop.clone(),
        };
        tokio::spawn(accept_loop(sock, ctx, tracker.clone()));
    }
    Ok(Running {
        listeners: bound,
        metrics: metrics_addr,
        drain,
        hard_stop,
        tracker,
        background,
        drain_timeout: snap.config.timeouts.drain,
    })
}

async fn accept_loop(sock: TcpListener, ctx: SessionCtx, tracker: TaskTracker) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = sock.accept() => r,
            _ = ctx.drain.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(10);
                let ctx = ctx.clone();
                tracker.spawn(session::run(ctx, tcp, normalize_peer(peer)));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = %ctx.listener.name, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

fn normalize_peer(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => peer,
        },
        v4 => v4,
    }
}

/// Runs until `shutdown` resolves, then drains.
pub async fn run_until(
    snap: Arc<Snapshot>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let running = start(snap, Backends::new()).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}

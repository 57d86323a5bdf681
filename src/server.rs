//! The running proxy: listeners and their accept loops, health checks, the metrics and
//! admin endpoints, reloads, and the drain on shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backends;
use crate::config::{Config, ConfigError, Listener, ProxyMode};
use crate::control::Control;
use crate::front::{self, Origin};
use crate::metrics as m;
use crate::session::{self, SessionCtx};
use crate::snapshot::Snapshot;
use crate::tls::TlsError;

/// Listen backlog: tokio's default of 128 makes a burst of a few hundred connects wait for
/// SYN retransmits (a 1 s stall each).
pub const BACKLOG: u32 = 4096;

/// Why the proxy could not start or reload.
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
    /// The configuration file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The configuration's certificates, keys or CA bundles cannot be used.
    #[error("{file}: {source}")]
    Tls {
        /// The configuration file.
        file: std::path::PathBuf,
        /// Why.
        source: TlsError,
    },
    /// A table of the running proxy was poisoned by a panic elsewhere.
    #[error("the {0} table is poisoned")]
    Poisoned(&'static str),
    /// The session worker threads could not be started.
    #[error("cannot start the session workers: {source}")]
    Workers {
        /// Why.
        source: std::io::Error,
    },
}

/// Session workers: one thread per CPU (or `workers:`), each running a single-threaded
/// runtime. Every listener has one socket per worker (`SO_REUSEPORT`: the kernel spreads
/// new connections over them), and a connection stays on the worker that accepted it from
/// greeting to close. No task moves between threads, no wakeup crosses them, and memory
/// is freed by the thread that allocated it: what nginx's and HAProxy's per-CPU workers
/// get, and about a tenth of the CPU a login costs on a work-stealing runtime (see
/// BENCHMARKS.md). Health checks, reloads and the endpoints stay on the main runtime.
/// How many tasks a worker polls between two looks at its sockets (tokio's default is
/// 61). A TLS handshake step (key exchange and signature) costs a few hundred
/// microseconds; during a burst of handshakes 61 of them in a row would keep a logged-in
/// session's ready socket unseen for over 10 ms (BENCHMARKS.md, the login storm row).
const WORKER_EVENT_INTERVAL: u32 = 8;

struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: CancellationToken,
}

impl Workers {
    fn start(configured: usize) -> std::io::Result<Workers> {
        let n = match configured {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .event_interval(WORKER_EVENT_INTERVAL)
                .build()?;
            handles.push(rt.handle().clone());
            let worker_stop = stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cutover-worker-{i}"))
                .spawn(move || {
                    rt.block_on(worker_stop.cancelled());
                    // Dropping the runtime here ends whatever it still runs (only after
                    // the drain, or when the proxy is dropped without one).
                });
            if let Err(e) = spawned {
                stop.cancel();
                return Err(e);
            }
        }
        tracing::debug!(workers = n, "session workers started");
        Ok(Workers { handles, stop })
    }

    fn len(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct ListenerTask {
    addr: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
    /// The listening sockets (copies of the workers' descriptors), for a hand-over to
    /// the next process at an upgrade.
    sockets: Vec<std::net::TcpListener>,
}

/// Listening sockets a new process starts with instead of binding: from systemd socket
/// activation, or from the process it takes over from at an upgrade. Keyed by listener
/// name; `@metrics` and `@admin` name the endpoints' sockets.
pub type Inherited = BTreeMap<String, Vec<std::net::TcpListener>>;

/// The name of the metrics endpoint's socket in an [`Inherited`] set.
pub const METRICS_SOCKET: &str = "@metrics";
/// The name of the admin endpoint's socket in an [`Inherited`] set.
pub const ADMIN_SOCKET: &str = "@admin";

/// A started proxy. Cheap to clone: every clone controls the same proxy.
#[derive(Clone)]
pub struct Running {
    /// Live state shared with sessions.
    pub control: Arc<Control>,
    /// Bound metrics address.
    pub metrics: Option<SocketAddr>,
    /// Bound admin address.
    pub admin: Option<SocketAddr>,
    listeners: Arc<Mutex<BTreeMap<String, ListenerTask>>>,
    health: Arc<Mutex<CancellationToken>>,
    tracker: TaskTracker,
    background: CancellationToken,
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    workers: Arc<Workers>,
    /// The metrics and admin endpoints, by [`METRICS_SOCKET`] / [`ADMIN_SOCKET`].
    endpoints: Arc<Mutex<BTreeMap<&'static str, Endpoint>>>,
    /// Becomes true once the first health round is done (readiness).
    first_round: tokio::sync::watch::Receiver<bool>,
}

impl Running {
    /// Copies of every listening socket (listeners and endpoints), by name, for the
    /// process that takes over at an upgrade.
    pub fn sockets(&self) -> std::io::Result<Inherited> {
        let mut out = Inherited::new();
        if let Ok(table) = self.listeners.lock() {
            for (name, task) in table.iter() {
                let copies: std::io::Result<Vec<_>> =
                    task.sockets.iter().map(|s| s.try_clone()).collect();
                out.insert(name.clone(), copies?);
            }
        }
        if let Ok(endpoints) = self.endpoints.lock() {
            for (name, e) in endpoints.iter() {
                if let Some(sock) = &e.socket {
                    out.insert(name.to_string(), vec![sock.try_clone()?]);
                }
            }
        }
        Ok(out)
    }

    /// Where the metrics endpoint listens now (it may have moved on reload).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.endpoints.lock().ok()?.get(METRICS_SOCKET)?.bound
    }

    /// Where the admin endpoint listens now (it may have moved on reload).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.endpoints.lock().ok()?.get(ADMIN_SOCKET)?.bound
    }

    /// Binds the endpoints whose address is new in `new`: what [`Running::swap_endpoints`]
    /// puts in force once the reload goes ahead (a failure here leaves everything as it
    /// was). `None` for an endpoint to stop.
    async fn rebind_endpoints(
        &self,
        old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> Result<Vec<(&'static str, Option<(SocketAddr, TcpListener)>)>, StartError> {
        let mut plan = Vec::new();
        let pairs = [
            (METRICS_SOCKET, old.metrics, new.metrics),
            (
                ADMIN_SOCKET,
                old.admin.as_ref().map(|a| a.listen),
                new.admin.as_ref().map(|a| a.listen),
            ),
        ];
        for (name, before, after) in pairs {
            if before == after {
                continue;
            }
            let sock = match after {
                Some(addr) => {
                    let sock =
                        TcpListener::bind(addr)
                            .await
                            .map_err(|source| StartError::Bind {
                                name: name.trim_start_matches('@').into(),
                                addr,
                                source,
                            })?;
                    Some((addr, sock))
                }
                None => None,
            };
            plan.push((name, sock));
        }
        Ok(plan)
    }

    /// Moves endpoints as planned by [`Running::rebind_endpoints`].
    fn swap_endpoints(&self, plan: Vec<(&'static str, Option<(SocketAddr, TcpListener)>)>) {
        let Ok(mut endpoints) = self.endpoints.lock() else {
            return;
        };
        for (name, sock) in plan {
            if let Some(old) = endpoints.remove(name) {
                old.stop.cancel();
            }
            if let Some((addr, sock)) = sock {
                if name == METRICS_SOCKET {
                    crate::metrics::install();
                }
                let e = spawn_endpoint(name, addr, sock, &self.control, &self.background);
                tracing::info!(endpoint = name.trim_start_matches('@'), addr = ?e.bound, "endpoint moved");
                endpoints.insert(name, e);
            }
        }
    }

    /// Waits until the first round of health checks is done (at most `limit`), so that a
    /// proxy that says it is ready knows which servers are up.
    pub async fn first_health_round(&self, limit: Duration) {
        let mut rx = self.first_round.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
    }

    /// Ready to serve: started, and not draining.
    pub fn is_ready(&self) -> bool {
        self.control.is_ready()
    }

    /// A status line for systemd (`STATUS=`): the stage in force and the sessions.
    pub fn status_line(&self) -> String {
        let snap = self.control.snapshot();
        let stage = snap
            .config
            .routes_at(crate::config::rfc3339::now())
            .0
            .unwrap_or("(initial)")
            .to_string();
        let sessions = self.control.state.sessions().snapshot().len();
        format!("stage {stage}, {sessions} relayed sessions")
    }
    /// The bound address of the listener named `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.lock().ok()?.get(name).map(|t| t.bound)
    }

    /// Every listener's bound address.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .lock()
            .map(|l| l.iter().map(|(n, t)| (n.clone(), t.bound)).collect())
            .unwrap_or_default()
    }

    /// Reads, validates and applies the configuration file. On any error the running
    /// configuration stays in force. Counted in `cutover_config_reloads_total`.
    pub async fn reload_from(&self, path: &Path) -> Result<usize, StartError> {
        // systemd hears of every reload, also one that fails (READY=1 follows either way).
        crate::systemd::reloading();
        let result = async {
            let config = Config::load(path)?;
            let snap = Snapshot::build(config).map_err(|source| StartError::Tls {
                file: path.to_path_buf(),
                source,
            })?;
            self.apply(Arc::new(snap)).await
        }
        .await;
        self.control.reload_result(result.is_ok());
        crate::systemd::ready(&self.status_line());
        match &result {
            Ok(moved) => {
                tracing::info!(file = %path.display(), moved_sessions = moved, "configuration reloaded");
                metrics::counter!(m::RELOADS, "result" => "ok").increment(1);
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "reload failed; keeping the running configuration");
                metrics::counter!(m::RELOADS, "result" => "error").increment(1);
            }
        }
        result
    }

    /// Puts a validated snapshot in force: binds new listeners first (any failure leaves
    /// everything as it was), swaps the snapshot, stops removed listeners, restarts health
    /// checks, and moves users whose pool changed. Established sessions are untouched
    /// (except moved users, with `on_move: kick`). Returns how many sessions will be moved.
    pub async fn apply(&self, snap: Arc<Snapshot>) -> Result<usize, StartError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.control.snapshot();
        // What a reload cannot change waits for the next start: said, counted, shown.
        let pending = crate::config::dump::restart_keys(
            &self.control.effective_config(),
            &crate::config::dump::to_value(&snap.config),
        );
        for key in &pending {
            tracing::warn!(%key, "changed in the file: takes effect at the next start or upgrade");
        }
        self.control.set_restart_required(&pending);
        // The endpoints move to their new addresses (bound before anything changes).
        let endpoints = self.rebind_endpoints(&old.config, &snap.config).await?;
        // Bind what is new or moved.
        let mut fresh = Vec::new();
        {
            let current = self
                .listeners
                .lock()
                .map_err(|_| StartError::Poisoned("listener"))?;
            for l in &snap.config.listeners {
                match current.get(&l.name) {
                    Some(t) if t.addr == l.listen => {}
                    _ => fresh.push(l.clone()),
                }
            }
        }
        let mut bound = Vec::new();
        for l in &fresh {
            bound.push((l.clone(), bind(l, self.workers.len())?));
        }
        if old.config.dns_servers != snap.config.dns_servers {
            tracing::info!(servers = ?snap.config.dns_servers, "dns.servers changed: new lookups use them");
            self.control
                .backends
                .resolver
                .set_servers(&snap.config.dns_servers);
        }
        let moved = self.control.install(snap.clone());
        self.swap_endpoints(endpoints);
        if self.metrics.is_some() {
            crate::metrics::prime(&snap.config);
        }
        {
            let mut current = self
                .listeners
                .lock()
                .map_err(|_| StartError::Poisoned("listener"))?;
            current.retain(|name, task| {
                let keep = snap
                    .config
                    .listeners
                    .iter()
                    .any(|l| &l.name == name && l.listen == task.addr);
                if !keep {
                    tracing::info!(listener = %name, addr = %task.addr, "listener removed");
                    task.stop.cancel();
                }
                keep
            });
            for (l, sock) in bound {
                current.insert(l.name.clone(), self.spawn_listener(&l, sock));
            }
        }
        self.restart_health(snap);
        Ok(moved)
    }

    fn spawn_listener(&self, l: &Listener, socks: Vec<std::net::TcpListener>) -> ListenerTask {
        let bound = socks
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(l.listen);
        // One socket (systemd's) is shared by every worker: each accepts from it.
        let mut socks = socks;
        if socks.len() == 1 && self.workers.len() > 1 {
            let extra: Vec<_> = (1..self.workers.len())
                .filter_map(|_| socks[0].try_clone().ok())
                .collect();
            socks.extend(extra);
        }
        tracing::info!(listener = %l.name, protocol = %l.protocol, addr = %bound, tls = ?l.tls, sockets = socks.len(), "listening");
        let stop = self.control.accepting.child_token();
        let sockets = socks.iter().filter_map(|s| s.try_clone().ok()).collect();
        for (sock, worker) in socks.into_iter().zip(self.workers.handles.iter().cycle()) {
            let (l, control, tracker, stop) = (
                l.clone(),
                self.control.clone(),
                self.tracker.clone(),
                stop.clone(),
            );
            worker.spawn(async move {
                // Registered with this worker's reactor: its connections stay here.
                match TcpListener::from_std(sock) {
                    Ok(sock) => accept_loop(sock, l, control, tracker, stop).await,
                    Err(e) => {
                        tracing::error!(listener = %l.name, error = %e, "cannot serve listener socket")
                    }
                }
            });
        }
        ListenerTask {
            sockets,
            addr: l.listen,
            bound,
            stop,
        }
    }

    fn restart_health(&self, snap: Arc<Snapshot>) {
        self.restart_health_reporting(snap, None);
    }

    fn restart_health_reporting(
        &self,
        snap: Arc<Snapshot>,
        first_round: Option<tokio::sync::watch::Sender<bool>>,
    ) {
        let token = self.background.child_token();
        if let Ok(mut h) = self.health.lock() {
            h.cancel();
            *h = token.clone();
        }
        tokio::spawn(crate::backend::run_health_checks(
            self.control.backends.clone(),
            snap,
            token,
            first_round,
        ));
    }

    /// Drops this process's copies of the listening sockets (kept for a hand-over): once
    /// the accept loops have stopped, the kernel refuses new connections (or, after an
    /// upgrade, only the new process has them).
    fn close_listeners(&self) {
        if let Ok(mut table) = self.listeners.lock() {
            for task in table.values() {
                task.stop.cancel();
            }
            table.clear();
        }
    }

    /// After another process took the listening sockets over (an upgrade): stops
    /// accepting and serving the endpoints (the new process answers them now), lets every
    /// session go on (those that have not logged in yet may still log in here) for up to
    /// the drain timeout, then closes what is left as [`Running::shutdown`] does. systemd
    /// is not told this process stops: the service goes on in the new one.
    pub async fn handed_over(self) {
        let grace = self.control.snapshot().config.timeouts.drain;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            sessions = self.tracker.len(),
            "handed over: no new connections here; draining"
        );
        self.control.accepting.cancel();
        self.close_listeners();
        if let Ok(endpoints) = self.endpoints.lock() {
            for e in endpoints.values() {
                e.stop.cancel();
            }
        }
        self.tracker.close();
        let _ = tokio::time::timeout(grace, self.tracker.wait()).await;
        self.finish_drain(Duration::ZERO).await;
    }

    /// Stops accepting, lets relayed sessions finish for up to the drain timeout, then
    /// closes what is left (IMAP sessions get `* BYE`) and returns.
    pub async fn shutdown(self) {
        crate::systemd::stopping("draining");
        let grace = self.control.snapshot().config.timeouts.drain;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "draining: no new connections"
        );
        self.finish_drain(grace).await;
    }

    /// The drain: sessions not logged in get their goodbye, relayed ones may finish for
    /// `grace`, then the rest are closed.
    async fn finish_drain(self, grace: Duration) {
        self.control.drain.cancel();
        self.close_listeners();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "drain timeout expired; closing remaining sessions"
            );
            self.control.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        self.background.cancel();
        tracing::info!("stopped");
    }
}

/// Binds a listener: `sockets` listening sockets on one address (with `SO_REUSEPORT` when
/// more than one), returned deregistered so each can join its worker's reactor.
fn bind(l: &Listener, sockets: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    let err = |source| StartError::Bind {
        name: l.name.clone(),
        addr: l.listen,
        source,
    };
    let open = |addr: SocketAddr, reuseport: bool| -> std::io::Result<TcpListener> {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        sock.set_reuseaddr(true)?;
        if reuseport {
            sock.set_reuseport(true)?;
        }
        // Inherited by accepted connections: sessions need not set it.
        sock.set_nodelay(true)?;
        sock.bind(addr)?;
        sock.listen(BACKLOG)
    };
    if sockets <= 1 {
        return Ok(vec![open(l.listen, false)
            .and_then(|s| s.into_std())
            .map_err(err)?]);
    }
    let mut group = Vec::with_capacity(sockets);
    let addr = if l.listen.port() == 0 {
        // Port 0: the kernel picks a port nobody uses; the first socket holds it while
        // the others join, so nothing else can take it in between.
        let first = open(l.listen, true).map_err(err)?;
        let addr = first.local_addr().map_err(err)?;
        group.push(first.into_std().map_err(err)?);
        addr
    } else {
        // SO_REUSEPORT would let this group join a socket another process (of the same
        // user) listens on, splitting the connections silently. A plain bind first fails
        // on any listener there.
        let probe = open(l.listen, false).map_err(err)?;
        probe.local_addr().map_err(err)?
    };
    while group.len() < sockets {
        group.push(open(addr, true).and_then(|s| s.into_std()).map_err(err)?);
    }
    Ok(group)
}

/// Binds every listener and the metrics and admin endpoints and starts serving.
pub async fn start(snap: Arc<Snapshot>, backends: Backends) -> Result<Running, StartError> {
    start_with(snap, backends, Inherited::new()).await
}

/// A socket of `inherited` named `name`, if any, made non-blocking for tokio.
fn take_inherited(
    inherited: &mut Inherited,
    name: &str,
) -> Result<Option<Vec<std::net::TcpListener>>, StartError> {
    let Some(socks) = inherited.remove(name) else {
        return Ok(None);
    };
    for s in &socks {
        s.set_nonblocking(true).map_err(|source| StartError::Bind {
            name: name.to_string(),
            addr: s
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })?;
    }
    Ok(Some(socks))
}

/// Binds an endpoint (metrics, admin), or takes its inherited socket.
async fn endpoint_socket(
    inherited: &mut Inherited,
    name: &str,
    addr: SocketAddr,
) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind {
        name: name.trim_start_matches('@').into(),
        addr,
        source,
    };
    match take_inherited(inherited, name)?.and_then(|mut v| v.pop()) {
        Some(sock) => TcpListener::from_std(sock).map_err(err),
        None => TcpListener::bind(addr).await.map_err(err),
    }
}

/// Starts the proxy, serving on `inherited` sockets where they are given (by listener
/// name, see [`Inherited`]) and binding the others.
pub async fn start_with(
    snap: Arc<Snapshot>,
    backends: Backends,
    mut inherited: Inherited,
) -> Result<Running, StartError> {
    let control = Control::new(snap.clone(), backends);
    let background = CancellationToken::new();
    let workers =
        Workers::start(snap.config.workers).map_err(|source| StartError::Workers { source })?;
    let mut sockets = Vec::new();
    for l in &snap.config.listeners {
        let socks = match take_inherited(&mut inherited, &l.name)? {
            Some(socks) => socks,
            None => bind(l, workers.len())?,
        };
        sockets.push((l.clone(), socks));
    }
    for name in inherited.keys().filter(|n| !n.starts_with('@')) {
        tracing::warn!(listener = %name, "an inherited socket names no listener: closed");
    }
    let mut endpoints = BTreeMap::new();
    if let Some(addr) = snap.config.metrics {
        // The recorder first: series primed before it would be lost.
        let upkeep = crate::metrics::install();
        crate::metrics::prime(&snap.config);
        // Histograms keep their samples until rendered: drain them even when nobody
        // scrapes, so memory does not grow with the number of logins.
        let stop = background.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                    _ = stop.cancelled() => return,
                }
            }
        });
        let sock = endpoint_socket(&mut inherited, METRICS_SOCKET, addr).await?;
        let e = spawn_endpoint(METRICS_SOCKET, addr, sock, &control, &background);
        endpoints.insert(METRICS_SOCKET, e);
    }
    if let Some(a) = &snap.config.admin {
        let sock = endpoint_socket(&mut inherited, ADMIN_SOCKET, a.listen).await?;
        let e = spawn_endpoint(ADMIN_SOCKET, a.listen, sock, &control, &background);
        endpoints.insert(ADMIN_SOCKET, e);
    }
    let bound = |name| endpoints.get(name).and_then(|e: &Endpoint| e.bound);
    let (metrics_addr, admin_addr) = (bound(METRICS_SOCKET), bound(ADMIN_SOCKET));
    let (first_round_tx, first_round_rx) = tokio::sync::watch::channel(false);
    let running = Running {
        control: control.clone(),
        metrics: metrics_addr,
        admin: admin_addr,
        listeners: Arc::new(Mutex::new(BTreeMap::new())),
        health: Arc::new(Mutex::new(CancellationToken::new())),
        tracker: TaskTracker::new(),
        background,
        reload_lock: Arc::new(tokio::sync::Mutex::new(())),
        workers: Arc::new(workers),
        endpoints: Arc::new(Mutex::new(endpoints)),
        first_round: first_round_rx,
    };
    if let Ok(mut table) = running.listeners.lock() {
        for (l, sock) in sockets {
            table.insert(l.name.clone(), running.spawn_listener(&l, sock));
        }
    }
    running.restart_health_reporting(snap, Some(first_round_tx));
    tokio::spawn(control.clone().run_stage_clock());
    tokio::spawn(watchdog(running.clone()));
    let starting = running.clone();
    tokio::spawn(async move {
        // Ready once the servers' state is known (or after a bounded wait for it).
        starting.first_health_round(FIRST_ROUND_LIMIT).await;
        starting.control.set_started();
        crate::systemd::ready(&starting.status_line());
        tracing::info!("ready");
    });
    Ok(running)
}

/// A metrics or admin endpoint: its server and a copy of its socket (for an upgrade).
struct Endpoint {
    bound: Option<SocketAddr>,
    stop: CancellationToken,
    socket: Option<std::net::TcpListener>,
}

/// Serves the endpoint `name` ([`METRICS_SOCKET`] or [`ADMIN_SOCKET`]) on `sock` until
/// its own token (a child of `background`) is cancelled.
fn spawn_endpoint(
    name: &'static str,
    addr: SocketAddr,
    sock: TcpListener,
    control: &Arc<Control>,
    background: &CancellationToken,
) -> Endpoint {
    let bound = sock.local_addr().ok().or(Some(addr));
    let stop = background.child_token();
    // Not expected to fail (a dup of an open socket); without it an upgrade's new
    // process binds this endpoint itself.
    let socket = socket_copy(&sock).ok();
    if name == METRICS_SOCKET {
        let c = control.clone();
        let collect: crate::metrics::Collector = Arc::new(move |out: &mut String| c.collect(out));
        let c = control.clone();
        let ready: crate::metrics::Readiness = Arc::new(move || c.is_ready());
        let handle = crate::metrics::install();
        tokio::spawn(crate::metrics::serve(
            sock,
            handle,
            collect,
            ready,
            stop.clone(),
        ));
    } else {
        tokio::spawn(crate::admin::serve(sock, control.clone(), stop.clone()));
    }
    Endpoint {
        bound,
        stop,
        socket,
    }
}

/// The longest wait for the first health round before the proxy says it is ready.
const FIRST_ROUND_LIMIT: Duration = Duration::from_secs(30);

/// A copy of a tokio listener's socket (same kernel socket, another descriptor).
fn socket_copy(sock: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    socket2::SockRef::from(sock)
        .try_clone()
        .map(std::net::TcpListener::from)
}

/// With `WatchdogSec=`, pings systemd while every session worker answers: a ping is sent
/// only after each worker ran a task of ours, so a stuck worker stops the pings.
async fn watchdog(running: Running) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        // `systemctl status` shows the stage in force and the sessions, kept current.
        let status = running.clone();
        tokio::spawn(async move {
            loop {
                // Not after this process stopped accepting: systemd hears of the service
                // from the process that serves it (after an upgrade, the new one).
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    _ = status.control.accepting.cancelled() => return,
                }
                if status.control.is_ready() {
                    crate::systemd::status(&status.status_line());
                }
            }
        });
    }
    let Some(interval) = crate::systemd::watchdog_interval() else {
        return;
    };
    let every = (interval / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = running.control.accepting.cancelled() => return,
        }
        let mut answers = Vec::new();
        for worker in &running.workers.handles {
            let (tx, rx) = tokio::sync::oneshot::channel();
            worker.spawn(async move {
                let _ = tx.send(());
            });
            answers.push(rx);
        }
        let all = async {
            for rx in answers {
                if rx.await.is_err() {
                    return false;
                }
            }
            true
        };
        match tokio::time::timeout(every, all).await {
            Ok(true) => crate::systemd::watchdog(),
            _ => tracing::warn!("a session worker did not answer in time: no watchdog ping"),
        }
    }
}

async fn accept_loop(
    sock: TcpListener,
    own: Listener,
    control: Arc<Control>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    // This listener's settings in the configuration last seen, shared by its sessions
    // until a reload brings another. The configuration is held weakly: a quiet listener
    // does not keep a replaced one alive (and the allocation the `Weak` keeps cannot be
    // reused for a newer one, so the pointer comparison cannot be fooled).
    let mut current: Option<(std::sync::Weak<Snapshot>, Arc<Listener>)> = None;
    loop {
        let accepted = tokio::select! {
            r = sock.accept() => r,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(10);
                // The configuration in force at accept time serves the session until its
                // login routes it (see `session`: which configuration a session uses).
                let snap = control.snapshot();
                // Its current settings; a listener just removed by a reload (this loop is
                // about to stop) still serves what it accepted with its last settings.
                let listener = match &current {
                    Some((seen, l)) if std::ptr::eq(seen.as_ptr(), Arc::as_ptr(&snap)) => l.clone(),
                    _ => {
                        let l = snap
                            .config
                            .listeners
                            .iter()
                            .find(|l| l.name == own.name)
                            .cloned()
                            .unwrap_or_else(|| own.clone());
                        let l = Arc::new(l);
                        current = Some((Arc::downgrade(&snap), l.clone()));
                        l
                    }
                };
                let peer = normalize_peer(peer);
                let ctx = SessionCtx {
                    snap,
                    listener,
                    control: control.clone(),
                };
                if ctx.listener.proxy_protocol == ProxyMode::Off {
                    admit_and_serve(ctx, tcp, Origin::direct(peer), &tracker);
                } else {
                    // The balancer's header comes first: admission is by the client's
                    // address it names.
                    let tracker_for_session = tracker.clone();
                    tracker.spawn(async move {
                        let mut tcp = tcp;
                        let settings = &ctx.snap.config.proxy_protocol;
                        let mode = ctx.listener.proxy_protocol;
                        match front::origin(&mut tcp, peer, mode, settings).await {
                            Ok(origin) => admit_and_serve(ctx, tcp, origin, &tracker_for_session),
                            Err(refusal) => {
                                let l = &ctx.listener;
                                metrics::counter!(m::REFUSED, "listener" => l.name.clone(), "protocol" => l.protocol.as_str(), "reason" => refusal.as_str()).increment(1);
                                tracing::debug!(listener = %l.name, %peer, reason = refusal.as_str(), "connection refused at its PROXY header");
                            }
                        }
                    });
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = %own.name, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Admits a connection by its client's address and serves it, or turns it away in
/// protocol when a connection limit is reached.
fn admit_and_serve(ctx: SessionCtx, tcp: TcpStream, origin: Origin, tracker: &TaskTracker) {
    let limits = &ctx.snap.config.conn_limits;
    match ctx.control.admission.admit(origin.client.ip(), limits) {
        Ok(ticket) => {
            tracker.spawn(session::run(ctx, tcp, origin, ticket));
        }
        Err(refusal) => {
            let l = &ctx.listener;
            metrics::counter!(m::REFUSED, "listener" => l.name.clone(), "protocol" => l.protocol.as_str(), "reason" => refusal.as_str()).increment(1);
            tracing::debug!(listener = %l.name, peer = %origin.client, reason = refusal.as_str(), "connection refused");
            tokio::spawn(session::refuse(ctx.listener, tcp));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;
    use crate::proto::ListenerTls;

    fn test_listener() -> Listener {
        Listener {
            name: "t".into(),
            protocol: Protocol::Imap,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: ListenerTls::None,
            allow_plaintext_auth: true,
            bridge_window: None,
            proxy_protocol: crate::config::ProxyMode::Off,
            sasl: Default::default(),
        }
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay_from_the_listener() {
        // Sessions do not set TCP_NODELAY themselves: they rely on Linux copying it from
        // the listening socket (small replies must not wait for a delayed ACK).
        let l = test_listener();
        for sockets in [1, 2] {
            let group = bind(&l, sockets).unwrap();
            assert_eq!(group.len(), sockets);
            let sock = TcpListener::from_std(group.into_iter().next().unwrap()).unwrap();
            let addr = sock.local_addr().unwrap();
            // With two sockets in the group the kernel may hand the connection to the
            // other one; connect until this one gets one.
            let mut clients = Vec::new();
            let accepted = loop {
                clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
                if let Ok(Ok((s, _))) =
                    tokio::time::timeout(Duration::from_millis(50), sock.accept()).await
                {
                    break s;
                }
            };
            assert!(accepted.nodelay().unwrap());
        }
    }

    #[tokio::test]
    async fn a_listener_group_shares_one_port_and_refuses_a_taken_address() {
        let mut l = test_listener();
        let group = bind(&l, 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
        // Another listener (here: a plain one) holds the address: a group must not
        // join it.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.listen = other.local_addr().unwrap();
        assert!(matches!(bind(&l, 2), Err(StartError::Bind { .. })));
        assert!(matches!(bind(&l, 1), Err(StartError::Bind { .. })));
    }
}

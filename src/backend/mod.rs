//! Connections to backend servers: connect with timeouts, TLS, the protocol's login
//! machine, failover inside a pool, and health.
//!
//! Failover happens only when a server is *unavailable* (connect refused or timed out,
//! TLS failure, a bad greeting, a temporary failure, a stall): a rejected password is
//! final and never tried on the next server (one typo must not become N attempts and
//! lock an account).

pub mod health;
pub mod resolve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Pool, PoolProtocol, Protocol, ServerAddr};
use crate::metrics as m;
use crate::proto::{
    self, Auth, BackendAction, BackendLogin, BackendPolicy, BackendResult, BackendTls, ClientInfo,
    Credentials, Unavailable,
};
use crate::snapshot::Snapshot;
use crate::stream::{BackendStream, Stream};
use health::{Registry, ServerState};
use resolve::Resolver;

/// Most bytes buffered from a backend before its login finishes.
const MAX_BACKEND_PENDING: usize = 256 * 1024;

/// Why one attempt on one server failed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// DNS gave no address.
    Resolve,
    /// Connection refused or reset.
    Refused,
    /// Connect or login deadline passed.
    Timeout,
    /// TLS handshake or certificate verification failed, or STARTTLS was refused.
    Tls,
    /// Bad or missing greeting.
    Greeting,
    /// The server closed the connection or spoke nonsense.
    Protocol,
    /// No usable login mechanism.
    NoMechanism,
    /// pop-before-smtp: the POP3 server paired with this SMTP server was unavailable (the
    /// failure is counted against the POP3 server, not this one).
    PairedPop3,
}

impl Failure {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Resolve => "resolve",
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Tls => "tls",
            Failure::Greeting => "greeting",
            Failure::Protocol => "protocol",
            Failure::NoMechanism => "no_mechanism",
            Failure::PairedPop3 => "paired_pop3",
        }
    }
}

impl From<Unavailable> for Failure {
    fn from(u: Unavailable) -> Self {
        match u {
            Unavailable::Greeting => Failure::Greeting,
            Unavailable::Tls => Failure::Tls,
            Unavailable::Protocol => Failure::Protocol,
            Unavailable::NoMechanism => Failure::NoMechanism,
        }
    }
}

/// What a backend machine is asked to do.
pub enum Job {
    /// Health probe: greeting and capabilities, then goodbye.
    Probe,
    /// Log in: replay the password, or (SMTP, [`crate::proto::Auth::Bridged`]) open the
    /// session without AUTH.
    Login(Credentials),
}

/// A logged-in backend connection, ready for the relay.
pub struct Connected {
    /// The connection.
    pub stream: BackendStream,
    /// Bytes the backend sent after its login reply: they belong to the client.
    pub leftover: Vec<u8>,
    /// The server's address, as configured.
    pub server: String,
    /// IMAP: post-login capabilities.
    pub capabilities: Option<String>,
}

/// What one attempt on one server came to, when the server answered at all.
pub struct Attempted {
    /// The machine's result.
    pub result: BackendResult,
    /// The connection.
    pub stream: BackendStream,
    /// Bytes the backend sent after the end of the login.
    pub leftover: Vec<u8>,
}

/// The result of logging a user in somewhere in a pool.
pub enum PoolResult {
    /// Logged in.
    LoggedIn(Connected),
    /// The credentials were rejected by `server`.
    Rejected {
        /// The backend's text.
        response: String,
        /// Which server said so.
        server: String,
        /// An OAuth error challenge the backend sent first (RFC 7628), for the client.
        challenge: Option<String>,
    },
    /// No server of the pool was available.
    Unavailable,
    /// An OAuth login that no pool of the route can take (pop-before-smtp pools have
    /// nothing to check a token with).
    TokenNotAccepted,
}

/// Shared backend machinery: health registry and resolver.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Health of every server.
    pub registry: Arc<Registry>,
    /// DNS.
    pub resolver: Resolver,
}

impl Backends {
    /// Fresh state.
    pub fn new() -> Self {
        Backends {
            registry: Arc::new(Registry::default()),
            resolver: Resolver::from_system(),
        }
    }
}

impl Backends {
    /// Fresh state with a given resolver.
    pub fn with_resolver(resolver: Resolver) -> Self {
        Backends {
            registry: Arc::new(Registry::default()),
            resolver,
        }
    }
}

impl Default for Backends {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds the login machine for a protocol.
pub fn new_machine(
    protocol: Protocol,
    policy: BackendPolicy,
    job: Job,
) -> Box<dyn BackendLogin + Send> {
    let creds = match job {
        Job::Login(c) => Some(c),
        Job::Probe => None,
    };
    match protocol {
        Protocol::Imap => Box::new(proto::imap::BackendMachine::new(policy, creds)),
        Protocol::Pop3 => Box::new(proto::pop3::BackendMachine::new(policy, creds)),
        Protocol::Smtp => Box::new(proto::smtp::BackendMachine::new(policy, creds)),
    }
}

/// Connects to every address of `addr` in turn until one accepts (keepalive: see
/// [`connect_tcp`]).
pub async fn connect(
    resolver: &Resolver,
    addr: &ServerAddr,
    timeout: Duration,
    dns_grace: Duration,
    keepalive: Duration,
) -> Result<TcpStream, Failure> {
    let ips = resolver.resolve(&addr.host, dns_grace).await.map_err(|e| {
        tracing::debug!(server = %addr, error = %e, "resolve failed");
        Failure::Resolve
    })?;
    let mut last = Failure::Refused;
    for ip in ips {
        match tokio::time::timeout(
            timeout,
            connect_tcp(SocketAddr::new(ip, addr.port), keepalive),
        )
        .await
        {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => {
                tracing::debug!(server = %addr, %ip, error = %e, "connect failed");
                last = Failure::Refused;
            }
            Err(_) => {
                tracing::debug!(server = %addr, %ip, "connect timed out");
                last = Failure::Timeout;
            }
        }
    }
    Err(last)
}

/// `connect(2)` on a non-blocking socket: under way (`io::ErrorKind::InProgress` is not
/// stable yet).
#[cfg(target_os = "linux")]
const EINPROGRESS: i32 = 115;
#[cfg(not(target_os = "linux"))]
const EINPROGRESS: i32 = 36;

/// Keepalive probes after `idle` of silence on a backend connection: every 10 s, and after
/// six unanswered the kernel gives up. A backend host that vanishes without a reset (power
/// lost, network cut) so ends its relayed sessions about a minute after the pool's
/// `keepalive`, where an idle session (IMAP IDLE) would otherwise wait for it for ever: the
/// relay counts the timeout (`cutover_backend_disconnects_total{reason="timeout"}`) and says
/// the protocol's goodbye to the client, which logs in again and lands on a healthy server.
fn backend_keepalive(idle: Duration) -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// A TCP connection with TCP_NODELAY and, unless `keepalive` is zero, keepalive probes
/// after that much silence ([`backend_keepalive`]); like
/// `TcpStream::connect` but without the `getsockopt(SO_ERROR)` it makes once connected: the
/// outcome is taken from the readiness epoll reports (an error or hang-up is a failed
/// connect).
async fn connect_tcp(addr: SocketAddr, keepalive: Duration) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol as IpProto, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(IpProto::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    if !keepalive.is_zero() {
        sock.set_tcp_keepalive(&backend_keepalive(keepalive))?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let tcp = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    let ready = tcp
        .ready(tokio::io::Interest::WRITABLE | tokio::io::Interest::ERROR)
        .await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(tcp
            .take_error()?
            .unwrap_or_else(|| std::io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(tcp)
}

/// What logging in to one pool for one protocol needs, whichever of its servers is tried.
pub struct PoolLogin<'a> {
    /// Health registry and resolver.
    pub backends: &'a Backends,
    /// The configuration in force for this login (TLS client configurations included).
    pub snap: &'a Snapshot,
    /// The pool.
    pub pool: &'a Pool,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// The pool's servers and TLS for that protocol.
    pub servers: &'a PoolProtocol,
    /// The client, for backends that are told who it is (`forward_client_address`).
    pub client: Option<ClientInfo>,
    /// The name to give in EHLO (SMTP).
    pub helo: &'a str,
}

impl<'a> PoolLogin<'a> {
    /// `None` if the snapshot has no pool `pool_name` or it has no servers for
    /// `protocol`.
    pub fn new(
        backends: &'a Backends,
        snap: &'a Snapshot,
        pool_name: &str,
        protocol: Protocol,
        client: Option<ClientInfo>,
        helo: &'a str,
    ) -> Option<PoolLogin<'a>> {
        let pool = snap.config.pools.get(pool_name)?;
        Some(PoolLogin {
            backends,
            snap,
            pool,
            protocol,
            servers: pool.protocols.get(&protocol)?,
            client,
            helo,
        })
    }

    /// The same pool for another protocol (pop-before-smtp checks SMTP logins by POP3).
    fn speaking(&self, protocol: Protocol) -> Option<PoolLogin<'a>> {
        Some(PoolLogin {
            protocol,
            servers: self.pool.protocols.get(&protocol)?,
            client: self.client.clone(),
            ..*self
        })
    }

    /// One attempt on one server (whose health `state` is given): connect, TLS, machine;
    /// bounded by the pool's login timeout.
    pub async fn attempt(
        &self,
        addr: &ServerAddr,
        state: &ServerState,
        job: Job,
    ) -> Result<Attempted, Failure> {
        let known_capabilities = match self.protocol {
            Protocol::Imap => state.login_capabilities(self.servers.tls),
            Protocol::Pop3 | Protocol::Smtp => None,
        };
        let policy = BackendPolicy {
            tls: self.servers.tls,
            forward_client: self
                .client
                .clone()
                .filter(|_| self.pool.forward_client_address),
            helo: self.helo.to_string(),
            known_capabilities,
        };
        let mut machine = new_machine(self.protocol, policy, job);
        let work = async {
            let connect_started = std::time::Instant::now();
            let pool = self.pool;
            let tcp = connect(
                &self.backends.resolver,
                addr,
                pool.connect_timeout,
                pool.dns_grace,
                pool.keepalive,
            )
            .await?;
            m::handles::pool(&pool.name, self.protocol)
                .connect_seconds(addr.as_str())
                .record(connect_started.elapsed().as_secs_f64());
            let mut tcp = tcp;
            if pool.proxy_protocol {
                self.send_proxy_header(&mut tcp).await?;
            }
            let stream = if self.servers.tls == BackendTls::Implicit {
                self.tls_connect(tcp, addr).await?
            } else {
                Stream::Plain(tcp)
            };
            self.drive(machine.as_mut(), stream, addr).await
        };
        let result = match tokio::time::timeout(self.pool.login_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        if let Some(caps) = machine.fresh_capabilities() {
            state.learn_login_capabilities(self.servers.tls, caps);
        }
        result
    }

    /// A PROXY protocol v2 header first: the client's address for a login, `LOCAL` for a
    /// health probe (no client), so that a backend that requires one never drops either.
    async fn send_proxy_header(&self, tcp: &mut TcpStream) -> Result<(), Failure> {
        let header = match (&self.client, tcp.peer_addr()) {
            (Some(c), Ok(backend)) => {
                proto::proxy::v2_header(SocketAddr::new(c.ip, c.port), backend)
            }
            _ => proto::proxy::v2_local(),
        };
        tcp.write_all(&header).await.map_err(|_| Failure::Refused)
    }

    async fn tls_connect(
        &self,
        tcp: TcpStream,
        addr: &ServerAddr,
    ) -> Result<BackendStream, Failure> {
        let (pool, protocol) = (&self.pool.name, self.protocol);
        let cfg = self
            .snap
            .backend_tls
            .get(&(pool.clone(), protocol))
            .ok_or(Failure::Tls)?;
        let name =
            crate::tls::backend_name(self.servers.server_name.as_deref(), addr).map_err(|e| {
                tracing::warn!(server = %addr, error = %e, "no valid TLS name for backend");
                Failure::Tls
            })?;
        let connector = tokio_rustls::TlsConnector::from(cfg.clone());
        match connector.connect(name, tcp).await {
            Ok(t) => Ok(Stream::Tls(Box::new(t))),
            Err(e) => {
                tracing::warn!(%pool, %protocol, server = %addr, error = %e, "backend TLS handshake failed");
                Err(Failure::Tls)
            }
        }
    }

    /// Runs a login machine over a connection until it is done.
    async fn drive(
        &self,
        machine: &mut (dyn BackendLogin + Send),
        mut stream: BackendStream,
        addr: &ServerAddr,
    ) -> Result<Attempted, Failure> {
        // Read straight into `buf` (no stack chunk: this future lives in every login).
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        loop {
            while let Some(action) = machine.poll_action() {
                match action {
                    BackendAction::Send(mut bytes) => {
                        let written = stream.write_all(&bytes).await;
                        // May hold the replayed credentials.
                        proto::wipe(&mut bytes);
                        written.map_err(|_| Failure::Protocol)?;
                        stream.flush().await.map_err(|_| Failure::Protocol)?;
                    }
                    BackendAction::StartTls => {
                        // Whatever the backend sent after its go-ahead arrived in
                        // plaintext and is not trusted: discard it.
                        buf.clear();
                        stream = match stream {
                            Stream::Plain(tcp) => self.tls_connect(tcp, addr).await?,
                            Stream::Tls(_) => return Err(Failure::Protocol),
                        };
                        machine.tls_established();
                    }
                    BackendAction::Done(result) => {
                        return Ok(Attempted {
                            result,
                            stream,
                            leftover: buf,
                        })
                    }
                }
            }
            let used = machine.receive(&buf);
            if used > 0 {
                buf.drain(..used.min(buf.len()));
                continue;
            }
            if buf.len() >= MAX_BACKEND_PENDING {
                return Err(Failure::Protocol);
            }
            buf.reserve(1024);
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|_| Failure::Protocol)?;
            if n == 0 {
                return Err(Failure::Protocol);
            }
        }
    }

    /// The servers in the decision's order, available ones first (with their index in
    /// the pool's list).
    pub fn try_order(&self, order: &[String]) -> Vec<(usize, &'a ServerAddr)> {
        let (pool, protocol, pp) = (self.pool, self.protocol, self.servers);
        let mut ordered: Vec<(usize, &ServerAddr)> = order
            .iter()
            .filter_map(|s| {
                pp.servers
                    .iter()
                    .enumerate()
                    .find(|(_, a)| a.as_str() == s.as_str())
            })
            .collect();
        // Stable partition: available servers keep their order and go first; down servers
        // remain as a last resort, so a pool whose probes are all failing is still tried.
        let paired = self
            .checks_by_pop3()
            .then(|| pool.protocols.get(&Protocol::Pop3))
            .flatten();
        let reg = &self.backends.registry;
        let available = |index: usize, a: &ServerAddr| {
            reg.get(&pool.name, protocol, a.as_str())
                .is_available(&pool.health)
                && paired
                    .and_then(|pop| pop.servers.get(index))
                    .is_none_or(|p| {
                        reg.get(&pool.name, Protocol::Pop3, p.as_str())
                            .is_available(&pool.health)
                    })
        };
        ordered.sort_by_key(|(i, a)| !available(*i, a));
        ordered
    }

    /// SMTP to a `pop-before-smtp` pool: passwords are checked by POP3 on the same host.
    /// An SMTP pool that verifies passwords with POP3 and relays without AUTH
    /// (`auth: pop-before-smtp`): it has nothing to check a token with.
    pub fn checks_by_pop3(&self) -> bool {
        self.protocol == Protocol::Smtp
            && self.servers.auth == crate::config::SmtpAuth::PopBeforeSmtp
    }

    /// Logs in to the first available server of the pool, failing over on unavailability
    /// only.
    pub async fn login(&self, order: &[String], creds: &Credentials) -> PoolResult {
        let (pool_name, protocol) = (self.pool.name.as_str(), self.protocol);
        let candidates = self.try_order(order);
        let total = candidates.len();
        for (n, (index, addr)) in candidates.into_iter().enumerate() {
            let server = addr.as_str();
            let state = self.backends.registry.get(pool_name, protocol, server);
            let result = match &creds.auth {
                Auth::Password { .. } if self.checks_by_pop3() => {
                    self.pop_before_smtp(index, addr, &state, creds).await
                }
                _ => self.attempt(addr, &state, Job::Login(creds.clone())).await,
            };
            match self.settle(result, &state, server, order) {
                Ok(done) => return done,
                Err(failure) => self.count_unavailable(server, &state, failure, creds),
            }
            if n + 1 < total {
                metrics::counter!(m::FAILOVERS, "pool" => pool_name.to_string(), "protocol" => protocol.as_str())
                    .increment(1);
            }
        }
        PoolResult::Unavailable
    }

    /// What `server`'s answer to a login means for the pool: the login's outcome (logged
    /// in; or refused, and then it answered, so it is up), or why it could not serve the
    /// login (everything that is not a login or a rejection).
    fn settle(
        &self,
        result: Result<Attempted, Failure>,
        state: &ServerState,
        server: &str,
        order: &[String],
    ) -> Result<PoolResult, Failure> {
        let attempted = result?;
        let (response, challenge) = match attempted.result {
            BackendResult::LoggedIn { capabilities } => {
                state.record_login_success();
                if order.first().is_some_and(|preferred| preferred != server) {
                    // Served, but not by the user's preferred server: its standby carries
                    // the user (after a failover here, or because the preferred one was
                    // already known down and skipped).
                    metrics::counter!(m::LOGINS_STANDBY, "pool" => self.pool.name.clone(), "protocol" => self.protocol.as_str())
                        .increment(1);
                }
                return Ok(PoolResult::LoggedIn(Connected {
                    stream: attempted.stream,
                    leftover: attempted.leftover,
                    server: server.to_owned(),
                    capabilities,
                }));
            }
            BackendResult::AuthFailed { response } => (response, None),
            BackendResult::TokenRefused {
                challenge,
                response,
            } => (response, Some(challenge)),
            BackendResult::Ready { .. } => {
                tracing::error!(%server, "backend machine answered a login with a probe result");
                return Err(Failure::Protocol);
            }
            BackendResult::Unavailable(u) => return Err(u.into()),
        };
        state.record_login_success();
        Ok(PoolResult::Rejected {
            response,
            server: server.to_owned(),
            challenge,
        })
    }

    /// Counts a server that could not serve a login. A paired POP3 check server's failure
    /// was counted against that server. A server without the token's mechanism cannot
    /// serve this login, but it is not down: password logins still go to it.
    fn count_unavailable(
        &self,
        server: &str,
        state: &ServerState,
        failure: Failure,
        creds: &Credentials,
    ) {
        let (pool_name, protocol) = (self.pool.name.as_str(), self.protocol);
        let this_login_only = failure == Failure::NoMechanism && creds.token_payload().is_some();
        if this_login_only {
            tracing::info!(pool = pool_name, %protocol, %server, mechanism = creds.mechanism(), "server does not offer the login's mechanism; trying the next");
            count_failure(pool_name, protocol, server, failure);
        } else if failure != Failure::PairedPop3 {
            tracing::warn!(pool = pool_name, %protocol, %server, reason = failure.as_str(), "backend unavailable");
            count_failure(pool_name, protocol, server, failure);
            state.record_failure(&self.pool.health);
        }
    }

    /// The legacy hosts' SMTP trusts a recent POP3 login from the proxy's address: verify
    /// the credentials with a POP3 login on the paired host, then open SMTP there,
    /// bridged (without AUTH).
    async fn pop_before_smtp(
        &self,
        index: usize,
        smtp_addr: &ServerAddr,
        smtp_state: &ServerState,
        creds: &Credentials,
    ) -> Result<Attempted, Failure> {
        let pop = self.speaking(Protocol::Pop3).ok_or(Failure::NoMechanism)?;
        let pop_addr = pop.servers.servers.get(index).ok_or(Failure::NoMechanism)?;
        let pool = self.pool;
        let pop_server = pop_addr.as_str();
        let pop_state = self
            .backends
            .registry
            .get(&pool.name, Protocol::Pop3, pop_server);
        let checked = pop
            .attempt(pop_addr, &pop_state, Job::Login(creds.clone()))
            .await;
        // A POP3 server that is down is that server's failure, not the SMTP server's.
        let pop_down = |f: Failure| {
            tracing::warn!(pool = %pool.name, server = %pop_server, reason = f.as_str(), "pop-before-smtp: POP3 check server unavailable");
            count_failure(&pool.name, Protocol::Pop3, pop_server, f);
            pop_state.record_failure(&pool.health);
            Failure::PairedPop3
        };
        let mut checked = match checked {
            Ok(Attempted {
                result: BackendResult::Unavailable(u),
                ..
            }) => return Err(pop_down(u.into())),
            Ok(a) => a,
            Err(f) => return Err(pop_down(f)),
        };
        if !matches!(checked.result, BackendResult::LoggedIn { .. }) {
            checked.leftover = Vec::new();
            return Ok(checked);
        }
        pop_state.record_login_success();
        let _ = checked.stream.write_all(proto::pop3::QUIT).await;
        let _ = checked.stream.shutdown().await;
        let bridged = Credentials::bridged(creds.user.clone());
        self.attempt(smtp_addr, smtp_state, Job::Login(bridged))
            .await
    }
}

fn count_failure(pool: &str, protocol: Protocol, server: &str, f: Failure) {
    metrics::counter!(m::BACKEND_FAILURES, "pool" => pool.to_string(), "protocol" => protocol.as_str(), "server" => server.to_string(), "reason" => f.as_str())
        .increment(1);
}

/// Probes one server once (connect, TLS, greeting, capabilities, goodbye).
pub async fn probe(
    backends: &Backends,
    snap: &Snapshot,
    pool: &Pool,
    protocol: Protocol,
    addr: &ServerAddr,
) -> Result<Vec<String>, Failure> {
    let hostname = &snap.config.hostname;
    let target = PoolLogin::new(backends, snap, &pool.name, protocol, None, hostname)
        .ok_or(Failure::NoMechanism)?;
    let state = backends.registry.get(&pool.name, protocol, addr.as_str());
    let Attempted {
        result, mut stream, ..
    } = target.attempt(addr, &state, Job::Probe).await?;
    // Send the machine's goodbye (already written), then close politely.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    match result {
        BackendResult::Ready { capabilities } => Ok(capabilities),
        BackendResult::Unavailable(u) => Err(u.into()),
        BackendResult::LoggedIn { .. }
        | BackendResult::AuthFailed { .. }
        | BackendResult::TokenRefused { .. } => Err(Failure::Protocol),
    }
}

/// Runs the active health checks of every server in the snapshot until `stop`.
pub async fn run_health_checks(
    backends: Backends,
    snap: Arc<Snapshot>,
    stop: tokio_util::sync::CancellationToken,
    first_round: Option<tokio::sync::watch::Sender<bool>>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    // Servers whose first probe has not finished; the last one reports the round done.
    let probed: usize = (snap.config.pools.values())
        .filter(|p| !p.health.interval.is_zero())
        .flat_map(|p| p.protocols.values())
        .map(|pp| pp.servers.len())
        .sum();
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(probed));
    let first_round = Arc::new(first_round);
    if probed == 0 {
        if let Some(tx) = first_round.as_ref() {
            let _ = tx.send(true);
        }
    }
    for pool in snap.config.pools.values() {
        if pool.health.interval.is_zero() {
            continue;
        }
        for (protocol, pp) in &pool.protocols {
            for addr in &pp.servers {
                let (backends, snap, stop) = (backends.clone(), snap.clone(), stop.clone());
                let (pool_name, protocol, addr) = (pool.name.clone(), *protocol, addr.clone());
                let (pending, first_round) = (pending.clone(), first_round.clone());
                tasks.spawn(async move {
                    let mut first = true;
                    let Some(pool) = snap.config.pools.get(&pool_name) else { return };
                    let server = addr.as_str().to_owned();
                    let state = backends.registry.get(&pool_name, protocol, &server);
                    loop {
                        match probe(&backends, &snap, pool, protocol, &addr).await {
                            Ok(caps) => state.record_probe_success(&pool.health, caps),
                            Err(f) => {
                                tracing::debug!(pool = %pool_name, %protocol, %server, reason = f.as_str(), "probe failed");
                                count_failure(&pool_name, protocol, &server, f);
                                state.record_failure(&pool.health);
                            }
                        }
                        if std::mem::take(&mut first)
                            && pending.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1
                        {
                            if let Some(tx) = first_round.as_ref() {
                                let _ = tx.send(true);
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(health::probe_delay(pool.health.interval, &server)) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                });
            }
        }
    }
    stop.cancelled().await;
    tasks.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backend_connections_probe_a_silent_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = connect_tcp(addr, Duration::from_secs(45)).await.unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(45));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
        assert!(sock.tcp_nodelay().unwrap());
        // Off: no probes.
        let tcp = connect_tcp(addr, Duration::ZERO).await.unwrap();
        assert!(!socket2::SockRef::from(&tcp).keepalive().unwrap());
    }
}

//! The validated configuration: what every other module sees.
//!
//! The types here are what every other module reads. [`Config::load`] reads
//! `routes.yaml`, parses it through [`file`] (the YAML shape) and hands it to `validate`
//! (one function per section), which checks everything that can be checked without the
//! network: addresses, durations, enums, that every route names a pool that serves every
//! protocol a listener offers, that files exist. Errors name the key path and the line
//! ([`ConfigError`]). `names` holds user-name normalization and the stable hash, which
//! routing and validation share.

pub mod dump;
pub mod file;
mod names;
pub mod rfc3339;
pub mod userset;
mod validate;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{BackendTls, Limits, ListenerTls};
pub use names::{bucket, normalize, stable_hash};
pub use userset::UserSet;

/// A mail protocol cutover speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// IMAP4rev1/rev2.
    Imap,
    /// POP3.
    Pop3,
    /// SMTP submission.
    Smtp,
}

impl Protocol {
    /// Lowercase name, as in the config and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Smtp => "smtp",
        }
    }
    /// Every protocol.
    pub const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "imap" => Ok(Protocol::Imap),
            "pop3" => Ok(Protocol::Pop3),
            "smtp" => Ok(Protocol::Smtp),
            other => Err(format!(
                "unknown protocol {other:?} (expected imap, pop3 or smtp)"
            )),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key has a bad value, or the file is not valid YAML of the expected shape.
    #[error("{file}:{line}:{col}: {key}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Key path such as `routes[2].pool`.
        key: String,
        /// 1-based line (0 if unknown).
        line: usize,
        /// 1-based column (0 if unknown).
        col: usize,
        /// What is wrong.
        message: String,
    },
}

/// Whether a listener's connections start with a PROXY protocol header (v1 or v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// No header: the connection's address is the client's.
    #[default]
    Off,
    /// From a trusted network, a header is read if one comes (within the header timeout);
    /// other sources are served directly and must not send one.
    Optional,
    /// Every connection comes from a trusted network and starts with a header; any other
    /// is closed.
    Required,
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a network like 10.0.0.0/8 or ::1/128");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `proxy_protocol:`: who may send PROXY headers, and how long one may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Networks whose connections may carry a header (the load balancers).
    pub trusted: Vec<IpNet>,
    /// Longest wait for a header (and, in `optional` mode, for its first byte).
    pub timeout: Duration,
}

impl ProxyProtocol {
    /// Whether a connection from `ip` may carry a header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }
}

/// `state.redis:`: shared state for a fleet of proxies.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisState {
    /// `redis://` (or `rediss://`) URLs: one server, or the seed nodes of a cluster.
    pub urls: Vec<String>,
    /// The URLs are the nodes of a Redis Cluster.
    pub cluster: bool,
    /// Prefix of every key (and channel) cutover uses.
    pub key_prefix: String,
    /// Deadline of every call; past it the login path goes on with local state.
    pub timeout: Duration,
}

/// The URLs may carry a password: `Debug` shows only where they point.
impl fmt::Debug for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisState")
            .field("urls", &hosts)
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL without its user information (`redis://:secret@host:6379/0` shows as
/// `redis://***@host:6379/0`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => url.to_string(),
    }
}

/// A connection string without what may be secret: no user information, no query
/// string (`postgres://***@db:5432/mail`).
pub fn redact_dsn(url: &str) -> String {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    redact_url(base)
}

/// `lookups.NAME`: where routes read a user's pool (and maybe server) from.
#[derive(Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Name (metric label).
    pub name: String,
    /// The database.
    pub source: LookupSource,
    /// Deadline of one query, connecting included.
    pub timeout: Duration,
    /// Answer cache.
    pub cache: LookupCache,
    /// The database cannot answer and nothing usable is cached: `true` goes on with the
    /// next rule, `false` (default) fails the login temporarily.
    pub on_error_next: bool,
    /// A pinned server that is down fails the login temporarily instead of letting the
    /// pool's other servers serve.
    pub pinned_strict: bool,
}

/// The database behind a lookup.
#[derive(Clone, PartialEq, Eq)]
pub enum LookupSource {
    /// A parameterised PostgreSQL query.
    Postgres {
        /// Connection string (may carry a password: never printed).
        url: String,
        /// The query: `$1` user, `$2` protocol (optional).
        query: String,
        /// Connections kept open.
        connections: usize,
        /// CA file for TLS (None: the system's roots).
        ca_file: Option<PathBuf>,
    },
    /// A Redis key (a string: the pool; a hash: `pool` and `server` fields).
    Redis {
        /// `redis://` or `rediss://` URL (may carry a password: never printed).
        url: String,
        /// Key template with `{user}`.
        key: String,
        /// CA file for `rediss://` (None: the system's roots).
        ca_file: Option<PathBuf>,
    },
}

impl fmt::Debug for LookupSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupSource::Postgres {
                url,
                query,
                connections,
                ca_file,
            } => f
                .debug_struct("Postgres")
                .field("url", &redact_dsn(url))
                .field("query", query)
                .field("connections", connections)
                .field("ca_file", ca_file)
                .finish(),
            LookupSource::Redis { url, key, ca_file } => f
                .debug_struct("Redis")
                .field("url", &redact_dsn(url))
                .field("key", key)
                .field("ca_file", ca_file)
                .finish(),
        }
    }
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lookup")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("timeout", &self.timeout)
            .field("cache", &self.cache)
            .field("on_error_next", &self.on_error_next)
            .field("pinned_strict", &self.pinned_strict)
            .finish()
    }
}

/// `lookups.NAME.cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupCache {
    /// A found answer is used this long.
    pub ttl: Duration,
    /// "No row" is used this long.
    pub negative_ttl: Duration,
    /// Most answers kept.
    pub max_entries: usize,
    /// Past its TTL, an answer still serves this long while the database cannot answer.
    pub stale_for: Duration,
}

/// A client-facing listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Protocol spoken.
    pub protocol: Protocol,
    /// Address to bind.
    pub listen: SocketAddr,
    /// TLS mode.
    pub tls: ListenerTls,
    /// Authentication before TLS allowed.
    pub allow_plaintext_auth: bool,
    /// SMTP: the pop-before-smtp bridge window, if this listener is a bridge.
    pub bridge_window: Option<Duration>,
    /// Whether connections start with a PROXY protocol header from a load balancer.
    pub proxy_protocol: ProxyMode,
    /// The SASL mechanisms offered (IMAP and POP3 LOGIN/USER stay available as long as
    /// `login` is offered).
    pub sasl: crate::proto::Mechanisms,
}

/// How servers of a pool are ordered for one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The configured order: the first healthy server takes everyone.
    First,
    /// Start at a server chosen by a stable hash of the user; the rest are the failover order.
    UserHash,
}

/// The host part of a backend address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP literal: never sent to DNS.
    Ip(IpAddr),
    /// A DNS name, resolved with TTLs at connect time.
    Name(String),
}

/// One backend server address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host.
    pub host: Host,
    /// Port.
    pub port: u16,
    /// `host:port` as printed (`[v6]:port`), made once: it names the server in health
    /// state, routing decisions and metrics on every login.
    text: String,
}

impl ServerAddr {
    /// An address from its parts.
    pub fn new(host: Host, port: u16) -> Self {
        let text = match &host {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            Host::Ip(ip) => format!("{ip}:{port}"),
            Host::Name(n) => format!("{n}:{port}"),
        };
        ServerAddr { host, port, text }
    }

    /// `host:port`, as [`Display`](fmt::Display) prints it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ServerAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(ServerAddr::new(Host::Ip(sa.ip()), sa.port()));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid_name {
            return Err(format!("{s:?}: bad host name"));
        }
        Ok(ServerAddr::new(Host::Name(host.to_ascii_lowercase()), port))
    }
}

/// SMTP only: how the backend session is authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmtpAuth {
    /// Replay AUTH with the client's credentials.
    #[default]
    Forward,
    /// Verify the credentials with a POP3 login on the same host, then relay without AUTH.
    PopBeforeSmtp,
}

/// The servers of one protocol in a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolProtocol {
    /// Failover order.
    pub servers: Vec<ServerAddr>,
    /// TLS towards the servers.
    pub tls: BackendTls,
    /// CA file to verify them (absolute), else the system roots.
    pub ca: Option<PathBuf>,
    /// Name to verify in certificates, else each server's host.
    pub server_name: Option<String>,
    /// SMTP: how the backend session is authorised.
    pub auth: SmtpAuth,
}

/// Active and passive health checking of a pool's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Active probe interval; zero disables probing.
    pub interval: Duration,
    /// Consecutive probe successes to mark a server up.
    pub rise: u32,
    /// Consecutive failures (probes or logins) to mark a server down.
    pub fall: u32,
    /// How long a failed login attempt keeps a server out of rotation when no probe
    /// runs (passive health).
    pub down_for: Duration,
}

/// A pool of backend servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// Ordering policy.
    pub balance: Balance,
    /// TCP connect timeout per address.
    pub connect_timeout: Duration,
    /// Deadline for one backend login.
    pub login_timeout: Duration,
    /// Health settings.
    pub health: Health,
    /// Tell backends the client's address.
    pub forward_client_address: bool,
    /// Send each connection a PROXY protocol v2 header with the client's address (health
    /// probes send a `LOCAL` one).
    pub proxy_protocol: bool,
    /// Spread of client disconnects when a server with many sessions dies.
    pub disconnect_spread: Duration,
    /// How long past their TTL the last resolved addresses stay usable if DNS fails.
    pub dns_grace: Duration,
    /// Silence on a backend connection before TCP keepalive probes it (zero: no
    /// keepalive); see `backend::connect`.
    pub keepalive: Duration,
    /// Send backends the client's name as typed instead of the normalized one.
    pub login_original_name: bool,
    /// Counts as legacy in the stragglers report.
    pub legacy: bool,
    /// Servers per protocol.
    pub protocols: BTreeMap<Protocol, PoolProtocol>,
}

/// What a route matches; all given parts must match. None matches everyone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Matcher {
    /// Exact normalized user names (inline `users` and `users_file` together).
    pub users: Option<UserSet>,
    /// Domains (lowercase).
    pub domains: Option<HashSet<String>>,
    /// Share of users by stable bucket.
    pub percent: Option<u8>,
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Where it is written, e.g. `routes[2]` or `stages[0].routes[1]` (metric label).
    pub id: String,
    /// A short human description, e.g. `users [joeuser, alice] -> new`.
    pub text: String,
    /// What it matches.
    pub matcher: Matcher,
    /// Target pool (validated to exist); for a lookup rule, the pool any row found means
    /// (None: the pool the row names).
    pub pool: Option<String>,
    /// The lookup (`lookups:`) that decides whether the rule matches, and where to.
    pub lookup: Option<String>,
    /// Pool tried when every server of `pool` is unavailable.
    pub fallback: Option<String>,
    /// Also fall back when `pool` rejects the credentials.
    pub fallback_on_auth_failure: bool,
    /// The cohort file the users came from, if any (watched for changes).
    pub users_file: Option<PathBuf>,
}

/// A scheduled stage: from `from` on, its routes replace the ones before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Name.
    pub name: String,
    /// Start, Unix seconds.
    pub from: i64,
    /// Routes.
    pub routes: Vec<Route>,
}

/// What happens to the open sessions of a user whose pool changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnMove {
    /// End them (after `grace`) so the client reconnects to the new pool.
    pub kick: bool,
    /// Delay before ending them.
    pub grace: Duration,
}

/// The admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Address.
    pub listen: SocketAddr,
    /// Bearer token required on every request, when set.
    pub token: Option<String>,
    /// Longest wait of a held login.
    pub hold_max_wait: Duration,
    /// Where the token came from (watched for changes).
    pub token_file: Option<PathBuf>,
}

/// How user names are normalized before routing and backend login.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Users {
    /// Lowercase domains stripped from `user@domain`.
    pub local_domains: Vec<String>,
    /// Lowercase names.
    pub case_insensitive: bool,
}

/// Timeouts applied by the session drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Idle time before login.
    pub preauth: Duration,
    /// From accept (or STARTTLS) to a finished TLS handshake, waiting for a handshake
    /// slot included.
    pub tls_handshake: Duration,
    /// Grace for relayed sessions at shutdown.
    pub drain: Duration,
}

/// Connection limits, enforced at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// All client connections together.
    pub max_connections: usize,
    /// From one client address.
    pub max_per_ip: usize,
    /// Client TLS handshakes in progress at once on one worker; more wait for a slot.
    /// Bounds the handshake work a worker does between two turns of its logged-in
    /// sessions, and what a flood of half-open handshakes can take.
    pub tls_handshakes_per_worker: usize,
}

/// Failed-login throttling against password spraying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Failures from one address within `window` before it is blocked (0: off).
    pub ip_failures: u32,
    /// Failures for one user within `window` before it is blocked (0: off).
    pub user_failures: u32,
    /// Counting window.
    pub window: Duration,
    /// How long a block lasts.
    pub block: Duration,
    /// Delay before answering the first failure; doubles per further failure.
    pub delay: Duration,
    /// Longest delay.
    pub max_delay: Duration,
}

/// A certificate chain and key file pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM chain.
    pub cert: PathBuf,
    /// PEM key.
    pub key: PathBuf,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from (for reloads and messages).
    pub source: PathBuf,
    /// Host name in greetings.
    pub hostname: String,
    /// Server certificates; first is the default.
    pub certificates: Vec<CertFiles>,
    /// Listeners.
    pub listeners: Vec<Listener>,
    /// Pools by name.
    pub pools: BTreeMap<String, Pool>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// Metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// User name normalization.
    pub users: Users,
    /// Protocol limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Connection limits.
    pub conn_limits: ConnLimits,
    /// Failed-login throttling.
    pub throttle: Throttle,
    /// Name servers for backend host names (empty: the system's).
    pub dns_servers: Vec<SocketAddr>,
    /// Scheduled stages, in start order.
    pub stages: Vec<Stage>,
    /// Moving users.
    pub on_move: OnMove,
    /// Admin endpoint.
    pub admin: Option<Admin>,
    /// Most users the stragglers tracker remembers.
    pub stragglers_max_users: usize,
    /// Session worker threads (0: one per CPU). Read at start only.
    pub workers: usize,
    /// This proxy's name in a fleet (logs, admin API, metric labels).
    pub instance_name: String,
    /// PROXY protocol on client listeners.
    pub proxy_protocol: ProxyProtocol,
    /// Shared state in Redis (None: in this process only).
    pub redis: Option<RedisState>,
    /// Named route lookups.
    pub lookups: BTreeMap<String, Lookup>,
    /// OAuth token verification (None: tokens go to the backends unverified).
    pub oauth: Option<crate::oauth::OAuthSettings>,
    /// The Unix socket of the upgrade hand-over (None: no zero-downtime upgrade).
    pub upgrade_socket: Option<PathBuf>,
}

impl Config {
    /// The stage in force at `now` (Unix seconds): its name (None before the first stage)
    /// and routes.
    pub fn routes_at(&self, now: i64) -> (Option<&str>, &[Route]) {
        match self.stages.iter().rev().find(|s| s.from <= now) {
            Some(stage) => (Some(stage.name.as_str()), &stage.routes),
            None => (None, &self.routes),
        }
    }

    /// Every file this configuration was built from: the file itself, certificates, keys,
    /// CA bundles, cohort files and the admin token. A change to any of them triggers a
    /// reload.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.source.clone()];
        for c in &self.certificates {
            out.push(c.cert.clone());
            out.push(c.key.clone());
        }
        for pool in self.pools.values() {
            out.extend(pool.protocols.values().filter_map(|pp| pp.ca.clone()));
        }
        let stage_routes = self.stages.iter().flat_map(|s| s.routes.iter());
        out.extend(
            self.routes
                .iter()
                .chain(stage_routes)
                .filter_map(|r| r.users_file.clone()),
        );
        out.extend(self.admin.as_ref().and_then(|a| a.token_file.clone()));
        out.sort();
        out.dedup();
        out
    }

    /// The next stage start after `now`, if any.
    pub fn next_stage_after(&self, now: i64) -> Option<&Stage> {
        self.stages.iter().find(|s| s.from > now)
    }
}

/// Parses durations such as `500ms`, `1s`, `2m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?} is not a duration like 500ms, 10s, 5m, 1h"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(d);
    }
    Ok(total)
}

impl Config {
    /// Reads and validates a configuration file. Relative paths inside it are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::from_text(&text, path, &base)
    }

    /// Validates configuration text; `file` is used in messages, `base` resolves relative
    /// paths.
    pub fn from_text(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
        validate::config(text, file, base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text, Path::new("routes.yaml"), Path::new("."))
    }

    const GOOD: &str = "
listeners:
  - { name: imap, protocol: imap, listen: \"127.0.0.1:11143\" }
pools:
  new:
    imap: { servers: [\"127.0.0.10:143\"] }
  legacy:
    balance: first
    connect_timeout: 1s
    imap: { servers: [\"127.0.0.11:143\", \"green.example:143\"] }
routes:
  - { users: [joeuser, alice], pool: new }
  - { domains: [newdomain.test], pool: new }
  - { percent: 30, pool: new }
  - { pool: legacy }
metrics:
  listen: \"127.0.0.1:19898\"
";

    #[test]
    fn good_config_loads() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.pools["legacy"].connect_timeout, Duration::from_secs(1));
        assert_eq!(c.pools["legacy"].keepalive, Duration::from_secs(60));
        let off = load(&GOOD.replace(
            "connect_timeout: 1s",
            "connect_timeout: 1s\n    keepalive: 0s",
        ))
        .unwrap();
        assert_eq!(off.pools["legacy"].keepalive, Duration::ZERO);
        assert_eq!(
            c.pools["legacy"].protocols[&Protocol::Imap].servers[1].host,
            Host::Name("green.example".into())
        );
        assert_eq!(c.routes[2].matcher.percent, Some(30));
        assert_eq!(c.routes[0].text, "routes[0]: users [joeuser, alice] -> new");
    }

    fn invalid(text: &str) -> (String, usize, String) {
        match load(text) {
            Err(ConfigError::Invalid {
                key, line, message, ..
            }) => (key, line, message),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn unknown_pool_names_key_and_line() {
        let text = GOOD.replace("{ pool: legacy }", "{ pool: legcy }");
        let (key, line, msg) = invalid(&text);
        assert_eq!(key, "routes[3].pool");
        assert_eq!(line, 15);
        assert!(msg.contains("legcy"));
    }

    #[test]
    fn bad_values_are_reported() {
        let (key, line, _) =
            invalid(&GOOD.replace("connect_timeout: 1s", "connect_timeout: 1 sec"));
        assert_eq!((key.as_str(), line), ("pools.legacy.connect_timeout", 9));
        let (key, _, _) = invalid(&GOOD.replace("percent: 30", "percent: 130"));
        assert_eq!(key, "routes[2].percent");
        let (key, line, _) = invalid(&GOOD.replace("protocol: imap", "protocol: nntp"));
        assert_eq!((key.as_str(), line), ("listeners[0].protocol", 3));
        let (key, _, msg) = invalid(&GOOD.replace("11143\" }", "11143\", tls: implicit }"));
        assert_eq!(key, "listeners[0].tls");
        assert!(msg.contains("certificates"));
        let (key, line, _) = invalid(&GOOD.replace("balance: first", "balanse: first"));
        assert_eq!((key.as_str(), line), ("pools.legacy.balanse", 8));
        let (key, _, msg) = invalid(&GOOD.replace("\"127.0.0.10:143\"", "\"127.0.0.10\""));
        assert_eq!(key, "pools.new.imap.servers[0]");
        assert!(msg.contains("host:port"), "{msg}");
    }

    #[test]
    fn listener_protocol_must_be_served_by_routed_pools() {
        let text = GOOD.replace(
            "  - { name: imap, protocol: imap, listen: \"127.0.0.1:11143\" }",
            "  - { name: imap, protocol: imap, listen: \"127.0.0.1:11143\" }\n  - { name: pop3, protocol: pop3, listen: \"127.0.0.1:11110\" }",
        );
        let (key, _, msg) = invalid(&text);
        assert_eq!(key, "routes[0].pool");
        assert!(msg.contains("pop3"), "{msg}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5 s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn server_addresses() {
        let a: ServerAddr = "[::1]:143".parse().unwrap();
        assert_eq!(a.to_string(), "[::1]:143");
        assert!("host".parse::<ServerAddr>().is_err());
        assert!("bad host:143".parse::<ServerAddr>().is_err());
        assert!("h:0".parse::<ServerAddr>().is_err());
    }
}

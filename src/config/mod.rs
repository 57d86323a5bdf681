//! The validated configuration: what every other module sees.
//!
//! [`Config::load`] reads `routes.yaml`, parses it through [`file`] and checks everything
//! that can be checked without the network: addresses, durations, enums, that every
//! route names a pool that serves every protocol a listener offers, that files exist.
//! Errors name the key path and the line ([`ConfigError`]).

pub mod file;
mod names;
pub mod rfc3339;
pub mod userset;

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
    /// Spread of client disconnects when a server with many sessions dies.
    pub disconnect_spread: Duration,
    /// How long past their TTL the last resolved addresses stay usable if DNS fails.
    pub dns_grace: Duration,
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
    /// Target pool (validated to exist).
    pub pool: String,
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

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let key = key.into();
        let (line, col) = file::locate(self.text, &key).unwrap_or((0, 0));
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key,
            line,
            col,
            message: message.into(),
        }
    }
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
        let cx = Ctx { file, text };
        let raw = file::parse(text).map_err(|(key, line, col, message)| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: if key.is_empty() || key == "." {
                "(document)".into()
            } else {
                key
            },
            line,
            col,
            message,
        })?;
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let must_exist = |key: String, p: &Path| -> Result<(), ConfigError> {
            if p.is_file() {
                Ok(())
            } else {
                Err(cx.err(key, format!("file {} does not exist", p.display())))
            }
        };

        let hostname = raw
            .hostname
            .clone()
            .unwrap_or_else(|| "cutover".to_string());
        if hostname.is_empty() || !hostname.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(cx.err("hostname", "must be a non-empty name without spaces"));
        }

        let mut certificates = Vec::new();
        if let Some(tls) = &raw.tls {
            for (i, c) in tls.certificates.iter().enumerate() {
                let cert = resolve(&c.cert);
                let key = resolve(&c.key);
                must_exist(format!("tls.certificates[{i}].cert"), &cert)?;
                must_exist(format!("tls.certificates[{i}].key"), &key)?;
                certificates.push(CertFiles { cert, key });
            }
        }

        // Listeners.
        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let k = |f: &str| format!("listeners[{i}].{f}");
            if l.name.is_empty() || !names.insert(l.name.clone()) {
                return Err(cx.err(
                    k("name"),
                    format!("listener name {:?} is empty or used twice", l.name),
                ));
            }
            let protocol: Protocol = l.protocol.parse().map_err(|e| cx.err(k("protocol"), e))?;
            let listen: SocketAddr = l
                .listen
                .parse()
                .map_err(|_| cx.err(k("listen"), format!("{:?} is not ip:port", l.listen)))?;
            if listen.port() != 0 && !addrs.insert(listen) {
                return Err(cx.err(k("listen"), format!("{listen} is used by two listeners")));
            }
            let tls = match l.tls.as_deref().unwrap_or("none") {
                "none" => ListenerTls::None,
                "starttls" => ListenerTls::StartTls,
                "implicit" => ListenerTls::Implicit,
                other => {
                    return Err(cx.err(
                        k("tls"),
                        format!("{other:?}: expected none, starttls or implicit"),
                    ))
                }
            };
            if tls != ListenerTls::None && certificates.is_empty() {
                return Err(cx.err(k("tls"), "TLS needs at least one entry in tls.certificates"));
            }
            let bridge_window = match l.relay.as_deref() {
                None => {
                    if l.window.is_some() {
                        return Err(cx.err(
                            k("window"),
                            "window only applies with relay: pop-before-smtp",
                        ));
                    }
                    None
                }
                Some("pop-before-smtp") if protocol == Protocol::Smtp => Some(match &l.window {
                    Some(w) => parse_duration(w).map_err(|e| cx.err(k("window"), e))?,
                    None => Duration::from_secs(600),
                }),
                Some(other) => {
                    return Err(cx.err(
                        k("relay"),
                        format!("{other:?}: only pop-before-smtp, on smtp listeners"),
                    ))
                }
            };
            listeners.push(Listener {
                name: l.name.clone(),
                protocol,
                listen,
                tls,
                allow_plaintext_auth: l.allow_plaintext_auth,
                bridge_window,
            });
        }

        // Pools.
        let mut pools = BTreeMap::new();
        for (name, p) in &raw.pools {
            let k = |f: &str| format!("pools.{name}.{f}");
            let balance = match p.balance.as_deref().unwrap_or("first") {
                "first" => Balance::First,
                "user-hash" => Balance::UserHash,
                other => {
                    return Err(cx.err(
                        k("balance"),
                        format!("{other:?}: expected first or user-hash"),
                    ))
                }
            };
            let dur =
                |f: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                    match v {
                        Some(s) => parse_duration(s).map_err(|e| cx.err(k(f), e)),
                        None => Ok(default),
                    }
                };
            let connect_timeout = dur(
                "connect_timeout",
                &p.connect_timeout,
                Duration::from_secs(3),
            )?;
            if connect_timeout.is_zero() {
                return Err(cx.err(k("connect_timeout"), "must be more than 0"));
            }
            let login_timeout = dur("login_timeout", &p.login_timeout, Duration::from_secs(15))?;
            if login_timeout < connect_timeout {
                return Err(cx.err(k("login_timeout"), "must be at least connect_timeout"));
            }
            let rh = p.health.as_ref();
            let hk = |f: &str| format!("pools.{name}.health.{f}");
            let health = Health {
                interval: match rh.and_then(|h| h.interval.as_ref()) {
                    Some(s) => parse_duration(s).map_err(|e| cx.err(hk("interval"), e))?,
                    None => Duration::from_secs(5),
                },
                rise: rh.and_then(|h| h.rise).unwrap_or(2),
                fall: rh.and_then(|h| h.fall).unwrap_or(1),
                down_for: match rh.and_then(|h| h.down_for.as_ref()) {
                    Some(s) => parse_duration(s).map_err(|e| cx.err(hk("down_for"), e))?,
                    None => Duration::from_secs(30),
                },
            };
            if health.rise == 0 || health.fall == 0 {
                return Err(cx.err(hk("rise"), "rise and fall must be at least 1"));
            }
            let mut protocols = BTreeMap::new();
            for (proto, pp) in [
                (Protocol::Imap, &p.imap),
                (Protocol::Pop3, &p.pop3),
                (Protocol::Smtp, &p.smtp),
            ] {
                let Some(pp) = pp else { continue };
                let pk = |f: &str| format!("pools.{name}.{proto}.{f}");
                if pp.servers.is_empty() {
                    return Err(cx.err(pk("servers"), "needs at least one server"));
                }
                let mut servers = Vec::new();
                for (j, s) in pp.servers.iter().enumerate() {
                    let sa: ServerAddr = s
                        .parse()
                        .map_err(|e| cx.err(format!("pools.{name}.{proto}.servers[{j}]"), e))?;
                    servers.push(sa);
                }
                let tls = match pp.tls.as_deref().unwrap_or("none") {
                    "none" => BackendTls::None,
                    "starttls" => BackendTls::StartTls,
                    "implicit" => BackendTls::Implicit,
                    other => {
                        return Err(cx.err(
                            pk("tls"),
                            format!("{other:?}: expected none, starttls or implicit"),
                        ))
                    }
                };
                let ca = match &pp.ca {
                    Some(c) => {
                        let path = resolve(c);
                        must_exist(pk("ca"), &path)?;
                        Some(path)
                    }
                    None => None,
                };
                let auth = match pp.auth.as_deref() {
                    None | Some("forward") => SmtpAuth::Forward,
                    Some("pop-before-smtp") if proto == Protocol::Smtp => SmtpAuth::PopBeforeSmtp,
                    Some(other) => {
                        return Err(cx.err(
                            pk("auth"),
                            format!("{other:?}: expected forward or pop-before-smtp (smtp only)"),
                        ))
                    }
                };
                protocols.insert(
                    proto,
                    PoolProtocol {
                        servers,
                        tls,
                        ca,
                        server_name: pp.server_name.clone(),
                        auth,
                    },
                );
            }
            if let Some(smtp) = protocols.get(&Protocol::Smtp) {
                if smtp.auth == SmtpAuth::PopBeforeSmtp {
                    match protocols.get(&Protocol::Pop3) {
                        Some(pop) if pop.servers.len() == smtp.servers.len() => {}
                        _ => {
                            return Err(cx.err(
                                format!("pools.{name}.smtp.auth"),
                                "pop-before-smtp needs a pop3 entry with one server per smtp server (same hosts, same order)",
                            ))
                        }
                    }
                }
            }
            if protocols.is_empty() {
                return Err(cx.err(
                    format!("pools.{name}"),
                    "pool has no imap, pop3 or smtp servers",
                ));
            }
            let login_original_name = match p.login_name.as_deref() {
                None | Some("normalized") => false,
                Some("original") => true,
                Some(other) => {
                    return Err(cx.err(
                        k("login_name"),
                        format!("{other:?}: expected normalized or original"),
                    ))
                }
            };
            pools.insert(
                name.clone(),
                Pool {
                    name: name.clone(),
                    balance,
                    connect_timeout,
                    login_timeout,
                    health,
                    forward_client_address: p.forward_client_address,
                    disconnect_spread: dur(
                        "disconnect_spread",
                        &p.disconnect_spread,
                        Duration::from_secs(10),
                    )?,
                    dns_grace: dur("dns_grace", &p.dns_grace, Duration::from_secs(3600))?,
                    login_original_name,
                    legacy: p.legacy.unwrap_or(name == "legacy"),
                    protocols,
                },
            );
        }

        // Users.
        let users = match &raw.users {
            Some(u) => Users {
                local_domains: u
                    .local_domains
                    .iter()
                    .map(|d| d.to_ascii_lowercase())
                    .collect(),
                case_insensitive: u.case_insensitive,
            },
            None => Users::default(),
        };

        // Routes, and the routes of each stage.
        let routes = build_routes(&cx, &raw.routes, "routes", &pools, &users, &resolve)?;
        let mut stages: Vec<Stage> = Vec::new();
        for (i, st) in raw.stages.iter().enumerate() {
            let k = |f: &str| format!("stages[{i}].{f}");
            let from = rfc3339::parse(&st.from).map_err(|e| cx.err(k("from"), e))?;
            if st.name.is_empty() || stages.iter().any(|s| s.name == st.name) {
                return Err(cx.err(
                    k("name"),
                    format!("stage name {:?} is empty or used twice", st.name),
                ));
            }
            if let Some(prev) = stages.last() {
                if prev.from >= from {
                    return Err(cx.err(
                        k("from"),
                        format!(
                            "starts no later than stage {:?}: list stages in time order",
                            prev.name
                        ),
                    ));
                }
            }
            let routes = build_routes(
                &cx,
                &st.routes,
                &format!("stages[{i}].routes"),
                &pools,
                &users,
                &resolve,
            )?;
            stages.push(Stage {
                name: st.name.clone(),
                from,
                routes,
            });
        }

        // Every listener's protocol must be served by every pool a route can pick.
        let all_routes = std::iter::once(("routes".to_string(), &routes)).chain(
            stages
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("stages[{i}].routes"), &s.routes)),
        );
        for (prefix, list) in all_routes {
            for (ri, r) in list.iter().enumerate() {
                let targets = std::iter::once(("pool", &r.pool))
                    .chain(r.fallback.iter().map(|f| ("fallback", f)));
                for (field, pool) in targets {
                    for (li, l) in listeners.iter().enumerate() {
                        if !pools[pool].protocols.contains_key(&l.protocol) {
                            return Err(cx.err(
                                format!("{prefix}[{ri}].{field}"),
                                format!(
                                    "pool {pool:?} has no {} servers, but listener {:?} (listeners[{li}]) speaks {}",
                                    l.protocol, l.name, l.protocol
                                ),
                            ));
                        }
                    }
                }
            }
        }

        let on_move = match &raw.on_move {
            Some(m) => OnMove {
                kick: match m.action.as_deref().unwrap_or("kick") {
                    "kick" => true,
                    "keep" => false,
                    other => {
                        return Err(cx.err(
                            "on_move.action",
                            format!("{other:?}: expected kick or keep"),
                        ))
                    }
                },
                grace: match &m.grace {
                    Some(g) => parse_duration(g).map_err(|e| cx.err("on_move.grace", e))?,
                    None => Duration::from_secs(5),
                },
            },
            None => OnMove {
                kick: true,
                grace: Duration::from_secs(5),
            },
        };

        let admin = match &raw.admin {
            Some(a) => {
                let listen: SocketAddr = a.listen.parse().map_err(|_| {
                    cx.err("admin.listen", format!("{:?} is not ip:port", a.listen))
                })?;
                let token = match &a.token_file {
                    Some(f) => {
                        let path = resolve(f);
                        let t = std::fs::read_to_string(&path).map_err(|e| {
                            cx.err("admin.token_file", format!("{}: {e}", path.display()))
                        })?;
                        let t = t.trim().to_string();
                        if t.len() < 16 {
                            return Err(cx.err(
                                "admin.token_file",
                                "the token must be at least 16 characters",
                            ));
                        }
                        Some(t)
                    }
                    None => None,
                };
                if token.is_none() && !listen.ip().is_loopback() {
                    return Err(cx.err(
                        "admin.token_file",
                        "required when admin.listen is not a loopback address",
                    ));
                }
                let hold_max_wait = match &a.hold_max_wait {
                    Some(w) => parse_duration(w).map_err(|e| cx.err("admin.hold_max_wait", e))?,
                    None => Duration::from_secs(120),
                };
                Some(Admin {
                    listen,
                    token,
                    hold_max_wait,
                    token_file: a.token_file.as_deref().map(&resolve),
                })
            }
            None => None,
        };
        let mut throttle = Throttle {
            ip_failures: 20,
            user_failures: 10,
            window: Duration::from_secs(600),
            block: Duration::from_secs(900),
            delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
        };
        if let Some(t) = &raw.auth_throttle {
            let d = |f: &str, v: &Option<String>, cur: Duration| -> Result<Duration, ConfigError> {
                match v {
                    Some(s) => {
                        parse_duration(s).map_err(|e| cx.err(format!("auth_throttle.{f}"), e))
                    }
                    None => Ok(cur),
                }
            };
            throttle.ip_failures = t.ip_failures.unwrap_or(throttle.ip_failures);
            throttle.user_failures = t.user_failures.unwrap_or(throttle.user_failures);
            throttle.window = d("window", &t.window, throttle.window)?;
            throttle.block = d("block", &t.block, throttle.block)?;
            throttle.delay = d("delay", &t.delay, throttle.delay)?;
            throttle.max_delay = d("max_delay", &t.max_delay, throttle.max_delay)?;
        }
        let mut dns_servers = Vec::new();
        if let Some(d) = &raw.dns {
            for (i, srv) in d.servers.iter().enumerate() {
                dns_servers.push(srv.parse::<SocketAddr>().map_err(|_| {
                    cx.err(
                        format!("dns.servers[{i}]"),
                        format!("{srv:?} is not ip:port"),
                    )
                })?);
            }
        }
        let workers = raw.workers.unwrap_or(0);
        if workers > 1024 {
            return Err(cx.err("workers", format!("{workers} is more than 1024")));
        }
        let stragglers_max_users = raw
            .stragglers
            .as_ref()
            .and_then(|s| s.max_users)
            .unwrap_or(1_000_000);

        let metrics =
            match &raw.metrics {
                Some(m) => Some(m.listen.parse().map_err(|_| {
                    cx.err("metrics.listen", format!("{:?} is not ip:port", m.listen))
                })?),
                None => None,
            };

        let mut limits = Limits::default();
        let mut conn_limits = ConnLimits {
            max_connections: 20_000,
            max_per_ip: 1000,
        };
        let mut timeouts = Timeouts {
            preauth: Duration::from_secs(60),
            drain: Duration::from_secs(30),
        };
        if let Some(l) = &raw.limits {
            if let Some(v) = l.max_line {
                if !(512..=1 << 20).contains(&v) {
                    return Err(cx.err("limits.max_line", "must be between 512 and 1048576"));
                }
                limits.max_line = v;
            }
            if let Some(v) = l.max_literal {
                if !(256..=1 << 20).contains(&v) {
                    return Err(cx.err("limits.max_literal", "must be between 256 and 1048576"));
                }
                limits.max_literal = v;
            }
            if let Some(v) = l.max_auth_failures {
                limits.max_auth_failures = v.max(1);
            }
            if let Some(v) = l.max_commands {
                limits.max_commands = v.max(1);
            }
            if let Some(v) = l.max_connections {
                conn_limits.max_connections = v.max(1);
            }
            if let Some(v) = l.max_connections_per_ip {
                conn_limits.max_per_ip = v.max(1);
            }
            if let Some(v) = &l.preauth_timeout {
                timeouts.preauth =
                    parse_duration(v).map_err(|e| cx.err("limits.preauth_timeout", e))?;
            }
        }
        if let Some(s) = &raw.shutdown {
            if let Some(v) = &s.drain_timeout {
                timeouts.drain =
                    parse_duration(v).map_err(|e| cx.err("shutdown.drain_timeout", e))?;
            }
        }

        Ok(Config {
            source: file.to_path_buf(),
            hostname,
            certificates,
            listeners,
            pools,
            routes,
            metrics,
            users,
            limits,
            timeouts,
            conn_limits,
            throttle,
            dns_servers,
            stages,
            on_move,
            admin,
            stragglers_max_users,
            workers,
        })
    }
}

fn build_routes(
    cx: &Ctx<'_>,
    raw: &[file::RawRoute],
    prefix: &str,
    pools: &BTreeMap<String, Pool>,
    users: &Users,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let k = |f: &str| format!("{prefix}[{i}].{f}");
        if !pools.contains_key(&r.pool) {
            return Err(cx.err(k("pool"), format!("no pool named {:?}", r.pool)));
        }
        if let Some(f) = &r.fallback {
            if !pools.contains_key(f) {
                return Err(cx.err(k("fallback"), format!("no pool named {f:?}")));
            }
            if *f == r.pool {
                return Err(cx.err(k("fallback"), "the fallback must be another pool"));
            }
        } else if r.fallback_on_auth_failure {
            return Err(cx.err(k("fallback_on_auth_failure"), "needs a fallback pool"));
        }
        let norm = |u: &str| normalize(users, u);
        let user_set = if r.users.is_none() && r.users_file.is_none() {
            None
        } else {
            let mut set = UserSet::default();
            for u in r.users.iter().flatten() {
                set.push(&norm(u)).map_err(|e| cx.err(k("users"), e))?;
            }
            if let Some(f) = &r.users_file {
                let path = resolve(f);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| cx.err(k("users_file"), format!("{}: {e}", path.display())))?;
                set.add_lines(&text, norm).map_err(|(line, e)| {
                    cx.err(k("users_file"), format!("{}:{line}: {e}", path.display()))
                })?;
            }
            Some(set.finish())
        };
        let matcher = Matcher {
            users: user_set,
            domains: r
                .domains
                .as_ref()
                .map(|v| v.iter().map(|d| d.to_ascii_lowercase()).collect()),
            percent: match r.percent {
                Some(p) if p <= 100 => Some(p as u8),
                Some(p) => {
                    return Err(cx.err(k("percent"), format!("{p} is not between 0 and 100")))
                }
                None => None,
            },
        };
        let mut parts = Vec::new();
        if let Some(u) = &r.users {
            parts.push(format!("users [{}]", u.join(", ")));
        }
        if let Some(f) = &r.users_file {
            let n = matcher.users.as_ref().map(UserSet::len).unwrap_or(0);
            parts.push(format!("users_file {f} ({n} users)"));
        }
        if let Some(d) = &r.domains {
            parts.push(format!("domains [{}]", d.join(", ")));
        }
        if let Some(p) = r.percent {
            parts.push(format!("percent {p}"));
        }
        if parts.is_empty() {
            parts.push("default".into());
        }
        let mut text = format!("{prefix}[{i}]: {} -> {}", parts.join(" and "), r.pool);
        if let Some(f) = &r.fallback {
            text.push_str(&format!(
                " (fallback {f}{})",
                if r.fallback_on_auth_failure {
                    ", also on auth failure"
                } else {
                    ""
                }
            ));
        }
        routes.push(Route {
            id: format!("{prefix}[{i}]"),
            text,
            matcher,
            pool: r.pool.clone(),
            fallback: r.fallback.clone(),
            fallback_on_auth_failure: r.fallback_on_auth_failure,
            users_file: r.users_file.as_deref().map(resolve),
        });
    }
    Ok(routes)
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

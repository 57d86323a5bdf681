//! From the parsed file ([`super::file`]) to a [`Config`]: one function per section, each
//! checking everything that can be checked without the network and naming the key path
//! (and so the line) of the first problem.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{self, RawConfig, RawListener, RawLookup, RawPool, RawPoolProtocol, RawRoute};
use super::{
    normalize, parse_duration, rfc3339, Admin, Balance, CertFiles, Config, ConfigError, ConnLimits,
    Health, IpNet, Listener, Lookup, LookupCache, LookupSource, Matcher, OnMove, Pool,
    PoolProtocol, Protocol, ProxyMode, ProxyProtocol, RedisState, Route, ServerAddr, SmtpAuth,
    Stage, Throttle, Timeouts, UserSet, Users,
};
use crate::proto::{BackendTls, Limits, ListenerTls};

/// What every section needs: where errors point, and where relative paths resolve.
struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    base: &'a Path,
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

    /// A path from the file, relative to the file's directory.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// A path from the file that must name an existing file.
    fn existing(&self, key: String, p: &str) -> Result<PathBuf, ConfigError> {
        let path = self.resolve(p);
        if path.is_file() {
            Ok(path)
        } else {
            Err(self.err(key, format!("file {} does not exist", path.display())))
        }
    }

    /// An optional duration at `key`, or `default`.
    fn duration(
        &self,
        key: impl Into<String>,
        value: &Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            Some(s) => parse_duration(s).map_err(|e| self.err(key, e)),
            None => Ok(default),
        }
    }

    /// An `ip:port` at `key`.
    fn socket_addr(&self, key: impl Into<String>, value: &str) -> Result<SocketAddr, ConfigError> {
        value
            .parse()
            .map_err(|_| self.err(key, format!("{value:?} is not ip:port")))
    }
}

/// Validates configuration text; `file` is used in messages, `base` resolves relative
/// paths.
pub(super) fn config(text: &str, file: &Path, base: &Path) -> Result<Config, ConfigError> {
    let cx = Ctx { file, text, base };
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
    let certificates = certificates(&cx, &raw)?;
    let listeners = listeners(&cx, &raw, !certificates.is_empty())?;
    let listeners_using_proxy: Vec<usize> = (listeners.iter().enumerate())
        .filter(|(_, l)| l.proxy_protocol != ProxyMode::Off)
        .map(|(i, _)| i)
        .collect();
    let pools = pools(&cx, &raw)?;
    let users = users(&raw);
    let lookups = lookups(&cx, &raw)?;
    let targets = Targets {
        pools: &pools,
        users: &users,
        lookups: &lookups,
    };
    let routes = routes(&cx, &raw.routes, "routes", &targets)?;
    let stages = stages(&cx, &raw, &targets)?;
    every_listener_served(&cx, &listeners, &routes, &stages, &pools)?;
    let (limits, conn_limits, timeouts) = limits(&cx, &raw)?;
    Ok(Config {
        source: file.to_path_buf(),
        hostname: hostname(&cx, &raw)?,
        certificates,
        listeners,
        pools,
        routes,
        metrics: match &raw.metrics {
            Some(m) => Some(cx.socket_addr("metrics.listen", &m.listen)?),
            None => None,
        },
        users,
        limits,
        timeouts,
        conn_limits,
        throttle: throttle(&cx, &raw)?,
        dns_servers: dns_servers(&cx, &raw)?,
        stages,
        on_move: on_move(&cx, &raw)?,
        admin: admin(&cx, &raw)?,
        stragglers_max_users: raw
            .stragglers
            .as_ref()
            .and_then(|s| s.max_users)
            .unwrap_or(1_000_000),
        workers: workers(&cx, &raw)?,
        proxy_protocol: proxy_protocol(&cx, &raw, &listeners_using_proxy)?,
        instance_name: instance_name(&cx, &raw)?,
        redis: redis(&cx, &raw)?,
        lookups,
        oauth: oauth(&cx, &raw)?,
        upgrade_socket: raw.upgrade.as_ref().map(|u| cx.resolve(&u.socket)),
    })
}

/// `oauth:`: where the keys come from (exactly one of a file or a URL), and the checks.
fn oauth(
    cx: &Ctx<'_>,
    raw: &RawConfig,
) -> Result<Option<crate::oauth::OAuthSettings>, ConfigError> {
    use crate::oauth::{JwksSource, OAuthSettings, DEFAULT_LEEWAY, DEFAULT_REFRESH};
    let Some(o) = &raw.oauth else {
        return Ok(None);
    };
    let jwks = match (&o.jwks_file, &o.jwks_url) {
        (Some(f), None) => JwksSource::File(cx.existing("oauth.jwks_file".into(), f)?),
        (None, Some(u)) => {
            crate::oauth::check_url(u).map_err(|e| cx.err("oauth.jwks_url", e))?;
            JwksSource::Url(u.clone())
        }
        _ => return Err(cx.err("oauth", "give exactly one of jwks_file or jwks_url")),
    };
    let claim = o.claim.clone().unwrap_or_else(|| "email".into());
    if claim.is_empty() {
        return Err(cx.err("oauth.claim", "name the claim that holds the user name"));
    }
    let mut settings = OAuthSettings::new(jwks, claim);
    settings.issuer = o.issuer.clone();
    settings.audience = o.audience.clone();
    settings.leeway = cx.duration("oauth.leeway", &o.leeway, DEFAULT_LEEWAY)?;
    settings.require_exp = o.require_exp.unwrap_or(true);
    settings.refresh = cx.duration("oauth.refresh", &o.refresh, DEFAULT_REFRESH)?;
    if settings.refresh < Duration::from_secs(10) {
        return Err(cx.err("oauth.refresh", "at least 10s"));
    }
    Ok(Some(settings))
}

/// What routes may name: pools and lookups, and how user names are normalized.
struct Targets<'a> {
    pools: &'a BTreeMap<String, Pool>,
    users: &'a Users,
    lookups: &'a BTreeMap<String, Lookup>,
}

/// `lookups:`: each names exactly one database.
fn lookups(cx: &Ctx<'_>, raw: &RawConfig) -> Result<BTreeMap<String, Lookup>, ConfigError> {
    raw.lookups
        .iter()
        .map(|(name, l)| Ok((name.clone(), lookup(cx, name, l)?)))
        .collect()
}

/// A URL given inline or in a file (which may carry a password), at `key`.
fn url_or_file(
    cx: &Ctx<'_>,
    key: &str,
    url: &Option<String>,
    url_file: &Option<String>,
) -> Result<String, ConfigError> {
    match (url, url_file) {
        (Some(u), None) => Ok(u.clone()),
        (None, Some(f)) => {
            let k = format!("{key}.url_file");
            let path = cx.existing(k.clone(), f)?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| cx.err(k, format!("{}: {e}", path.display())))?;
            Ok(text.trim().to_string())
        }
        _ => Err(cx.err(key, "give exactly one of url or url_file")),
    }
}

fn lookup(cx: &Ctx<'_>, name: &str, l: &RawLookup) -> Result<Lookup, ConfigError> {
    let k = |f: &str| format!("lookups.{name}.{f}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        return Err(cx.err(
            format!("lookups.{name}"),
            "a lookup name is letters, digits, - and _",
        ));
    }
    let source = lookup_source(cx, name, l)?;
    let timeout = cx.duration(k("timeout"), &l.timeout, Duration::from_millis(300))?;
    if timeout.is_zero() {
        return Err(cx.err(k("timeout"), "must be more than 0"));
    }
    let c = l.cache.as_ref();
    let none = None;
    let cache = LookupCache {
        ttl: cx.duration(
            k("cache.ttl"),
            c.map_or(&none, |c| &c.ttl),
            Duration::from_secs(60),
        )?,
        negative_ttl: cx.duration(
            k("cache.negative_ttl"),
            c.map_or(&none, |c| &c.negative_ttl),
            Duration::from_secs(10),
        )?,
        max_entries: c.and_then(|c| c.max_entries).unwrap_or(1_000_000),
        stale_for: cx.duration(
            k("cache.stale_for"),
            c.map_or(&none, |c| &c.stale_for),
            Duration::from_secs(300),
        )?,
    };
    let on_error_next = match l.on_error.as_deref() {
        None | Some("tempfail") => false,
        Some("next") => true,
        Some(other) => {
            return Err(cx.err(k("on_error"), format!("{other:?} is not tempfail or next")))
        }
    };
    let pinned_strict = match l.pinned.as_deref() {
        None | Some("failover") => false,
        Some("strict") => true,
        Some(other) => {
            return Err(cx.err(k("pinned"), format!("{other:?} is not failover or strict")))
        }
    };
    Ok(Lookup {
        name: name.to_string(),
        source,
        timeout,
        cache,
        on_error_next,
        pinned_strict,
    })
}

/// The database of `lookups.NAME`: exactly one of `postgres:` or `redis:`.
fn lookup_source(cx: &Ctx<'_>, name: &str, l: &RawLookup) -> Result<LookupSource, ConfigError> {
    let k = |f: &str| format!("lookups.{name}.{f}");
    let source = match (&l.postgres, &l.redis) {
        (Some(pg), None) => {
            let url = url_or_file(cx, &k("postgres"), &pg.url, &pg.url_file)?;
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(cx.err(
                    k("postgres.url"),
                    "a PostgreSQL URL starts with postgres:// or postgresql://",
                ));
            }
            if !pg.query.contains("$1") {
                return Err(cx.err(
                    k("postgres.query"),
                    "the query takes the user name as $1 (it is never pasted into the text)",
                ));
            }
            let connections = pg.connections.unwrap_or(2);
            if !(1..=64).contains(&connections) {
                return Err(cx.err(k("postgres.connections"), "must be between 1 and 64"));
            }
            let ca_file = match &pg.ca_file {
                Some(f) => Some(cx.existing(k("postgres.ca_file"), f)?),
                None => None,
            };
            LookupSource::Postgres {
                url,
                query: pg.query.clone(),
                connections,
                ca_file,
            }
        }
        (None, Some(r)) => {
            let url = url_or_file(cx, &k("redis"), &r.url, &r.url_file)?;
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(cx.err(
                    k("redis.url"),
                    "a Redis URL starts with redis:// or rediss://",
                ));
            }
            if !r.key.contains("{user}") {
                return Err(cx.err(k("redis.key"), "the key template must contain {user}"));
            }
            let ca_file = match &r.ca_file {
                Some(f) => Some(cx.existing(k("redis.ca_file"), f)?),
                None => None,
            };
            LookupSource::Redis {
                url,
                key: r.key.clone(),
                ca_file,
            }
        }
        _ => {
            return Err(cx.err(
                format!("lookups.{name}"),
                "give exactly one of postgres: or redis:",
            ))
        }
    };
    Ok(source)
}

fn hostname(cx: &Ctx<'_>, raw: &RawConfig) -> Result<String, ConfigError> {
    let hostname = raw.hostname.as_deref().unwrap_or("cutover");
    if hostname.is_empty() || !hostname.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(cx.err("hostname", "must be a non-empty name without spaces"));
    }
    Ok(hostname.to_string())
}

fn certificates(cx: &Ctx<'_>, raw: &RawConfig) -> Result<Vec<CertFiles>, ConfigError> {
    let list = raw.tls.iter().flat_map(|t| t.certificates.iter());
    list.enumerate()
        .map(|(i, c)| {
            Ok(CertFiles {
                cert: cx.existing(format!("tls.certificates[{i}].cert"), &c.cert)?,
                key: cx.existing(format!("tls.certificates[{i}].key"), &c.key)?,
            })
        })
        .collect()
}

fn listeners(
    cx: &Ctx<'_>,
    raw: &RawConfig,
    have_certificates: bool,
) -> Result<Vec<Listener>, ConfigError> {
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        let listener = listener(cx, i, l, have_certificates)?;
        if !names.insert(listener.name.clone()) {
            return Err(cx.err(
                format!("listeners[{i}].name"),
                format!("listener name {:?} is empty or used twice", l.name),
            ));
        }
        let listen = listener.listen;
        if listen.port() != 0 && !addrs.insert(listen) {
            return Err(cx.err(
                format!("listeners[{i}].listen"),
                format!("{listen} is used by two listeners"),
            ));
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

fn listener(
    cx: &Ctx<'_>,
    i: usize,
    l: &RawListener,
    have_certificates: bool,
) -> Result<Listener, ConfigError> {
    let k = |f: &str| format!("listeners[{i}].{f}");
    if l.name.is_empty() {
        return Err(cx.err(
            k("name"),
            format!("listener name {:?} is empty or used twice", l.name),
        ));
    }
    let protocol: Protocol = l.protocol.parse().map_err(|e| cx.err(k("protocol"), e))?;
    let listen = cx.socket_addr(k("listen"), &l.listen)?;
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
    if tls != ListenerTls::None && !have_certificates {
        return Err(cx.err(k("tls"), "TLS needs at least one entry in tls.certificates"));
    }
    let bridge_window = match l.relay.as_deref() {
        None if l.window.is_some() => {
            return Err(cx.err(
                k("window"),
                "window only applies with relay: pop-before-smtp",
            ))
        }
        None => None,
        Some("pop-before-smtp") if protocol == Protocol::Smtp => {
            Some(cx.duration(k("window"), &l.window, Duration::from_secs(600))?)
        }
        Some(other) => {
            return Err(cx.err(
                k("relay"),
                format!("{other:?}: only pop-before-smtp, on smtp listeners"),
            ))
        }
    };
    let proxy_protocol = match l.proxy_protocol.as_deref().unwrap_or("off") {
        "off" => ProxyMode::Off,
        "optional" => ProxyMode::Optional,
        "required" => ProxyMode::Required,
        other => {
            return Err(cx.err(
                k("proxy_protocol"),
                format!("{other:?}: expected off, optional or required"),
            ))
        }
    };
    let sasl = match &l.sasl {
        None => crate::proto::Mechanisms::default(),
        Some(names) => {
            let mut set = crate::proto::Mechanisms::NONE;
            for n in names {
                let m = crate::proto::Mechanism::from_name(n.as_bytes()).ok_or_else(|| {
                    cx.err(
                        k("sasl"),
                        format!("{n:?}: expected plain, login, oauthbearer or xoauth2"),
                    )
                })?;
                set = set.with(m);
            }
            set
        }
    };
    Ok(Listener {
        name: l.name.clone(),
        protocol,
        listen,
        tls,
        allow_plaintext_auth: l.allow_plaintext_auth,
        bridge_window,
        proxy_protocol,
        sasl,
    })
}

fn pools(cx: &Ctx<'_>, raw: &RawConfig) -> Result<BTreeMap<String, Pool>, ConfigError> {
    raw.pools
        .iter()
        .map(|(name, p)| Ok((name.clone(), pool(cx, name, p)?)))
        .collect()
}

fn pool(cx: &Ctx<'_>, name: &str, p: &RawPool) -> Result<Pool, ConfigError> {
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
    let connect_timeout = cx.duration(
        k("connect_timeout"),
        &p.connect_timeout,
        Duration::from_secs(3),
    )?;
    if connect_timeout.is_zero() {
        return Err(cx.err(k("connect_timeout"), "must be more than 0"));
    }
    let login_timeout = cx.duration(
        k("login_timeout"),
        &p.login_timeout,
        Duration::from_secs(15),
    )?;
    if login_timeout < connect_timeout {
        return Err(cx.err(k("login_timeout"), "must be at least connect_timeout"));
    }
    let protocols = pool_protocols(cx, name, p)?;
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
    let proxy_protocol = match p.proxy_protocol.as_deref() {
        None | Some("off") => false,
        Some("v2") => true,
        Some(other) => {
            return Err(cx.err(
                k("proxy_protocol"),
                format!("{other:?}: expected v2 or off"),
            ))
        }
    };
    Ok(Pool {
        name: name.to_string(),
        proxy_protocol,
        balance,
        connect_timeout,
        login_timeout,
        health: health(cx, name, p)?,
        forward_client_address: p.forward_client_address,
        disconnect_spread: cx.duration(
            k("disconnect_spread"),
            &p.disconnect_spread,
            Duration::from_secs(10),
        )?,
        dns_grace: cx.duration(k("dns_grace"), &p.dns_grace, Duration::from_secs(3600))?,
        keepalive: cx.duration(k("keepalive"), &p.keepalive, Duration::from_secs(60))?,
        login_original_name,
        legacy: p.legacy.unwrap_or(name == "legacy"),
        protocols,
    })
}

/// A pool's servers per protocol: at least one protocol, and a `pop-before-smtp` SMTP
/// entry paired server by server with a POP3 one.
fn pool_protocols(
    cx: &Ctx<'_>,
    name: &str,
    p: &RawPool,
) -> Result<BTreeMap<Protocol, PoolProtocol>, ConfigError> {
    let mut protocols = BTreeMap::new();
    for (proto, pp) in [
        (Protocol::Imap, &p.imap),
        (Protocol::Pop3, &p.pop3),
        (Protocol::Smtp, &p.smtp),
    ] {
        if let Some(pp) = pp {
            protocols.insert(proto, pool_protocol(cx, name, proto, pp)?);
        }
    }
    if let Some(smtp) = protocols.get(&Protocol::Smtp) {
        let pop_servers = protocols.get(&Protocol::Pop3).map(|p| p.servers.len());
        if smtp.auth == SmtpAuth::PopBeforeSmtp && pop_servers != Some(smtp.servers.len()) {
            return Err(cx.err(
                format!("pools.{name}.smtp.auth"),
                "pop-before-smtp needs a pop3 entry with one server per smtp server (same hosts, same order)",
            ));
        }
    }
    if protocols.is_empty() {
        return Err(cx.err(
            format!("pools.{name}"),
            "pool has no imap, pop3 or smtp servers",
        ));
    }
    Ok(protocols)
}

fn health(cx: &Ctx<'_>, name: &str, p: &RawPool) -> Result<Health, ConfigError> {
    let rh = p.health.as_ref();
    let hk = |f: &str| format!("pools.{name}.health.{f}");
    let health = Health {
        interval: cx.duration(
            hk("interval"),
            &rh.and_then(|h| h.interval.clone()),
            Duration::from_secs(5),
        )?,
        rise: rh.and_then(|h| h.rise).unwrap_or(2),
        fall: rh.and_then(|h| h.fall).unwrap_or(1),
        down_for: cx.duration(
            hk("down_for"),
            &rh.and_then(|h| h.down_for.clone()),
            Duration::from_secs(30),
        )?,
    };
    if health.rise == 0 || health.fall == 0 {
        return Err(cx.err(hk("rise"), "rise and fall must be at least 1"));
    }
    Ok(health)
}

fn pool_protocol(
    cx: &Ctx<'_>,
    name: &str,
    proto: Protocol,
    pp: &RawPoolProtocol,
) -> Result<PoolProtocol, ConfigError> {
    let pk = |f: &str| format!("pools.{name}.{proto}.{f}");
    if pp.servers.is_empty() {
        return Err(cx.err(pk("servers"), "needs at least one server"));
    }
    let servers = pp
        .servers
        .iter()
        .enumerate()
        .map(|(j, s)| {
            s.parse::<ServerAddr>()
                .map_err(|e| cx.err(format!("pools.{name}.{proto}.servers[{j}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
        Some(c) => Some(cx.existing(pk("ca"), c)?),
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
    Ok(PoolProtocol {
        servers,
        tls,
        ca,
        server_name: pp.server_name.clone(),
        auth,
    })
}

fn users(raw: &RawConfig) -> Users {
    match &raw.users {
        Some(u) => Users {
            local_domains: u
                .local_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            case_insensitive: u.case_insensitive,
        },
        None => Users::default(),
    }
}

fn stages(cx: &Ctx<'_>, raw: &RawConfig, targets: &Targets<'_>) -> Result<Vec<Stage>, ConfigError> {
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
        if let Some(prev) = stages.last().filter(|prev| prev.from >= from) {
            return Err(cx.err(
                k("from"),
                format!(
                    "starts no later than stage {:?}: list stages in time order",
                    prev.name
                ),
            ));
        }
        let routes = routes(cx, &st.routes, &k("routes"), targets)?;
        stages.push(Stage {
            name: st.name.clone(),
            from,
            routes,
        });
    }
    Ok(stages)
}

/// Every listener's protocol must be served by every pool a route (of any stage) can
/// pick, as its pool or its fallback.
fn every_listener_served(
    cx: &Ctx<'_>,
    listeners: &[Listener],
    routes: &[Route],
    stages: &[Stage],
    pools: &BTreeMap<String, Pool>,
) -> Result<(), ConfigError> {
    let all_routes = std::iter::once(routes).chain(stages.iter().map(|s| s.routes.as_slice()));
    for r in all_routes.flatten() {
        // A lookup rule without a pool may pick any pool: the lookup's answers are
        // checked when they arrive (a pool without the protocol's servers cannot serve).
        let targets =
            (r.pool.iter().map(|p| ("pool", p))).chain(r.fallback.iter().map(|f| ("fallback", f)));
        for (field, pool) in targets {
            let Some(l) = listeners
                .iter()
                .position(|l| !pools[pool].protocols.contains_key(&l.protocol))
            else {
                continue;
            };
            let l_ = &listeners[l];
            return Err(cx.err(
                format!("{}.{field}", r.id),
                format!(
                    "pool {pool:?} has no {} servers, but listener {:?} (listeners[{l}]) speaks {}",
                    l_.protocol, l_.name, l_.protocol
                ),
            ));
        }
    }
    Ok(())
}

fn on_move(cx: &Ctx<'_>, raw: &RawConfig) -> Result<OnMove, ConfigError> {
    let Some(m) = &raw.on_move else {
        return Ok(OnMove {
            kick: true,
            grace: Duration::from_secs(5),
        });
    };
    let kick = match m.action.as_deref().unwrap_or("kick") {
        "kick" => true,
        "keep" => false,
        other => {
            return Err(cx.err(
                "on_move.action",
                format!("{other:?}: expected kick or keep"),
            ))
        }
    };
    let grace = cx.duration("on_move.grace", &m.grace, Duration::from_secs(5))?;
    Ok(OnMove { kick, grace })
}

fn admin(cx: &Ctx<'_>, raw: &RawConfig) -> Result<Option<Admin>, ConfigError> {
    let Some(a) = &raw.admin else {
        return Ok(None);
    };
    let listen = cx.socket_addr("admin.listen", &a.listen)?;
    let token = match &a.token_file {
        Some(f) => {
            let path = cx.resolve(f);
            let t = std::fs::read_to_string(&path)
                .map_err(|e| cx.err("admin.token_file", format!("{}: {e}", path.display())))?;
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
    let hold_max_wait = cx.duration(
        "admin.hold_max_wait",
        &a.hold_max_wait,
        Duration::from_secs(120),
    )?;
    Ok(Some(Admin {
        listen,
        token,
        hold_max_wait,
        token_file: a.token_file.as_deref().map(|f| cx.resolve(f)),
    }))
}

fn throttle(cx: &Ctx<'_>, raw: &RawConfig) -> Result<Throttle, ConfigError> {
    let mut throttle = Throttle {
        ip_failures: 20,
        user_failures: 10,
        window: Duration::from_secs(600),
        block: Duration::from_secs(900),
        delay: Duration::from_millis(500),
        max_delay: Duration::from_secs(8),
    };
    if let Some(t) = &raw.auth_throttle {
        let k = |f: &str| format!("auth_throttle.{f}");
        throttle.ip_failures = t.ip_failures.unwrap_or(throttle.ip_failures);
        throttle.user_failures = t.user_failures.unwrap_or(throttle.user_failures);
        throttle.window = cx.duration(k("window"), &t.window, throttle.window)?;
        throttle.block = cx.duration(k("block"), &t.block, throttle.block)?;
        throttle.delay = cx.duration(k("delay"), &t.delay, throttle.delay)?;
        throttle.max_delay = cx.duration(k("max_delay"), &t.max_delay, throttle.max_delay)?;
    }
    Ok(throttle)
}

fn dns_servers(cx: &Ctx<'_>, raw: &RawConfig) -> Result<Vec<SocketAddr>, ConfigError> {
    let servers = raw.dns.iter().flat_map(|d| d.servers.iter());
    servers
        .enumerate()
        .map(|(i, srv)| cx.socket_addr(format!("dns.servers[{i}]"), srv))
        .collect()
}

/// `proxy_protocol:`. A listener that accepts headers needs at least one trusted
/// network: without one, anyone could claim any address.
fn proxy_protocol(
    cx: &Ctx<'_>,
    raw: &RawConfig,
    listeners_using_it: &[usize],
) -> Result<ProxyProtocol, ConfigError> {
    let raw_pp = raw.proxy_protocol.as_ref();
    let trusted = raw_pp
        .map(|p| p.trusted.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, net)| {
            net.parse::<IpNet>()
                .map_err(|e| cx.err(format!("proxy_protocol.trusted[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let (Some(&i), true) = (listeners_using_it.first(), trusted.is_empty()) {
        return Err(cx.err(
            format!("listeners[{i}].proxy_protocol"),
            "needs at least one network in proxy_protocol.trusted",
        ));
    }
    let timeout = cx.duration(
        "proxy_protocol.timeout",
        &raw_pp.and_then(|p| p.timeout.clone()),
        Duration::from_secs(3),
    )?;
    if timeout.is_zero() {
        return Err(cx.err("proxy_protocol.timeout", "must be more than 0"));
    }
    Ok(ProxyProtocol { trusted, timeout })
}

/// `instance_name:`, by default the machine's host name.
fn instance_name(cx: &Ctx<'_>, raw: &RawConfig) -> Result<String, ConfigError> {
    let name = match &raw.instance_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let name = if name.is_empty() && raw.instance_name.is_none() {
        "cutover".to_string()
    } else {
        name
    };
    let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if name.is_empty() || name.len() > 64 || !name.bytes().all(valid) {
        return Err(cx.err(
            "instance_name",
            "must be 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(name)
}

/// `state.redis:`: one URL (inline or from a file) or a cluster's nodes.
fn redis(cx: &Ctx<'_>, raw: &RawConfig) -> Result<Option<RedisState>, ConfigError> {
    let Some(r) = raw.state.as_ref().and_then(|s| s.redis.as_ref()) else {
        return Ok(None);
    };
    let from_file = match &r.url_file {
        Some(f) => {
            let path = cx.existing("state.redis.url_file".into(), f)?;
            let url = std::fs::read_to_string(&path)
                .map_err(|e| cx.err("state.redis.url_file", format!("{}: {e}", path.display())))?;
            Some(url.trim().to_string())
        }
        None => None,
    };
    let (urls, cluster, key) = match (&r.url, from_file, &r.cluster) {
        (Some(u), None, None) => (vec![u.clone()], false, "state.redis.url"),
        (None, Some(u), None) => (vec![u], false, "state.redis.url_file"),
        (None, None, Some(c)) if !c.nodes.is_empty() => {
            (c.nodes.clone(), true, "state.redis.cluster.nodes")
        }
        _ => {
            return Err(cx.err(
                "state.redis",
                "give exactly one of url, url_file or cluster: { nodes: [...] }",
            ))
        }
    };
    for u in &urls {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(cx.err(key, "a Redis URL starts with redis:// or rediss://"));
        }
    }
    let timeout = cx.duration("state.redis.timeout", &r.timeout, Duration::from_millis(50))?;
    if timeout.is_zero() {
        return Err(cx.err("state.redis.timeout", "must be more than 0"));
    }
    Ok(Some(RedisState {
        urls,
        cluster,
        key_prefix: r.key_prefix.clone().unwrap_or_else(|| "cutover:".into()),
        timeout,
    }))
}

fn workers(cx: &Ctx<'_>, raw: &RawConfig) -> Result<usize, ConfigError> {
    let workers = raw.workers.unwrap_or(0);
    if workers > 1024 {
        return Err(cx.err("workers", format!("{workers} is more than 1024")));
    }
    Ok(workers)
}

/// `limits:` and `shutdown:`: protocol bounds, connection limits, timeouts.
fn limits(cx: &Ctx<'_>, raw: &RawConfig) -> Result<(Limits, ConnLimits, Timeouts), ConfigError> {
    let mut limits = Limits::default();
    let mut conn_limits = ConnLimits {
        max_connections: 20_000,
        max_per_ip: 1000,
        tls_handshakes_per_worker: 16,
    };
    let mut timeouts = Timeouts {
        preauth: Duration::from_secs(60),
        tls_handshake: Duration::from_secs(10),
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
        if let Some(v) = l.max_sasl_token {
            if !(1024..=1 << 20).contains(&v) {
                return Err(cx.err("limits.max_sasl_token", "must be between 1024 and 1048576"));
            }
            limits.max_sasl_token = v;
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
        if let Some(v) = l.tls_handshakes_per_worker {
            if !(1..=100_000).contains(&v) {
                return Err(cx.err(
                    "limits.tls_handshakes_per_worker",
                    "must be between 1 and 100000",
                ));
            }
            conn_limits.tls_handshakes_per_worker = v;
        }
        timeouts.preauth = cx.duration(
            "limits.preauth_timeout",
            &l.preauth_timeout,
            timeouts.preauth,
        )?;
        timeouts.tls_handshake = cx.duration(
            "limits.tls_handshake_timeout",
            &l.tls_handshake_timeout,
            timeouts.tls_handshake,
        )?;
        if timeouts.tls_handshake.is_zero() {
            return Err(cx.err("limits.tls_handshake_timeout", "must be more than 0"));
        }
    }
    if let Some(s) = &raw.shutdown {
        timeouts.drain = cx.duration("shutdown.drain_timeout", &s.drain_timeout, timeouts.drain)?;
    }
    Ok((limits, conn_limits, timeouts))
}

/// The routes of one list (`routes` or a stage's), validated against the pools; cohort
/// files are read and normalized like logins.
fn routes(
    cx: &Ctx<'_>,
    raw: &[RawRoute],
    prefix: &str,
    targets: &Targets<'_>,
) -> Result<Vec<Route>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, r)| route(cx, r, &format!("{prefix}[{i}]"), targets))
        .collect()
}

fn route(
    cx: &Ctx<'_>,
    r: &RawRoute,
    id: &str,
    targets: &Targets<'_>,
) -> Result<Route, ConfigError> {
    let (pools, users) = (targets.pools, targets.users);
    let k = |f: &str| format!("{id}.{f}");
    match (&r.pool, &r.lookup) {
        (None, None) => return Err(cx.err(id, "a route needs a pool or a lookup")),
        (Some(p), _) if !pools.contains_key(p) => {
            return Err(cx.err(k("pool"), format!("no pool named {p:?}")))
        }
        (_, Some(l)) if !targets.lookups.contains_key(l) => {
            return Err(cx.err(k("lookup"), format!("no lookup named {l:?}")))
        }
        _ => {}
    }
    match &r.fallback {
        Some(f) if !pools.contains_key(f) => {
            return Err(cx.err(k("fallback"), format!("no pool named {f:?}")))
        }
        Some(f) if Some(f) == r.pool.as_ref() => {
            return Err(cx.err(k("fallback"), "the fallback must be another pool"))
        }
        None if r.fallback_on_auth_failure => {
            return Err(cx.err(k("fallback_on_auth_failure"), "needs a fallback pool"))
        }
        _ => {}
    }
    let matcher = Matcher {
        users: user_set(cx, r, id, users)?,
        domains: r
            .domains
            .as_ref()
            .map(|v| v.iter().map(|d| d.to_ascii_lowercase()).collect()),
        percent: match r.percent {
            Some(p) if p <= 100 => Some(p as u8),
            Some(p) => return Err(cx.err(k("percent"), format!("{p} is not between 0 and 100"))),
            None => None,
        },
    };
    Ok(Route {
        id: id.to_string(),
        text: route_text(r, id, &matcher),
        matcher,
        pool: r.pool.clone(),
        lookup: r.lookup.clone(),
        fallback: r.fallback.clone(),
        fallback_on_auth_failure: r.fallback_on_auth_failure,
        users_file: r.users_file.as_deref().map(|f| cx.resolve(f)),
    })
}

/// The users a route names, inline and from its cohort file, normalized.
fn user_set(
    cx: &Ctx<'_>,
    r: &RawRoute,
    id: &str,
    users: &Users,
) -> Result<Option<UserSet>, ConfigError> {
    if r.users.is_none() && r.users_file.is_none() {
        return Ok(None);
    }
    let k = |f: &str| format!("{id}.{f}");
    let norm = |u: &str| normalize(users, u);
    let mut set = UserSet::default();
    for u in r.users.iter().flatten() {
        set.push(&norm(u)).map_err(|e| cx.err(k("users"), e))?;
    }
    if let Some(f) = &r.users_file {
        let path = cx.resolve(f);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| cx.err(k("users_file"), format!("{}: {e}", path.display())))?;
        set.add_lines(&text, norm).map_err(|(line, e)| {
            cx.err(k("users_file"), format!("{}:{line}: {e}", path.display()))
        })?;
    }
    Ok(Some(set.finish()))
}

/// A route as `cutover route` and `cutover check` show it.
fn route_text(r: &RawRoute, id: &str, matcher: &Matcher) -> String {
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
    if let Some(l) = &r.lookup {
        parts.push(format!("lookup {l}"));
    }
    if parts.is_empty() {
        parts.push("default".into());
    }
    let target = r.pool.as_deref().unwrap_or("(the row's pool)");
    let mut text = format!("{id}: {} -> {target}", parts.join(" and "));
    if let Some(f) = &r.fallback {
        let also = if r.fallback_on_auth_failure {
            ", also on auth failure"
        } else {
            ""
        };
        text.push_str(&format!(" (fallback {f}{also})"));
    }
    text
}

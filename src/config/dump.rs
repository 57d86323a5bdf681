//! `cutover config dump`: the configuration in force after defaults, in the file's own
//! shape (what `doveconf -n` is to Dovecot). Secrets never appear: the admin token, and
//! URLs of Redis, PostgreSQL and JWKS keep only where they point.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{
    redact_dsn, Balance, Config, Listener, LookupSource, Pool, ProxyMode, Route, SmtpAuth,
};
use crate::proto::{BackendTls, ListenerTls};

/// A duration as the file writes it (`1h30m`, `10s`, `250ms`).
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let mut s = (ms / 1000) as u64;
    let mut out = String::new();
    for (unit, secs) in [("h", 3600), ("m", 60)] {
        if s >= secs {
            out.push_str(&format!("{}{unit}", s / secs));
            s %= secs;
        }
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

fn listener_tls(t: ListenerTls) -> &'static str {
    match t {
        ListenerTls::None => "none",
        ListenerTls::StartTls => "starttls",
        ListenerTls::Implicit => "implicit",
    }
}

fn backend_tls(t: BackendTls) -> &'static str {
    match t {
        BackendTls::None => "none",
        BackendTls::StartTls => "starttls",
        BackendTls::Implicit => "implicit",
    }
}

fn listener(l: &Listener) -> Value {
    let mut v = json!({
        "name": l.name,
        "protocol": l.protocol.as_str(),
        "listen": l.listen.to_string(),
        "tls": listener_tls(l.tls),
        "allow_plaintext_auth": l.allow_plaintext_auth,
        "sasl": l.sasl.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        "proxy_protocol": match l.proxy_protocol {
            ProxyMode::Off => "off",
            ProxyMode::Optional => "optional",
            ProxyMode::Required => "required",
        },
    });
    if let (Some(w), Some(obj)) = (l.bridge_window, v.as_object_mut()) {
        obj.insert("relay".into(), json!("pop-before-smtp"));
        obj.insert("window".into(), json!(duration(w)));
    }
    v
}

fn pool(p: &Pool) -> Value {
    let mut v = json!({
        "balance": match p.balance { Balance::First => "first", Balance::UserHash => "user-hash" },
        "connect_timeout": duration(p.connect_timeout),
        "login_timeout": duration(p.login_timeout),
        "health": {
            "interval": duration(p.health.interval),
            "rise": p.health.rise,
            "fall": p.health.fall,
            "down_for": duration(p.health.down_for),
        },
        "forward_client_address": p.forward_client_address,
        "proxy_protocol": if p.proxy_protocol { "v2" } else { "off" },
        "disconnect_spread": duration(p.disconnect_spread),
        "dns_grace": duration(p.dns_grace),
        "keepalive": duration(p.keepalive),
        "login_original_name": p.login_original_name,
        "legacy": p.legacy,
    });
    if let Some(obj) = v.as_object_mut() {
        for (proto, pp) in &p.protocols {
            let mut s = json!({
                "servers": pp.servers.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "tls": backend_tls(pp.tls),
            });
            if let Some(o) = s.as_object_mut() {
                if let Some(ca) = &pp.ca {
                    o.insert("ca".into(), json!(ca.display().to_string()));
                }
                if let Some(n) = &pp.server_name {
                    o.insert("server_name".into(), json!(n));
                }
                if pp.auth == SmtpAuth::PopBeforeSmtp {
                    o.insert("auth".into(), json!("pop-before-smtp"));
                }
            }
            obj.insert(proto.as_str().into(), s);
        }
    }
    v
}

/// A route: its matcher written as in the file (cohort files by name and size).
fn route(r: &Route) -> Value {
    let mut o = Map::new();
    match (&r.users_file, &r.matcher.users) {
        (Some(f), Some(set)) => {
            o.insert("users_file".into(), json!(f.display().to_string()));
            o.insert("users_in_file".into(), json!(set.len()));
        }
        (None, Some(set)) => {
            o.insert("users".into(), json!(format!("({} users)", set.len())));
        }
        _ => {}
    }
    if let Some(d) = &r.matcher.domains {
        let mut d: Vec<&String> = d.iter().collect();
        d.sort();
        o.insert("domains".into(), json!(d));
    }
    if let Some(p) = r.matcher.percent {
        o.insert("percent".into(), json!(p));
    }
    if let Some(l) = &r.lookup {
        o.insert("lookup".into(), json!(l));
    }
    if let Some(p) = &r.pool {
        o.insert("pool".into(), json!(p));
    }
    if let Some(f) = &r.fallback {
        o.insert("fallback".into(), json!(f));
        o.insert(
            "fallback_on_auth_failure".into(),
            json!(r.fallback_on_auth_failure),
        );
    }
    Value::Object(o)
}

/// The configuration as a tree in the file's shape, every default filled in.
pub fn to_value(c: &Config) -> Value {
    let mut v = json!({
        "hostname": c.hostname,
        "tls": { "certificates": c.certificates.iter().map(|f| json!({
            "cert": f.cert.display().to_string(), "key": f.key.display().to_string(),
        })).collect::<Vec<_>>() },
        "listeners": c.listeners.iter().map(listener).collect::<Vec<_>>(),
        "pools": c.pools.iter().map(|(n, p)| (n.clone(), pool(p))).collect::<Map<_, _>>(),
        "routes": c.routes.iter().map(route).collect::<Vec<_>>(),
        "stages": c.stages.iter().map(|s| json!({
            "name": s.name,
            "from": super::rfc3339::format(s.from),
            "routes": s.routes.iter().map(route).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "users": {
            "local_domains": c.users.local_domains,
            "case_insensitive": c.users.case_insensitive,
        },
        "limits": limits(c),
        "auth_throttle": {
            "ip_failures": c.throttle.ip_failures,
            "user_failures": c.throttle.user_failures,
            "window": duration(c.throttle.window),
            "block": duration(c.throttle.block),
            "delay": duration(c.throttle.delay),
            "max_delay": duration(c.throttle.max_delay),
        },
        "shutdown": { "drain_timeout": duration(c.timeouts.drain) },
        "on_move": {
            "action": if c.on_move.kick { "kick" } else { "none" },
            "grace": duration(c.on_move.grace),
        },
        "stragglers": { "max_users": c.stragglers_max_users },
        "workers": c.workers,
        "instance_name": c.instance_name,
        "proxy_protocol": {
            "trusted": c.proxy_protocol.trusted.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "timeout": duration(c.proxy_protocol.timeout),
        },
        "dns": { "servers": c.dns_servers.iter().map(|s| s.to_string()).collect::<Vec<_>>() },
    });
    let Some(o) = v.as_object_mut() else {
        return v;
    };
    let optional = [
        (
            "metrics",
            c.metrics.map(|m| json!({ "listen": m.to_string() })),
        ),
        ("admin", c.admin.as_ref().map(admin)),
        (
            "state",
            c.redis.as_ref().map(|r| json!({ "redis": redis(r) })),
        ),
        ("lookups", (!c.lookups.is_empty()).then(|| lookups(c))),
        (
            "upgrade",
            (c.upgrade_socket.as_ref()).map(|u| json!({ "socket": u.display().to_string() })),
        ),
        ("oauth", c.oauth.as_ref().map(oauth)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            o.insert(key.into(), value);
        }
    }
    v
}

fn limits(c: &Config) -> Value {
    json!({
        "max_line": c.limits.max_line,
        "max_literal": c.limits.max_literal,
        "max_sasl_token": c.limits.max_sasl_token,
        "max_auth_failures": c.limits.max_auth_failures,
        "max_commands": c.limits.max_commands,
        "preauth_timeout": duration(c.timeouts.preauth),
        "tls_handshake_timeout": duration(c.timeouts.tls_handshake),
        "tls_handshakes_per_worker": c.conn_limits.tls_handshakes_per_worker,
        "max_connections": c.conn_limits.max_connections,
        "max_connections_per_ip": c.conn_limits.max_per_ip,
    })
}

/// The admin endpoint: the token is never shown, only whether one is set.
fn admin(a: &super::Admin) -> Value {
    let mut admin = json!({
        "listen": a.listen.to_string(),
        "hold_max_wait": duration(a.hold_max_wait),
    });
    if let Some(ao) = admin.as_object_mut() {
        if let Some(f) = &a.token_file {
            ao.insert("token_file".into(), json!(f.display().to_string()));
        }
        if a.token.is_some() {
            ao.insert("token".into(), json!("(set, not shown)"));
        }
    }
    admin
}

/// `state.redis`, URLs without their passwords.
fn redis(r: &super::RedisState) -> Value {
    let urls: Vec<String> = r.urls.iter().map(|u| redact_dsn(u)).collect();
    let mut redis = json!({
        "key_prefix": r.key_prefix,
        "timeout": duration(r.timeout),
    });
    if let Some(ro) = redis.as_object_mut() {
        if r.cluster {
            ro.insert("cluster".into(), json!({ "nodes": urls }));
        } else {
            ro.insert("url".into(), json!(urls.first()));
        }
    }
    redis
}

/// `lookups`, URLs without their passwords.
fn lookups(c: &Config) -> Value {
    let by_name = c.lookups.iter().map(|(name, l)| {
        let mut lv = match &l.source {
            LookupSource::Postgres {
                url,
                query,
                connections,
                ca_file,
            } => json!({ "postgres": {
                "url": redact_dsn(url),
                "query": query,
                "connections": connections,
                "ca_file": ca_file.as_ref().map(|p| p.display().to_string()),
            }}),
            LookupSource::Redis { url, key, ca_file } => json!({ "redis": {
                "url": redact_dsn(url),
                "key": key,
                "ca_file": ca_file.as_ref().map(|p| p.display().to_string()),
            }}),
        };
        if let Some(lo) = lv.as_object_mut() {
            lo.insert("timeout".into(), json!(duration(l.timeout)));
            lo.insert(
                "cache".into(),
                json!({
                    "ttl": duration(l.cache.ttl),
                    "negative_ttl": duration(l.cache.negative_ttl),
                    "max_entries": l.cache.max_entries,
                    "stale_for": duration(l.cache.stale_for),
                }),
            );
            let on_error = if l.on_error_next { "next" } else { "tempfail" };
            lo.insert("on_error".into(), json!(on_error));
            let pinned = if l.pinned_strict {
                "strict"
            } else {
                "failover"
            };
            lo.insert("pinned".into(), json!(pinned));
        }
        (name.clone(), lv)
    });
    Value::Object(by_name.collect())
}

/// `oauth`: a JWKS URL without user information or query.
fn oauth(oa: &crate::oauth::OAuthSettings) -> Value {
    let mut oauth = json!({
        "claim": oa.claim,
        "issuer": oa.issuer,
        "audience": oa.audience,
        "leeway": duration(oa.leeway),
        "require_exp": oa.require_exp,
        "refresh": duration(oa.refresh),
    });
    if let Some(oo) = oauth.as_object_mut() {
        let (key, value) = match &oa.jwks {
            crate::oauth::JwksSource::File(p) => ("jwks_file", p.display().to_string()),
            crate::oauth::JwksSource::Url(_) => ("jwks_url", oa.jwks.to_string()),
        };
        oo.insert(key.into(), json!(value));
    }
    oauth
}

/// Keys that a reload cannot change in a running proxy: their new values take effect at
/// the next start (or upgrade).
pub const RESTART_KEYS: &[&str] = &["workers", "instance_name", "state"];

/// The keys of [`RESTART_KEYS`] whose values differ between two dumps.
pub fn restart_keys(running: &Value, file: &Value) -> Vec<&'static str> {
    RESTART_KEYS
        .iter()
        .copied()
        .filter(|k| running.get(k) != file.get(k))
        .collect()
}

/// The configuration in force, as YAML.
pub fn to_yaml(c: &Config) -> String {
    let header = format!(
        "# effective configuration of {} (defaults filled in, secrets not shown)\n",
        c.source.display()
    );
    match serde_yaml_ng::to_string(&to_value(c)) {
        Ok(body) => header + &body,
        Err(e) => format!("{header}# cannot render: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_the_file_writes_them() {
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(duration(Duration::from_secs(3600)), "1h");
        assert_eq!(duration(Duration::ZERO), "0s");
        for s in ["250ms", "1m30s", "1h", "10s", "2h5m7s"] {
            let d = super::super::parse_duration(s).unwrap();
            assert_eq!(duration(d), s);
        }
    }

    #[test]
    fn a_dump_has_the_defaults_and_hides_secrets() {
        let dir = std::env::temp_dir().join(format!("cutover-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cret-token-0123456789\n").unwrap();
        let text = r#"
listeners: [{ name: imap, protocol: imap, listen: "127.0.0.1:1143", allow_plaintext_auth: true }]
pools:
  new: { imap: { servers: ["127.0.0.10:143"] } }
routes: [{ domains: [example.net], pool: new }, { pool: new }]
admin: { listen: "127.0.0.1:1999", token_file: token }
state: { redis: { url: "redis://:hunter2@127.0.0.1:6379/0" } }
lookups:
  l: { postgres: { url: "postgres://u:pw@db/mail?password=zz", query: "SELECT pool FROM t WHERE u = $1" } }
"#;
        let cfg = Config::from_text(text, &dir.join("routes.yaml"), &dir).unwrap();
        let yaml = to_yaml(&cfg);
        for secret in ["s3cret-token", "hunter2", ":pw@", "password=zz"] {
            assert!(!yaml.contains(secret), "{secret} in\n{yaml}");
        }
        for default in [
            "preauth_timeout: 1m",
            "max_sasl_token: 32768",
            "drain_timeout: 30s",
        ] {
            assert!(yaml.contains(default), "{default} not in\n{yaml}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

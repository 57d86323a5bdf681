//! Routing: a pure function from (configuration, user, protocol) to a [`Decision`].
//!
//! No I/O, no clock, no health state: the same inputs always give the same decision, and
//! `cutover route` prints exactly what the proxy would do. Availability and failover are
//! the backend module's business.

use serde::Serialize;

use crate::config::{bucket, normalize, stable_hash, Balance, Config, Protocol};

/// Where one user goes and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The user name as the client gave it.
    pub login: String,
    /// The normalized user name: what routing matched and what the backend receives.
    pub user: String,
    /// Protocol the decision is for.
    pub protocol: &'static str,
    /// Index of the matching rule.
    pub rule_index: usize,
    /// The rule, as text.
    pub rule: String,
    /// Where the rule is written, e.g. `routes[2]` (the `rule` metric label).
    pub rule_id: String,
    /// Pool name.
    pub pool: String,
    /// Servers in the order they will be tried (`host:port`).
    pub servers: Vec<String>,
    /// The stable bucket (0..100) used by `percent` rules.
    pub bucket: u8,
    /// The stage in force (None: the top-level routes).
    pub stage: Option<String>,
    /// The pool tried when every server of `pool` is unavailable.
    pub fallback: Option<FallbackDecision>,
    /// When the decision was taken (Unix seconds; RFC 3339 when printed or serialized:
    /// formatted only then, not on every login).
    #[serde(serialize_with = "serialize_rfc3339")]
    pub at: i64,
}

fn serialize_rfc3339<S: serde::Serializer>(at: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::config::rfc3339::format(*at))
}

/// The fallback part of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FallbackDecision {
    /// Pool name.
    pub pool: String,
    /// Servers in try order.
    pub servers: Vec<String>,
    /// Also used when `pool` rejects the credentials.
    pub on_auth_failure: bool,
}

/// Why no decision could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No rule matched (the configuration has no default route).
    #[error("no route matches user {0:?}")]
    NoRoute(String),
    /// The chosen pool has no servers for the protocol.
    #[error("pool {pool:?} has no {protocol} servers")]
    NoServers {
        /// Pool.
        pool: String,
        /// Protocol.
        protocol: Protocol,
    },
}

/// Servers of `pool` for `protocol` in the order a user is tried.
fn servers_for(
    cfg: &Config,
    pool_name: &str,
    user: &str,
    protocol: Protocol,
) -> Result<Vec<String>, RouteError> {
    let missing = || RouteError::NoServers {
        pool: pool_name.to_string(),
        protocol,
    };
    let pool = cfg.pools.get(pool_name).ok_or_else(missing)?;
    let pp = pool.protocols.get(&protocol).ok_or_else(missing)?;
    let mut servers: Vec<String> = pp.servers.iter().map(|s| s.as_str().to_owned()).collect();
    if pool.balance == Balance::UserHash && !servers.is_empty() {
        let start = stable_hash(b"balance", user) % servers.len() as u64;
        servers.rotate_left(start as usize);
    }
    Ok(servers)
}

/// Decides where `login` goes for `protocol` at `now` (Unix seconds; it picks the stage).
pub fn route(
    cfg: &Config,
    login: &str,
    protocol: Protocol,
    now: i64,
) -> Result<Decision, RouteError> {
    let user = normalize(&cfg.users, login);
    let bucket = bucket(&user);
    let domain = user.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    let (stage, routes) = cfg.routes_at(now);
    let (rule_index, rule) = routes
        .iter()
        .enumerate()
        .find(|(_, r)| {
            let m = &r.matcher;
            m.users.as_ref().is_none_or(|u| u.contains(&user))
                && m.domains
                    .as_ref()
                    .is_none_or(|ds| domain.as_ref().is_some_and(|d| ds.contains(d)))
                && m.percent.is_none_or(|p| bucket < p)
        })
        .ok_or_else(|| RouteError::NoRoute(user.clone()))?;
    let servers = servers_for(cfg, &rule.pool, &user, protocol)?;
    let fallback = match &rule.fallback {
        Some(f) => Some(FallbackDecision {
            pool: f.clone(),
            servers: servers_for(cfg, f, &user, protocol)?,
            on_auth_failure: rule.fallback_on_auth_failure,
        }),
        None => None,
    };
    Ok(Decision {
        login: login.to_string(),
        user,
        protocol: protocol.as_str(),
        rule_index,
        rule: rule.text.clone(),
        rule_id: rule.id.clone(),
        pool: rule.pool.clone(),
        servers,
        bucket,
        stage: stage.map(str::to_string),
        fallback,
        at: now,
    })
}

impl Decision {
    /// A human-readable explanation, as `cutover route` prints it.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("user:     {}", self.user));
        if self.login != self.user {
            out.push_str(&format!(" (client sent {:?})", self.login));
        }
        out.push('\n');
        out.push_str(&format!("protocol: {}\n", self.protocol));
        out.push_str(&format!("pool:     {}\n", self.pool));
        out.push_str(&format!("servers:  {}\n", self.servers.join(", ")));
        if let Some(f) = &self.fallback {
            out.push_str(&format!(
                "fallback: {} ({}){}\n",
                f.pool,
                f.servers.join(", "),
                if f.on_auth_failure {
                    ", also when the credentials are rejected"
                } else {
                    ""
                }
            ));
        }
        out.push_str(&format!("rule:     {}\n", self.rule));
        out.push_str(&format!(
            "stage:    {} (at {})\n",
            self.stage.as_deref().unwrap_or("(top-level routes)"),
            crate::config::rfc3339::format(self.at)
        ));
        out.push_str(&format!("bucket:   {} (for percent rules)\n", self.bucket));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "
pools:
  new:
    imap: {{ servers: [\"127.0.0.10:143\"] }}
  legacy:
    balance: user-hash
    imap: {{ servers: [\"127.0.0.11:143\", \"127.0.0.12:143\"] }}
{extra}
routes:
  - {{ users: [joeuser, alice], pool: new }}
  - {{ domains: [newdomain.test], pool: new }}
  - {{ percent: 30, pool: new }}
  - {{ pool: legacy }}
"
        );
        Config::from_text(&text, Path::new("t.yaml"), Path::new(".")).unwrap()
    }

    #[test]
    fn golden_hashes_never_change() {
        // If these change, users move between pools on upgrade: never change them.
        assert_eq!(stable_hash(b"percent", "joeuser"), 0x215c_d38e_b1b7_49b5);
        assert_eq!(bucket("joeuser"), (0x215c_d38e_b1b7_49b5u64 % 100) as u8);
        assert_eq!(bucket("bob"), bucket("bob"));
        let spread: std::collections::HashSet<u8> =
            (0..1000).map(|i| bucket(&format!("user{i}"))).collect();
        assert!(
            spread.len() > 90,
            "buckets should spread, got {}",
            spread.len()
        );
    }

    #[test]
    fn first_match_wins() {
        let c = cfg("");
        let d = route(&c, "joeuser", Protocol::Imap, 0).unwrap();
        assert_eq!((d.pool.as_str(), d.rule_index), ("new", 0));
        assert_eq!(d.servers, vec!["127.0.0.10:143"]);
        let d = route(&c, "x@newdomain.test", Protocol::Imap, 0).unwrap();
        assert_eq!((d.pool.as_str(), d.rule_index), ("new", 1));
        // Case-sensitive unless configured.
        let d = route(&c, "JoeUser", Protocol::Imap, 0).unwrap();
        assert_ne!(d.rule_index, 0);
    }

    #[test]
    fn percent_follows_bucket() {
        let c = cfg("");
        let mut in_new = 0;
        for i in 0..2000 {
            let u = format!("someone{i}");
            let d = route(&c, &u, Protocol::Imap, 0).unwrap();
            if d.rule_index == 2 {
                assert!(bucket(&u) < 30);
                in_new += 1;
            } else {
                assert_eq!(d.rule_index, 3);
                assert!(bucket(&u) >= 30);
            }
        }
        assert!(
            (400..800).contains(&in_new),
            "about 30% expected, got {in_new}"
        );
    }

    #[test]
    fn user_hash_rotates_but_keeps_all_servers() {
        let c = cfg("");
        let mut firsts = std::collections::HashSet::new();
        for i in 0..50 {
            let u = format!("legacyuser{i}");
            let d = route(&c, &u, Protocol::Imap, 0).unwrap();
            if d.pool == "legacy" {
                assert_eq!(d.servers.len(), 2);
                firsts.insert(d.servers[0].clone());
                assert_eq!(d, route(&c, &u, Protocol::Imap, 0).unwrap(), "stable");
            }
        }
        assert_eq!(firsts.len(), 2);
    }

    #[test]
    fn normalization() {
        let c = cfg("users:\n  local_domains: [example.net]\n  case_insensitive: true\n");
        let d = route(&c, " JoeUser@Example.NET ", Protocol::Imap, 0).unwrap();
        assert_eq!(d.user, "joeuser");
        assert_eq!(d.pool, "new");
        let d = route(&c, "joeuser@other.org", Protocol::Imap, 0).unwrap();
        assert_eq!(d.user, "joeuser@other.org");
    }

    #[test]
    fn missing_protocol_is_an_error() {
        let c = cfg("");
        assert!(matches!(
            route(&c, "joeuser", Protocol::Pop3, 0),
            Err(RouteError::NoServers { .. })
        ));
    }
}

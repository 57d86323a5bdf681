//! Routing: a pure function from (configuration, user, protocol, time, lookup answers)
//! to a [`Decision`].
//!
//! No I/O, no clock, no health state: the same inputs always give the same decision, and
//! `cutover route` prints exactly what the proxy would do. Availability and failover are
//! the backend module's business. A rule that reads the provider's database
//! (`{ lookup: NAME }`) does not query it here: routing stops with
//! [`RouteError::NeedsLookup`], the caller asks the lookup ([`crate::lookup`]) and routes
//! again with the answer in [`Answers`]. Lookups are thus asked only when a login reaches
//! their rule, one at a time, in rule order.

use serde::Serialize;

use crate::config::{bucket, normalize, stable_hash, Balance, Config, Host, Protocol};

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
    /// The lookup that decided, with the row it read (None: a rule without a lookup).
    pub lookup: Option<Looked>,
    /// The server the lookup pinned the user to (first in `servers`).
    pub pinned: Option<String>,
}

/// A row a lookup read: the pool, and maybe the server, of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The pool named by the row (None: the row has no pool column or it is NULL).
    pub pool: Option<String>,
    /// The server named by the row: a host, or `host:port`.
    pub server: Option<String>,
}

/// Where a lookup's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheState {
    /// A cached answer within its TTL.
    Hit,
    /// Not cached (or expired): the database was asked.
    Miss,
    /// The database could not answer; a cached answer past its TTL (within `stale_for`)
    /// served.
    Stale,
    /// The database could not answer and nothing usable was cached.
    Error,
}

impl CacheState {
    /// As the metrics and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheState::Hit => "hit",
            CacheState::Miss => "miss",
            CacheState::Stale => "stale",
            CacheState::Error => "error",
        }
    }
}

/// One lookup's answer for one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Looked {
    /// The lookup's name.
    pub name: String,
    /// The row found (None: no row, or the database failed: see `cache`).
    pub row: Option<Row>,
    /// Where the answer came from.
    pub cache: CacheState,
    /// Why the database did not answer (no secrets), when it was asked and failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The lookup answers a routing has so far (usually none or one).
#[derive(Debug, Clone, Default)]
pub struct Answers(Vec<Looked>);

impl Answers {
    /// Adds (or replaces) a lookup's answer.
    pub fn insert(&mut self, looked: Looked) {
        self.0.retain(|l| l.name != looked.name);
        self.0.push(looked);
    }

    fn get(&self, name: &str) -> Option<&Looked> {
        self.0.iter().find(|l| l.name == name)
    }
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
    /// A rule reads this lookup: ask it and route again with its answer.
    #[error("lookup {0:?} must be asked")]
    NeedsLookup(String),
    /// The lookup's database could not answer, nothing usable was cached, and the lookup
    /// says `on_error: tempfail`.
    #[error("lookup {0:?} could not answer")]
    LookupFailed(String),
    /// The lookup's row names a pool or server the configuration does not have: never
    /// connected to.
    #[error("lookup {lookup:?} answered {row}: {reason}")]
    BadRow {
        /// The lookup.
        lookup: String,
        /// The row, as text.
        row: String,
        /// What is wrong with it.
        reason: String,
        /// For the metric: `unknown_pool` or `unknown_server`.
        kind: &'static str,
    },
}

impl RouteError {
    /// A temporary condition (the client should retry), as opposed to a configuration
    /// that cannot route the user.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            RouteError::LookupFailed(_) | RouteError::BadRow { .. } | RouteError::NeedsLookup(_)
        )
    }
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

/// Decides where `login` goes for `protocol` at `now` (Unix seconds; it picks the stage),
/// without lookup answers: a rule that reads a lookup stops it with
/// [`RouteError::NeedsLookup`].
pub fn route(
    cfg: &Config,
    login: &str,
    protocol: Protocol,
    now: i64,
) -> Result<Decision, RouteError> {
    route_with(cfg, login, protocol, now, &Answers::default())
}

/// The rule that matches, the pool it names and the lookup answer that decided.
struct Matched<'a> {
    index: usize,
    rule: &'a crate::config::Route,
    pool: String,
    looked: Option<&'a Looked>,
}

/// The first rule that matches `user`, reading lookup answers where a rule has one.
fn first_match<'a>(
    cfg: &'a Config,
    routes: &'a [crate::config::Route],
    user: &str,
    answers: &'a Answers,
) -> Result<Matched<'a>, RouteError> {
    let bucket = bucket(user);
    let domain = user.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
    for (index, rule) in routes.iter().enumerate() {
        let m = &rule.matcher;
        let matches = m.users.as_ref().is_none_or(|u| u.contains(user))
            && m.domains
                .as_ref()
                .is_none_or(|ds| domain.as_ref().is_some_and(|d| ds.contains(d)))
            && m.percent.is_none_or(|p| bucket < p);
        if !matches {
            continue;
        }
        let Some(name) = &rule.lookup else {
            let pool = rule.pool.clone().unwrap_or_default();
            return Ok(Matched {
                index,
                rule,
                pool,
                looked: None,
            });
        };
        let looked = answers
            .get(name)
            .ok_or_else(|| RouteError::NeedsLookup(name.clone()))?;
        let row = match (&looked.row, looked.cache) {
            (Some(row), _) => row,
            (None, CacheState::Error) => {
                if cfg.lookups.get(name).is_some_and(|l| l.on_error_next) {
                    continue;
                }
                return Err(RouteError::LookupFailed(name.clone()));
            }
            // No row: the next rule.
            (None, _) => continue,
        };
        let pool = match (&rule.pool, &row.pool) {
            (Some(p), _) | (None, Some(p)) => p.clone(),
            (None, None) => return Err(bad_row(name, row, "it names no pool", "unknown_pool")),
        };
        if !cfg.pools.contains_key(&pool) {
            let reason = format!("there is no pool {pool:?}");
            return Err(bad_row(name, row, &reason, "unknown_pool"));
        }
        return Ok(Matched {
            index,
            rule,
            pool,
            looked: Some(looked),
        });
    }
    Err(RouteError::NoRoute(user.to_string()))
}

fn bad_row(lookup: &str, row: &Row, reason: &str, kind: &'static str) -> RouteError {
    RouteError::BadRow {
        lookup: lookup.to_string(),
        row: format!(
            "pool {:?} server {:?}",
            row.pool.as_deref().unwrap_or(""),
            row.server.as_deref().unwrap_or("")
        ),
        reason: reason.to_string(),
        kind,
    }
}

/// The pool's server for `protocol` that a lookup's `server` names: a host (the pool's
/// server on that host, as Dovecot's `host` field works for every protocol) or
/// `host:port` (exactly one of the pool's servers).
fn pinned_server(cfg: &Config, pool: &str, protocol: Protocol, server: &str) -> Option<String> {
    let servers = &cfg.pools.get(pool)?.protocols.get(&protocol)?.servers;
    let server = server.trim();
    let same_host = |h: &Host, want: &str| {
        let want = want.trim_start_matches('[').trim_end_matches(']');
        match (h, want.parse::<std::net::IpAddr>()) {
            (Host::Ip(ip), Ok(w)) => *ip == w,
            (Host::Name(n), Err(_)) => n.eq_ignore_ascii_case(want.trim_end_matches('.')),
            _ => false,
        }
    };
    // A bare IPv6 address has colons but no port.
    let host_port = match server.parse::<std::net::IpAddr>() {
        Ok(_) => None,
        Err(_) => server
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))),
    };
    let found = match host_port {
        Some((host, port)) => servers
            .iter()
            .find(|s| s.port == port && same_host(&s.host, host)),
        None => servers.iter().find(|s| same_host(&s.host, server)),
    };
    found.map(|s| s.as_str().to_string())
}

/// Decides where `login` goes, with the lookup answers asked so far.
pub fn route_with(
    cfg: &Config,
    login: &str,
    protocol: Protocol,
    now: i64,
    answers: &Answers,
) -> Result<Decision, RouteError> {
    let user = normalize(&cfg.users, login);
    let bucket = bucket(&user);
    let (stage, routes) = cfg.routes_at(now);
    let Matched {
        index: rule_index,
        rule,
        pool,
        looked,
    } = first_match(cfg, routes, &user, answers)?;
    let mut servers = servers_for(cfg, &pool, &user, protocol).map_err(|e| match looked {
        // The row named a pool that cannot serve this protocol: the row is wrong.
        Some(l) => bad_row(
            &l.name,
            l.row.as_ref().unwrap_or(&Row {
                pool: None,
                server: None,
            }),
            &e.to_string(),
            "unknown_pool",
        ),
        None => e,
    })?;
    let mut pinned = None;
    if let (Some(looked), Some(server)) =
        (looked, looked.and_then(|l| l.row.as_ref()?.server.as_ref()))
    {
        let Some(s) = pinned_server(cfg, &pool, protocol, server) else {
            let row = looked.row.as_ref().map_or(
                Row {
                    pool: None,
                    server: None,
                },
                Clone::clone,
            );
            let reason = format!("{server:?} is not one of pool {pool:?}'s {protocol} servers");
            return Err(bad_row(&looked.name, &row, &reason, "unknown_server"));
        };
        let strict = cfg
            .lookups
            .get(&looked.name)
            .is_some_and(|l| l.pinned_strict);
        if strict {
            servers = vec![s.clone()];
        } else {
            servers.retain(|x| *x != s);
            servers.insert(0, s.clone());
        }
        pinned = Some(s);
    }
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
        pool,
        servers,
        bucket,
        stage: stage.map(str::to_string),
        fallback,
        at: now,
        lookup: looked.cloned(),
        pinned,
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
        if let Some(p) = &self.pinned {
            out.push_str(&format!("pinned:   {p} (by the lookup's row)\n"));
        }
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
        if let Some(l) = &self.lookup {
            let row = match &l.row {
                Some(r) => format!(
                    "pool {}, server {}",
                    r.pool.as_deref().unwrap_or("-"),
                    r.server.as_deref().unwrap_or("-")
                ),
                None => "no row".into(),
            };
            out.push_str(&format!(
                "lookup:   {} ({row}; cache {})\n",
                l.name,
                l.cache.as_str()
            ));
        }
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

    fn lookup_cfg(extra: &str) -> Config {
        let text = format!(
            "
pools:
  new:
    imap: {{ servers: [\"127.0.0.10:143\", \"127.0.0.20:143\", \"mail3.test:143\"] }}
    pop3: {{ servers: [\"127.0.0.10:110\", \"127.0.0.20:110\"] }}
  legacy:
    imap: {{ servers: [\"127.0.0.11:143\"] }}
    pop3: {{ servers: [\"127.0.0.11:110\"] }}
lookups:
  mailboxes:
    postgres: {{ url: \"postgres://cutover@127.0.0.1/mail\", query: \"SELECT pool, server FROM r WHERE u = $1\" }}
    {extra}
  migrated:
    redis: {{ url: \"redis://127.0.0.1/0\", key: \"route:{{user}}\" }}
routes:
  - {{ users: [early], pool: legacy }}
  - {{ lookup: mailboxes }}
  - {{ lookup: migrated, pool: new }}
  - {{ pool: legacy }}
"
        );
        Config::from_text(&text, Path::new("t.yaml"), Path::new(".")).unwrap()
    }

    fn answer(name: &str, row: Option<(&str, Option<&str>)>, cache: CacheState) -> Looked {
        Looked {
            name: name.into(),
            row: row.map(|(p, s)| Row {
                pool: (!p.is_empty()).then(|| p.to_string()),
                server: s.map(str::to_string),
            }),
            cache,
            error: None,
        }
    }

    fn with(answers: &[Looked]) -> Answers {
        let mut a = Answers::default();
        for l in answers {
            a.insert(l.clone());
        }
        a
    }

    #[test]
    fn lookups_are_asked_in_rule_order_and_only_when_reached() {
        let c = lookup_cfg("");
        // A rule before the lookup decides: nothing to ask.
        let d = route(&c, "early", Protocol::Imap, 0).unwrap();
        assert_eq!(d.pool, "legacy");
        assert_eq!(
            route(&c, "alice", Protocol::Imap, 0),
            Err(RouteError::NeedsLookup("mailboxes".into()))
        );
        // No row: the next lookup is needed.
        let a = with(&[answer("mailboxes", None, CacheState::Miss)]);
        assert_eq!(
            route_with(&c, "alice", Protocol::Imap, 0, &a),
            Err(RouteError::NeedsLookup("migrated".into()))
        );
        // No key either: the default rule.
        let a = with(&[
            answer("mailboxes", None, CacheState::Miss),
            answer("migrated", None, CacheState::Hit),
        ]);
        let d = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap();
        assert_eq!((d.pool.as_str(), d.rule_index), ("legacy", 3));
        assert_eq!(d.lookup, None);
        // Any key of `migrated` means `new`, whatever it holds.
        let a = with(&[
            answer("mailboxes", None, CacheState::Miss),
            answer("migrated", Some(("", None)), CacheState::Hit),
        ]);
        let d = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap();
        assert_eq!((d.pool.as_str(), d.rule_index), ("new", 2));
        assert_eq!(d.lookup.unwrap().name, "migrated");
    }

    #[test]
    fn a_row_names_the_pool_and_pins_a_server() {
        let c = lookup_cfg("");
        let a = with(&[answer("mailboxes", Some(("new", None)), CacheState::Hit)]);
        let d = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap();
        assert_eq!(d.pool, "new");
        assert_eq!(d.pinned, None);
        assert_eq!(d.servers.len(), 3);
        // A host pins the pool's server on that host, for every protocol.
        for (protocol, want) in [
            (Protocol::Imap, "127.0.0.20:143"),
            (Protocol::Pop3, "127.0.0.20:110"),
        ] {
            let a = with(&[answer(
                "mailboxes",
                Some(("new", Some("127.0.0.20"))),
                CacheState::Miss,
            )]);
            let d = route_with(&c, "alice", protocol, 0, &a).unwrap();
            assert_eq!(d.servers[0], want);
            assert_eq!(d.pinned.as_deref(), Some(want));
            assert_eq!(
                d.servers.len(),
                if protocol == Protocol::Imap { 3 } else { 2 }
            );
        }
        // host:port must be exactly one of the pool's servers; names match without case.
        let a = with(&[answer(
            "mailboxes",
            Some(("new", Some("MAIL3.test:143"))),
            CacheState::Hit,
        )]);
        let d = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap();
        assert_eq!(d.servers[0], "mail3.test:143");
        for bad in [
            "127.0.0.20:144",
            "127.0.0.99",
            "elsewhere.test",
            "127.0.0.11",
        ] {
            let a = with(&[answer(
                "mailboxes",
                Some(("new", Some(bad))),
                CacheState::Hit,
            )]);
            let e = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap_err();
            assert!(
                matches!(
                    e,
                    RouteError::BadRow {
                        kind: "unknown_server",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert!(e.is_temporary());
        }
        // A pool that does not exist, or a row without a pool.
        for row in [("nowhere", None), ("", Some("127.0.0.20"))] {
            let a = with(&[answer("mailboxes", Some(row), CacheState::Hit)]);
            let e = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap_err();
            assert!(
                matches!(
                    e,
                    RouteError::BadRow {
                        kind: "unknown_pool",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn strict_pinning_keeps_only_the_pinned_server() {
        let c = lookup_cfg("pinned: strict");
        let a = with(&[answer(
            "mailboxes",
            Some(("new", Some("127.0.0.20:143"))),
            CacheState::Hit,
        )]);
        let d = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap();
        assert_eq!(d.servers, vec!["127.0.0.20:143"]);
    }

    #[test]
    fn a_failed_lookup_is_a_temporary_failure_or_the_next_rule() {
        let c = lookup_cfg("");
        let a = with(&[answer("mailboxes", None, CacheState::Error)]);
        let e = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap_err();
        assert_eq!(e, RouteError::LookupFailed("mailboxes".into()));
        assert!(e.is_temporary());
        let c = lookup_cfg("on_error: next");
        assert_eq!(
            route_with(&c, "alice", Protocol::Imap, 0, &a),
            Err(RouteError::NeedsLookup("migrated".into()))
        );
        // A stale answer is an answer.
        let a = with(&[answer("mailboxes", Some(("new", None)), CacheState::Stale)]);
        let d = route_with(&c, "alice", Protocol::Imap, 0, &a).unwrap();
        assert_eq!(d.pool, "new");
        assert_eq!(d.lookup.unwrap().cache, CacheState::Stale);
    }

    #[test]
    fn lookup_configuration_errors_name_the_key() {
        let bad = [
            ("routes:\n  - { lookup: nosuch }\n", "routes[0].lookup"),
            ("routes:\n  - { users: [a] }\n", "routes[0]"),
            (
                "lookups:\n  l: { postgres: { url: \"postgres://x/y\", query: \"SELECT pool FROM t WHERE u = 'x'\" } }\nroutes:\n  - { lookup: l }\n",
                "lookups.l.postgres.query",
            ),
            (
                "lookups:\n  l: { redis: { url: \"redis://x\", key: \"route\" } }\nroutes:\n  - { lookup: l }\n",
                "lookups.l.redis.key",
            ),
            (
                "lookups:\n  l: { on_error: maybe, redis: { url: \"redis://x\", key: \"r:{user}\" } }\nroutes:\n  - { lookup: l }\n",
                "lookups.l.on_error",
            ),
        ];
        for (tail, key) in bad {
            let text =
                format!("pools:\n  new:\n    imap: {{ servers: [\"127.0.0.10:143\"] }}\n{tail}");
            let e = Config::from_text(&text, Path::new("t.yaml"), Path::new("."))
                .expect_err(tail)
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
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

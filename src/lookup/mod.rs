//! Route lookups: where a user's pool (and maybe server) is read from the provider's own
//! database, PostgreSQL or Redis, when a login reaches a `{ lookup: NAME }` rule.
//!
//! Each lookup has its own answer cache ([`cache`]): a login of a user whose answer is
//! cached costs no query, the logins of one user share one query, and while the
//! database cannot answer a cached answer serves for `stale_for` past its TTL. Routing
//! itself stays pure ([`crate::route`]): it says which lookup it needs, the login
//! pipeline asks it here and routes again with the answer.
//!
//! Lookups are rebuilt on reload only when their own settings change (a changed query or
//! database starts with an empty cache); the others keep their caches and connections.

pub mod cache;
pub mod postgres;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::config::{self, Config, LookupSource, Protocol};
use crate::metrics as m;
use crate::route::{Answers, CacheState, Decision, Looked, RouteError, Row};
use cache::{Cache, Fetched, QueryError};

/// The database side of a lookup.
#[derive(Debug)]
enum Source {
    Postgres(postgres::Postgres),
    Redis(redis::Redis),
    /// Settings that cannot be used (the reason, without secrets): every query fails,
    /// and `on_error` decides.
    Unusable(String),
}

/// One named lookup: its settings, database and cache.
#[derive(Debug)]
pub struct Lookup {
    settings: config::Lookup,
    source: Source,
    cache: Cache,
    /// The query text takes the protocol (`$2`): answers are cached per protocol.
    per_protocol: bool,
    /// The last query got an answer from the database (or none was asked yet).
    up: std::sync::atomic::AtomicBool,
}

impl Lookup {
    fn new(settings: &config::Lookup) -> Lookup {
        let runtime = tokio::runtime::Handle::try_current();
        let (source, per_protocol) = match (&settings.source, runtime) {
            (
                LookupSource::Postgres {
                    url,
                    query,
                    connections,
                    ca_file,
                },
                Ok(rt),
            ) => (
                match postgres::Postgres::new(url, query, *connections, ca_file.as_deref(), rt) {
                    Ok(p) => Source::Postgres(p),
                    Err(e) => Source::Unusable(e.to_string()),
                },
                query.contains("$2"),
            ),
            (LookupSource::Redis { url, key, ca_file }, Ok(_)) => {
                install_crypto_provider();
                (
                    match redis::Redis::new(url, key, ca_file.as_deref()) {
                        Ok(r) => Source::Redis(r),
                        Err(e) => Source::Unusable(e),
                    },
                    false,
                )
            }
            (_, Err(_)) => (Source::Unusable("no runtime".into()), false),
        };
        Lookup {
            settings: settings.clone(),
            source,
            cache: Cache::new(settings.cache),
            per_protocol,
            up: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn key(&self, user: &str, protocol: Protocol) -> String {
        if self.per_protocol {
            format!("{user}\n{}", protocol.as_str())
        } else {
            user.to_string()
        }
    }

    /// Asks the database, bypassing the cache.
    pub async fn query(&self, user: &str, protocol: Protocol) -> Fetched {
        let name = self.settings.name.as_str();
        let started = Instant::now();
        let fetched = match &self.source {
            Source::Postgres(pg) => pg.query(user, protocol, self.settings.timeout).await,
            Source::Redis(r) => r.query(user, self.settings.timeout).await,
            Source::Unusable(why) => Err(QueryError::Failed(why.clone())),
        };
        let result = match &fetched {
            Ok(Some(_)) => "found",
            Ok(None) => "not_found",
            Err(QueryError::Timeout) => "timeout",
            Err(QueryError::Failed(_)) => "error",
        };
        metrics::histogram!(m::LOOKUP_SECONDS, "lookup" => name.to_string())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(m::LOOKUP_QUERIES, "lookup" => name.to_string(), "result" => result)
            .increment(1);
        let ok = fetched.is_ok();
        let was = self.up.swap(ok, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = &fetched {
            if was {
                tracing::warn!(lookup = name, error = %e, "lookup: the database does not answer");
            } else {
                tracing::debug!(lookup = name, error = %e, "lookup: the database still does not answer");
            }
        } else if !was {
            tracing::info!(lookup = name, "lookup: the database answers again");
        }
        fetched
    }

    /// `user`'s answer through the cache. `changed` says the database now answers
    /// something else than what was cached.
    pub async fn ask(&self, user: &str, protocol: Protocol) -> (Looked, bool) {
        let key = self.key(user, protocol);
        let answer = self.cache.get(&key, self.query(user, protocol)).await;
        let name = &self.settings.name;
        metrics::counter!(m::LOOKUP_CACHE, "lookup" => name.clone(), "result" => answer.state.as_str())
            .increment(1);
        let looked = Looked {
            name: name.clone(),
            row: answer.row,
            cache: answer.state,
            error: answer.error.map(|e| e.to_string()),
        };
        (looked, answer.changed)
    }

    /// The cached answer while fresh, without asking.
    pub fn peek(&self, user: &str, protocol: Protocol) -> Option<Looked> {
        let row = self.cache.peek(&self.key(user, protocol))?;
        Some(Looked {
            name: self.settings.name.clone(),
            row,
            cache: CacheState::Hit,
            error: None,
        })
    }

    /// Makes every cached answer of `user` stale (all protocols).
    pub fn forget(&self, user: &str) -> bool {
        if self.per_protocol {
            let mut any = false;
            for p in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
                any |= self.cache.forget(&self.key(user, p));
            }
            any
        } else {
            self.cache.forget(user)
        }
    }

    /// Answers cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

/// rustls needs a process-wide provider for the Redis client's TLS (`rediss://`).
fn install_crypto_provider() {
    crate::tls::install_default_provider();
}

/// Every lookup of the configuration in force.
#[derive(Debug, Default)]
pub struct Lookups {
    by_name: RwLock<BTreeMap<String, Arc<Lookup>>>,
}

impl Lookups {
    /// The lookups of `cfg` (connections open on first use).
    pub fn new(cfg: &Config) -> Lookups {
        let me = Lookups::default();
        me.sync(cfg);
        me
    }

    /// Follows a new configuration: lookups whose settings are unchanged keep their
    /// cache and connections; changed ones start afresh; removed ones go.
    pub fn sync(&self, cfg: &Config) {
        let mut map = match self.by_name.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.retain(|name, l| cfg.lookups.get(name) == Some(&l.settings));
        for (name, settings) in &cfg.lookups {
            if !map.contains_key(name) {
                map.insert(name.clone(), Arc::new(Lookup::new(settings)));
            }
        }
    }

    /// The lookup named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Lookup>> {
        match self.by_name.read() {
            Ok(g) => g.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        }
    }

    fn all(&self) -> Vec<Arc<Lookup>> {
        match self.by_name.read() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    /// `name`'s answer for `user` (an error answer for a lookup that does not exist).
    pub async fn ask(&self, name: &str, user: &str, protocol: Protocol) -> (Looked, bool) {
        match self.get(name) {
            Some(l) => l.ask(user, protocol).await,
            None => (
                Looked {
                    name: name.to_string(),
                    row: None,
                    cache: CacheState::Error,
                    error: Some("no such lookup".into()),
                },
                false,
            ),
        }
    }

    /// Makes `user`'s cached answers stale in every lookup; how many lookups had one.
    pub fn forget(&self, user: &str) -> usize {
        self.all().iter().filter(|l| l.forget(user)).count()
    }

    /// True when the configuration has lookups.
    pub fn is_empty(&self) -> bool {
        match self.by_name.read() {
            Ok(g) => g.is_empty(),
            Err(p) => p.into_inner().is_empty(),
        }
    }

    /// Scrape-time gauges: whether each lookup's database answers, and its cache size.
    pub fn collect(&self, t: &mut m::Text<'_>) {
        let all = self.all();
        if all.is_empty() {
            return;
        }
        t.family(m::LOOKUP_UP);
        for l in &all {
            let up = l.up.load(std::sync::atomic::Ordering::Relaxed);
            t.sample(
                m::LOOKUP_UP,
                &[("lookup", &l.settings.name)],
                f64::from(u8::from(up)),
            );
        }
        t.family(m::LOOKUP_CACHE_ENTRIES);
        for l in &all {
            t.sample(
                m::LOOKUP_CACHE_ENTRIES,
                &[("lookup", &l.settings.name)],
                l.cached() as f64,
            );
        }
    }
}

/// A routing with lookups: the decision (or why there is none) and every answer asked
/// on the way, in rule order (a lookup with no row lets the next rule decide).
#[derive(Debug)]
pub struct Routed {
    /// The decision.
    pub result: Result<Decision, RouteError>,
    /// The answers asked, the deciding one last.
    pub asked: Vec<Looked>,
    /// Some answer differs from the one cached before (the user's sessions may move).
    pub changed: bool,
}

impl Routed {
    /// As `cutover route --json` and the admin endpoint print it: the decision's fields
    /// (`pool`, `rule`, `servers` in try order with a pinned server first, `lookup`: the
    /// deciding answer with `name`, `row` and `cache`) and `lookups`, every answer asked;
    /// or `error` (and `temporary`) when no decision could be made.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = match &self.result {
            Ok(d) => serde_json::to_value(d).unwrap_or_default(),
            Err(e) => serde_json::json!({
                "error": e.to_string(),
                "temporary": e.is_temporary(),
            }),
        };
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "lookups".into(),
                serde_json::to_value(&self.asked).unwrap_or_default(),
            );
        }
        v
    }

    /// As `cutover route` prints it.
    pub fn explain(&self) -> String {
        let mut out = match &self.result {
            Ok(d) => d.explain(),
            Err(e) => format!("no decision: {e}\n"),
        };
        let deciding = self.result.as_ref().ok().and_then(|d| d.lookup.as_ref());
        for l in &self.asked {
            if Some(l) == deciding {
                continue;
            }
            let what = match (&l.row, l.cache) {
                (_, CacheState::Error) => format!(
                    "no answer ({})",
                    l.error.as_deref().unwrap_or("the database failed")
                ),
                (None, _) => "no row: the next rule decides".to_string(),
                (Some(_), _) => row_text(&l.row),
            };
            out.push_str(&format!(
                "asked:    lookup {}: {what} (cache {})\n",
                l.name,
                l.cache.as_str()
            ));
        }
        out
    }
}

/// Routes `login` (normalized: `user`), asking each lookup a rule reads when the
/// routing reaches the rule, through the caches.
pub async fn route(
    lookups: &Lookups,
    cfg: &Config,
    login: &str,
    user: &str,
    protocol: Protocol,
    now: i64,
) -> Routed {
    let mut answers = Answers::default();
    let mut asked = Vec::new();
    let mut changed = false;
    // Each lookup is asked once: a second `NeedsLookup` for it cannot happen.
    for _ in 0..=cfg.lookups.len() {
        let name = match crate::route::route_with(cfg, login, protocol, now, &answers) {
            Err(RouteError::NeedsLookup(name)) => name,
            result => {
                return Routed {
                    result,
                    asked,
                    changed,
                }
            }
        };
        // Boxed: the query's future (cache, single flight, the database client) is large,
        // and a login whose route reads no lookup should not carry its room.
        let (looked, is_new) = Box::pin(lookups.ask(&name, user, protocol)).await;
        tracing::debug!(lookup = %name, row = %row_text(&looked.row), cache = looked.cache.as_str(), "lookup answered");
        changed |= is_new;
        asked.push(looked.clone());
        answers.insert(looked);
    }
    Routed {
        result: Err(RouteError::NoRoute(user.to_string())),
        asked,
        changed,
    }
}

/// A row as logs show it.
pub fn row_text(row: &Option<Row>) -> String {
    match row {
        Some(r) => format!(
            "pool={} server={}",
            r.pool.as_deref().unwrap_or("-"),
            r.server.as_deref().unwrap_or("-")
        ),
        None => "no row".into(),
    }
}

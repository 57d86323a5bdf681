//! The answer cache of one lookup: positive and negative TTLs, a size bound, one query
//! per user however many of their logins arrive at once (single-flight), and answers
//! served past their TTL while the database cannot answer (stale-while-error).
//!
//! The cache knows nothing about databases: [`Cache::get`] takes the query as a future
//! and runs it only when no fresh answer is cached and no other login of the same user
//! is already waiting for one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::OnceCell;

use crate::config::LookupCache;
use crate::route::{CacheState, Row};

/// Shards of the table: logins of different users rarely wait for one another's lock.
const SHARDS: usize = 32;

/// Why a query gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Past the lookup's timeout.
    #[error("timed out")]
    Timeout,
    /// The database refused or could not be reached; the text says why (no secrets).
    #[error("{0}")]
    Failed(String),
}

/// What one query brought back: the row (None: no row) or why there is none.
pub type Fetched = Result<Option<Row>, QueryError>;

/// A cached answer.
struct Entry {
    row: Option<Row>,
    /// Used without asking until then.
    fresh_until: Instant,
    /// Used while the database cannot answer until then.
    usable_until: Instant,
}

/// One user's query in flight: every login of that user waits for the same cell.
type Flight = Arc<OnceCell<Fetched>>;

#[derive(Default)]
struct Shard {
    entries: HashMap<Box<str>, Entry>,
    flights: HashMap<Box<str>, Flight>,
}

/// The answer a login gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The row (None: no row, or no answer at all when `state` is `Error`).
    pub row: Option<Row>,
    /// Where it came from.
    pub state: CacheState,
    /// The database answered something else than the answer cached before (a user
    /// whose row changed: their open sessions may have to move).
    pub changed: bool,
    /// The query's error, when the database was asked and failed.
    pub error: Option<QueryError>,
}

/// The cache of one lookup.
pub struct Cache {
    settings: LookupCache,
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("settings", &self.settings)
            .field("entries", &self.len())
            .finish()
    }
}

impl Cache {
    /// An empty cache.
    pub fn new(settings: LookupCache) -> Cache {
        Cache {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, Shard> {
        let m = &self.shards[self.hasher.hash_one(user) as usize % SHARDS];
        match m.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Answers kept.
    pub fn len(&self) -> usize {
        (0..SHARDS)
            .map(|i| match self.shards[i].lock() {
                Ok(g) => g.entries.len(),
                Err(p) => p.into_inner().entries.len(),
            })
            .sum()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached answer for `user` while it is fresh, without asking anyone (what a
    /// reload uses to see where open sessions belong now).
    pub fn peek(&self, user: &str) -> Option<Option<Row>> {
        let shard = self.shard(user);
        let e = shard.entries.get(user)?;
        (Instant::now() < e.fresh_until).then(|| e.row.clone())
    }

    /// Makes `user`'s answer stale: the next login asks the database. The old answer
    /// still serves while the database cannot answer (within `stale_for`), and tells
    /// whether the new one changed.
    pub fn forget(&self, user: &str) -> bool {
        let mut shard = self.shard(user);
        match shard.entries.get_mut(user) {
            Some(e) => {
                let now = Instant::now();
                e.fresh_until = now;
                true
            }
            None => false,
        }
    }

    /// Drops every answer (a lookup whose database or query changed).
    pub fn clear(&self) {
        for m in self.shards.iter() {
            match m.lock() {
                Ok(mut g) => g.entries.clear(),
                Err(p) => p.into_inner().entries.clear(),
            }
        }
    }

    /// `user`'s answer: cached and fresh, else from `query` (run once however many
    /// logins of the user ask at the same time), else cached and stale.
    pub async fn get<F>(&self, user: &str, query: F) -> Answer
    where
        F: Future<Output = Fetched>,
    {
        let flight = {
            let mut shard = self.shard(user);
            if let Some(e) = shard.entries.get(user) {
                if Instant::now() < e.fresh_until {
                    return Answer {
                        row: e.row.clone(),
                        state: CacheState::Hit,
                        changed: false,
                        error: None,
                    };
                }
            }
            shard
                .flights
                .entry(user.into())
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let mut changed = false;
        let mut ran = false;
        let fetched = flight
            .get_or_init(|| async {
                ran = true;
                let fetched = query.await;
                changed = self.store(user, &flight, &fetched);
                fetched
            })
            .await
            .clone();
        // A login that waited for another's query cannot tell a change apart: only the
        // one that ran it reports it.
        let changed = ran && changed;
        match fetched {
            Ok(row) => Answer {
                row,
                state: CacheState::Miss,
                changed,
                error: None,
            },
            Err(e) => {
                let shard = self.shard(user);
                match shard.entries.get(user) {
                    Some(entry) if Instant::now() < entry.usable_until => Answer {
                        row: entry.row.clone(),
                        state: CacheState::Stale,
                        changed: false,
                        error: Some(e),
                    },
                    _ => Answer {
                        row: None,
                        state: CacheState::Error,
                        changed: false,
                        error: Some(e),
                    },
                }
            }
        }
    }

    /// Puts a query's answer in the table and ends the flight; true when it differs from
    /// the answer cached before.
    fn store(&self, user: &str, flight: &Flight, fetched: &Fetched) -> bool {
        let mut shard = self.shard(user);
        if shard
            .flights
            .get(user)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            shard.flights.remove(user);
        }
        let Ok(row) = fetched else {
            return false;
        };
        let now = Instant::now();
        let ttl = match row {
            Some(_) => self.settings.ttl,
            None => self.settings.negative_ttl,
        };
        let entry = Entry {
            row: row.clone(),
            fresh_until: now + ttl,
            usable_until: now + ttl + self.settings.stale_for,
        };
        let per_shard = self.settings.max_entries.div_ceil(SHARDS).max(1);
        if shard.entries.len() >= per_shard && !shard.entries.contains_key(user) {
            evict(&mut shard.entries, per_shard, now);
        }
        match shard.entries.insert(user.into(), entry) {
            Some(old) => old.row != *row,
            None => false,
        }
    }
}

/// Makes room in a full shard: drops what is no longer usable, then, if that is not
/// enough, arbitrary answers down to seven eighths of the bound (so a full cache does
/// not scan on every insert).
fn evict(entries: &mut HashMap<Box<str>, Entry>, per_shard: usize, now: Instant) {
    entries.retain(|_, e| now < e.usable_until);
    let target = per_shard - per_shard / 8 - 1;
    if entries.len() > target {
        let excess = entries.len() - target;
        let victims: Vec<Box<str>> = entries.keys().take(excess).cloned().collect();
        for k in victims {
            entries.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn settings(ttl_ms: u64, stale_ms: u64, max: usize) -> LookupCache {
        LookupCache {
            ttl: Duration::from_millis(ttl_ms),
            negative_ttl: Duration::from_millis(ttl_ms / 2),
            max_entries: max,
            stale_for: Duration::from_millis(stale_ms),
        }
    }

    fn row(pool: &str) -> Option<Row> {
        Some(Row {
            pool: Some(pool.into()),
            server: None,
        })
    }

    #[tokio::test]
    async fn hit_after_miss_and_requery_after_ttl() {
        let c = Cache::new(settings(50, 1000, 100));
        let queries = AtomicUsize::new(0);
        let q = || async {
            queries.fetch_add(1, Ordering::SeqCst);
            Ok(row("new"))
        };
        assert_eq!(c.get("u", q()).await.state, CacheState::Miss);
        let a = c.get("u", q()).await;
        assert_eq!((a.state, a.row), (CacheState::Hit, row("new")));
        assert_eq!(queries.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(c.get("u", q()).await.state, CacheState::Miss);
        assert_eq!(queries.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn stale_while_error_then_error() {
        let c = Cache::new(settings(10, 80, 100));
        c.get("u", async { Ok(row("new")) }).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let down = || async { Err(QueryError::Timeout) };
        let a = c.get("u", down()).await;
        assert_eq!((a.state, a.row), (CacheState::Stale, row("new")));
        tokio::time::sleep(Duration::from_millis(80)).await;
        let a = c.get("u", down()).await;
        assert_eq!((a.state, a.row), (CacheState::Error, None));
        // Never cached at all: an error.
        assert_eq!(c.get("other", down()).await.state, CacheState::Error);
    }

    #[tokio::test]
    async fn one_query_for_many_logins_of_one_user() {
        let c = Arc::new(Cache::new(settings(10_000, 0, 100)));
        let queries = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (c, queries) = (c.clone(), queries.clone());
            tasks.push(tokio::spawn(async move {
                c.get("u", async {
                    queries.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok(row("new"))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().row, row("new"));
        }
        assert_eq!(queries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_cancelled_query_is_taken_over() {
        let c = Arc::new(Cache::new(settings(10_000, 0, 100)));
        let slow = c.clone();
        let first = tokio::spawn(async move {
            slow.get("u", async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(row("never"))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        let _ = first.await;
        let a = c.get("u", async { Ok(row("new")) }).await;
        assert_eq!(a.row, row("new"));
    }

    #[tokio::test]
    async fn forget_requeries_and_reports_a_change() {
        let c = Cache::new(settings(60_000, 60_000, 100));
        c.get("u", async { Ok(row("legacy")) }).await;
        assert!(c.forget("u"));
        assert_eq!(c.peek("u"), None, "a forgotten answer is not fresh");
        let a = c.get("u", async { Ok(row("new")) }).await;
        assert_eq!((a.state, a.changed), (CacheState::Miss, true));
        c.forget("u");
        let a = c.get("u", async { Ok(row("new")) }).await;
        assert!(!a.changed, "same answer: no change");
        c.forget("u");
        let a = c.get("u", async { Err(QueryError::Timeout) }).await;
        assert_eq!((a.state, a.row), (CacheState::Stale, row("new")));
    }

    #[tokio::test]
    async fn negative_answers_are_cached_for_their_own_ttl() {
        let c = Cache::new(settings(200, 0, 100));
        c.get("nobody", async { Ok(None) }).await;
        assert_eq!(c.peek("nobody"), Some(None));
        tokio::time::sleep(Duration::from_millis(110)).await;
        assert_eq!(c.peek("nobody"), None, "negative TTL is half the TTL here");
    }

    #[tokio::test]
    async fn size_is_bounded() {
        let c = Cache::new(settings(60_000, 0, 320));
        for i in 0..5000 {
            c.get(&format!("user{i}"), async { Ok(row("new")) }).await;
        }
        assert!(c.len() <= 320, "{} answers kept", c.len());
        assert!(c.len() >= 200, "{} answers kept", c.len());
    }
}

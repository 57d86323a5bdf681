//! Metric handles of the session and login path, made once per label set.
//!
//! `metrics::counter!(NAME, "pool" => pool.clone(), ...)` builds a key (a vector of owned
//! labels), hashes it and looks it up in the recorder's registry on every call: a dozen
//! allocations and lookups per login. The handles here are looked up by borrowed names
//! (no allocation once made) and are the same series the macros would return.
//!
//! Handles are kept only once [`super::install`] has put the recorder in place: a handle
//! made before that would stay a no-op for the life of the process.
//!
//! Each thread keeps its own handles (a session worker is one thread): a login takes no
//! lock another CPU also takes. Handles made on two threads for one label set are the
//! same series (the recorder's registry makes each series once).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram};

use crate::config::Protocol;

static RECORDER_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Called by [`super::install`] once the recorder is the global one.
pub(super) fn recorder_installed() {
    RECORDER_INSTALLED.store(true, Ordering::Release);
}

fn caching() -> bool {
    RECORDER_INSTALLED.load(Ordering::Acquire)
}

fn protocol_index(p: Protocol) -> usize {
    match p {
        Protocol::Imap => 0,
        Protocol::Pop3 => 1,
        Protocol::Smtp => 2,
    }
}

/// What a login ended with (the `result` label of `cutover_logins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginLabel {
    /// Logged in.
    Ok,
    /// The backend rejected the credentials.
    AuthFailed,
    /// No server of the pool (or its fallback) could be used.
    BackendUnavailable,
}

impl LoginLabel {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginLabel::Ok => "ok",
            LoginLabel::AuthFailed => "auth_failed",
            LoginLabel::BackendUnavailable => "backend_unavailable",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Per (listener, protocol): connections.
pub struct ListenerHandles {
    /// `cutover_connections_total`.
    pub connections: Counter,
    /// `cutover_connections_active`.
    pub connections_active: Gauge,
}

/// `cutover_logins_total` of one rule: [result][tls].
type LoginCounters = [[Counter; 2]; 3];

/// Per (pool, protocol): sessions, bytes, login timings and counts.
pub struct PoolHandles {
    pool: String,
    protocol: Protocol,
    /// `cutover_sessions_active`.
    pub sessions_active: Gauge,
    /// `cutover_session_duration_seconds`.
    pub session_seconds: Histogram,
    /// `cutover_relayed_bytes_total{direction="client_to_backend"}`.
    pub bytes_up: Counter,
    /// `cutover_relayed_bytes_total{direction="backend_to_client"}`.
    pub bytes_down: Counter,
    /// `cutover_login_backend_seconds`.
    pub login_backend_seconds: Histogram,
    logins: Mutex<HashMap<String, Arc<LoginCounters>>>,
    connect_seconds: Mutex<HashMap<String, Histogram>>,
}

impl PoolHandles {
    fn new(pool: &str, protocol: Protocol) -> Self {
        let (p, proto) = (pool.to_string(), protocol.as_str());
        PoolHandles {
            sessions_active: metrics::gauge!(super::SESSIONS_ACTIVE, "pool" => p.clone(), "protocol" => proto),
            session_seconds: metrics::histogram!(super::SESSION_SECONDS, "pool" => p.clone(), "protocol" => proto),
            bytes_up: metrics::counter!(super::BYTES, "pool" => p.clone(), "protocol" => proto, "direction" => "client_to_backend"),
            bytes_down: metrics::counter!(super::BYTES, "pool" => p.clone(), "protocol" => proto, "direction" => "backend_to_client"),
            login_backend_seconds: metrics::histogram!(super::LOGIN_BACKEND_SECONDS, "protocol" => proto, "pool" => p.clone()),
            pool: p,
            protocol,
            logins: Mutex::new(HashMap::new()),
            connect_seconds: Mutex::new(HashMap::new()),
        }
    }

    /// `cutover_logins_total{protocol, pool, rule, result, tls}`.
    pub fn logins(&self, rule: &str, result: LoginLabel, tls: bool) -> Counter {
        let make = || -> LoginCounters {
            let one = |r: LoginLabel, t: bool| metrics::counter!(super::LOGINS, "protocol" => self.protocol.as_str(), "pool" => self.pool.clone(), "rule" => rule.to_string(), "result" => r.as_str(), "tls" => if t { "true" } else { "false" });
            let row = |r| [one(r, false), one(r, true)];
            [
                row(LoginLabel::Ok),
                row(LoginLabel::AuthFailed),
                row(LoginLabel::BackendUnavailable),
            ]
        };
        let counters = cached_in(&self.logins, rule, || Arc::new(make()));
        counters[result.index()][usize::from(tls)].clone()
    }

    /// `cutover_backend_connect_seconds{pool, protocol, server}`.
    pub fn connect_seconds(&self, server: &str) -> Histogram {
        cached_in(
            &self.connect_seconds,
            server,
            || metrics::histogram!(super::BACKEND_CONNECT_SECONDS, "pool" => self.pool.clone(), "protocol" => self.protocol.as_str(), "server" => server.to_string()),
        )
    }
}

/// One thread's handles.
#[derive(Default)]
struct Cache {
    /// By protocol, then name (a reload may give a listener name another protocol).
    listeners: [HashMap<String, Arc<ListenerHandles>>; 3],
    pools: [HashMap<String, Arc<PoolHandles>>; 3],
    proxy_seconds: [Option<Histogram>; 3],
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// The handle made for `key` in this thread's map (chosen by `map`), made by `make` the
/// first time (every time while no recorder is installed).
fn cached<H: Clone>(
    map: impl FnOnce(&mut Cache) -> &mut HashMap<String, H>,
    key: &str,
    make: impl FnOnce() -> H,
) -> H {
    if !caching() {
        return make();
    }
    CACHE.with_borrow_mut(|cache| {
        let map = map(cache);
        if let Some(h) = map.get(key) {
            return h.clone();
        }
        let h = make();
        map.insert(key.to_string(), h.clone());
        h
    })
}

/// The handle made for `key` in a map of one `PoolHandles` (used by one thread, so its
/// lock is never contended).
fn cached_in<H: Clone>(map: &Mutex<HashMap<String, H>>, key: &str, make: impl FnOnce() -> H) -> H {
    if !caching() {
        return make();
    }
    let mut map = match map.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(h) = map.get(key) {
        return h.clone();
    }
    let h = make();
    map.insert(key.to_string(), h.clone());
    h
}

/// The handles of a listener.
pub fn listener(name: &str, protocol: Protocol) -> Arc<ListenerHandles> {
    let i = protocol_index(protocol);
    cached(
        |c| &mut c.listeners[i],
        name,
        || {
            let labels = [
                ("listener", name.to_string()),
                ("protocol", protocol.as_str().to_string()),
            ];
            Arc::new(ListenerHandles {
                connections: metrics::counter!(super::CONNECTIONS, &labels),
                connections_active: metrics::gauge!(super::CONNECTIONS_ACTIVE, &labels),
            })
        },
    )
}

/// The handles of a pool for one protocol.
pub fn pool(name: &str, protocol: Protocol) -> Arc<PoolHandles> {
    let i = protocol_index(protocol);
    cached(
        |c| &mut c.pools[i],
        name,
        || Arc::new(PoolHandles::new(name, protocol)),
    )
}

/// `cutover_login_proxy_seconds{protocol}`.
pub fn login_proxy_seconds(protocol: Protocol) -> Histogram {
    let make = || metrics::histogram!(super::LOGIN_PROXY_SECONDS, "protocol" => protocol.as_str());
    if !caching() {
        return make();
    }
    let i = protocol_index(protocol);
    CACHE.with_borrow_mut(|c| c.proxy_seconds[i].get_or_insert_with(make).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_indexes_are_distinct() {
        const PROTOCOLS: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];
        let mut seen: Vec<usize> = PROTOCOLS.iter().map(|p| protocol_index(*p)).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn login_results_index_their_row() {
        for (i, r) in [
            LoginLabel::Ok,
            LoginLabel::AuthFailed,
            LoginLabel::BackendUnavailable,
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(r.index(), i);
        }
    }
}

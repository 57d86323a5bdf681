//! Health of backend servers: passive (login attempts that found a server unavailable)
//! and active (a greeting probe at an interval, with HAProxy-style rise/fall counts).
//!
//! State lives in a [`Registry`] keyed by (pool, protocol, server) that outlives config
//! reloads, so a reload does not forget that a server is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Health, Protocol};
use crate::proto::BackendTls;

/// What the proxy knows about one backend server.
#[derive(Debug)]
pub struct ServerState {
    pool: String,
    protocol: Protocol,
    server: String,
    epoch: Instant,
    up: AtomicBool,
    fails: AtomicU32,
    oks: AtomicU32,
    down_until_ms: AtomicU64,
    capabilities: Mutex<Vec<String>>,
    /// IMAP: the capability list last read before login (after TLS when required), with
    /// the TLS mode it was read under (a reload may change the pool's).
    login_capabilities: Mutex<Option<(BackendTls, Arc<str>)>>,
}

impl ServerState {
    fn new(pool: &str, protocol: Protocol, server: &str, epoch: Instant) -> Self {
        ServerState {
            pool: pool.to_string(),
            protocol,
            server: server.to_string(),
            epoch,
            up: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            capabilities: Mutex::new(Vec::new()),
            login_capabilities: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!(pool = %self.pool, protocol = %self.protocol, server = %self.server, "backend up");
            } else {
                tracing::warn!(pool = %self.pool, protocol = %self.protocol, server = %self.server, "backend down");
            }
        }
    }

    /// True if the server is marked up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether logins should try this server first. With active checks only a probe
    /// brings a down server back; without them it is retried after `down_for`.
    pub fn is_available(&self, health: &Health) -> bool {
        self.is_up()
            || (health.interval.is_zero()
                && self.now_ms() >= self.down_until_ms.load(Ordering::Acquire))
    }

    /// A login attempt or probe found the server unavailable.
    pub fn record_failure(&self, health: &Health) {
        self.oks.store(0, Ordering::Release);
        let fails = self.fails.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if fails >= health.fall {
            let until = self
                .now_ms()
                .saturating_add(health.down_for.as_millis() as u64);
            self.down_until_ms.store(until, Ordering::Release);
            self.set_up(false);
        }
    }

    /// A login succeeded on the server: it is evidently up.
    pub fn record_login_success(&self) {
        self.fails.store(0, Ordering::Release);
        if !self.is_up() {
            self.set_up(true);
        }
    }

    /// An active probe succeeded.
    pub fn record_probe_success(&self, health: &Health, capabilities: Vec<String>) {
        self.fails.store(0, Ordering::Release);
        if let Ok(mut caps) = self.capabilities.lock() {
            *caps = capabilities;
        }
        let oks = self.oks.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if !self.is_up() && oks >= health.rise {
            self.set_up(true);
        }
    }

    /// IMAP: the capability list the server advertised before login at the last probe
    /// or login that read one (see [`crate::proto::BackendPolicy::known_capabilities`]).
    /// Only a list read under the same TLS mode counts.
    pub fn login_capabilities(&self, tls: BackendTls) -> Option<Arc<str>> {
        let slot = match self.login_capabilities.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &*slot {
            Some((mode, caps)) if *mode == tls => Some(caps.clone()),
            _ => None,
        }
    }

    /// Remembers the list a probe or login read from the server under `tls`.
    pub fn learn_login_capabilities(&self, tls: BackendTls, caps: &str) {
        let mut slot = match self.login_capabilities.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let same = matches!(&*slot, Some((mode, known)) if *mode == tls && **known == *caps);
        if !same {
            *slot = Some((tls, Arc::from(caps)));
        }
    }

    /// What the server advertised at its last successful probe.
    pub fn capabilities(&self) -> Vec<String> {
        self.capabilities
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}

/// Every server's state, shared by sessions and health checkers, kept across reloads.
#[derive(Debug)]
pub struct Registry {
    epoch: Instant,
    /// Per pool: its servers' states (a handful: found by a scan, no key allocation on the
    /// login path).
    map: Mutex<HashMap<String, Vec<Arc<ServerState>>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            epoch: Instant::now(),
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl Registry {
    /// The state of one server, created (up) on first use.
    pub fn get(&self, pool: &str, protocol: Protocol, server: &str) -> Arc<ServerState> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let found = map.get(pool).and_then(|states| {
            states
                .iter()
                .find(|s| s.protocol == protocol && s.server == server)
        });
        if let Some(state) = found {
            return state.clone();
        }
        let state = Arc::new(ServerState::new(pool, protocol, server, self.epoch));
        map.entry(pool.to_string()).or_default().push(state.clone());
        state
    }
}

/// How long to wait between probes of one server, with a little per-server jitter so
/// the probes of many servers do not align.
pub fn probe_delay(interval: Duration, server: &str) -> Duration {
    let jitter = crate::config::stable_hash(b"probe", server) % 100;
    interval + interval * jitter as u32 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_capabilities_belong_to_the_tls_mode_they_were_read_under() {
        let reg = Registry::default();
        let state = reg.get("p", Protocol::Imap, "green:143");
        assert_eq!(state.login_capabilities(BackendTls::None), None);
        state.learn_login_capabilities(BackendTls::StartTls, "IMAP4rev1 AUTH=PLAIN");
        assert_eq!(
            state.login_capabilities(BackendTls::StartTls).as_deref(),
            Some("IMAP4rev1 AUTH=PLAIN")
        );
        // A reload that turns the pool's TLS off must not use the list read over TLS.
        assert_eq!(state.login_capabilities(BackendTls::None), None);
        // Kept across lookups of the same server (the registry outlives reloads).
        let again = reg.get("p", Protocol::Imap, "green:143");
        state.learn_login_capabilities(BackendTls::None, "IMAP4rev1 LOGINDISABLED");
        assert_eq!(
            again.login_capabilities(BackendTls::None).as_deref(),
            Some("IMAP4rev1 LOGINDISABLED")
        );
        assert_eq!(again.login_capabilities(BackendTls::StartTls), None);
    }
}

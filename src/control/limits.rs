//! Protection that needs memory across connections: how many connections are open (in
//! all and per client address), failed-login throttling against password spraying, and
//! the detector that spreads disconnects when a backend with many sessions dies. All maps
//! are bounded.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ConnLimits, Throttle};

/// Most keys the throttle and the disconnect detector remember.
const MAX_KEYS: usize = 100_000;

/// Why a connection was not admitted (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// All listeners together are at `max_connections`.
    MaxConnections,
    /// This address is at `max_connections_per_ip`.
    MaxPerIp,
}

impl OverLimit {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OverLimit::MaxConnections => "max_connections",
            OverLimit::MaxPerIp => "max_per_ip",
        }
    }
}

/// Open client connections.
#[derive(Debug, Default)]
pub struct Admission {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; releases its place when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut m) = self.admission.per_ip.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

impl Admission {
    /// Admits a connection from `ip` if the limits allow.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ConnLimits) -> Result<Ticket, OverLimit> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(OverLimit::MaxConnections);
        }
        let Ok(mut m) = self.per_ip.lock() else {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(OverLimit::MaxConnections);
        };
        let n = m.entry(ip).or_insert(0);
        if *n >= limits.max_per_ip {
            drop(m);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(OverLimit::MaxPerIp);
        }
        *n += 1;
        Ok(Ticket {
            admission: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// Failed-login counts per address and per user name.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    map: Mutex<HashMap<Key, Failures>>,
}

impl AuthThrottle {
    /// If `ip` or `user` is blocked now, for how much longer.
    pub fn blocked(&self, ip: IpAddr, user: &str, now: Instant) -> Option<Duration> {
        let m = self.map.lock().ok()?;
        [Key::Ip(ip), Key::User(user.to_string())]
            .iter()
            .filter_map(|k| m.get(k)?.blocked_until)
            .filter(|until| *until > now)
            .max()
            .map(|until| until - now)
    }

    /// Records a failed login; returns how long to wait before answering it.
    pub fn failure(&self, ip: IpAddr, user: &str, cfg: &Throttle, now: Instant) -> Duration {
        let Ok(mut m) = self.map.lock() else {
            return cfg.delay;
        };
        if m.len() >= MAX_KEYS {
            m.retain(|_, f| {
                now.duration_since(f.since) < cfg.window || f.blocked_until.is_some_and(|u| u > now)
            });
            if m.len() >= MAX_KEYS {
                m.clear();
            }
        }
        let mut worst = 0;
        for (key, limit) in [
            (Key::Ip(ip), cfg.ip_failures),
            (Key::User(user.to_string()), cfg.user_failures),
        ] {
            if limit == 0 {
                continue;
            }
            let f = m.entry(key).or_insert(Failures {
                since: now,
                count: 0,
                blocked_until: None,
            });
            if now.duration_since(f.since) >= cfg.window {
                *f = Failures {
                    since: now,
                    count: 0,
                    blocked_until: f.blocked_until.filter(|u| *u > now),
                };
            }
            f.count = f.count.saturating_add(1);
            if f.count >= limit {
                f.blocked_until = Some(now + cfg.block);
            }
            worst = worst.max(f.count);
        }
        tarpit(cfg, worst)
    }

    /// Blocks `ip` (or `user`) until `until`, as another proxy of the fleet decided.
    pub fn block(&self, ip: Option<IpAddr>, user: Option<&str>, until: Instant) {
        let Ok(mut m) = self.map.lock() else { return };
        let keys = ip
            .map(Key::Ip)
            .into_iter()
            .chain(user.map(|u| Key::User(u.to_string())));
        for key in keys {
            let f = m.entry(key).or_insert(Failures {
                since: until,
                count: 0,
                blocked_until: None,
            });
            f.blocked_until = Some(f.blocked_until.map_or(until, |u| u.max(until)));
        }
    }

    /// A successful login clears the user's failures (not the address's: many users may
    /// share one address).
    pub fn success(&self, user: &str) {
        if let Ok(mut m) = self.map.lock() {
            // Usually nothing failed lately: no key to build.
            if !m.is_empty() {
                m.remove(&Key::User(user.to_string()));
            }
        }
    }
}

/// How long to wait before answering a failed login when the worst of its counters (the
/// address's, the user's) stands at `worst`: `delay`, doubling per failure, capped.
pub fn tarpit(cfg: &Throttle, worst: u32) -> Duration {
    if worst == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32
        .checked_shl(worst.saturating_sub(1).min(16))
        .unwrap_or(u32::MAX);
    cfg.delay.saturating_mul(factor).min(cfg.max_delay)
}

/// Notices when many sessions of one backend server end from the backend's side at once
/// (the server died) so their client disconnects can be spread out, as Dovecot's
/// `login_proxy_max_disconnect_delay` does, instead of a reconnect storm on the failover
/// host.
#[derive(Debug, Default)]
pub struct Disconnects {
    recent: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// Backend-side ends of one server within this window count as one burst.
const BURST_WINDOW: Duration = Duration::from_secs(2);
/// More than this many in the window is a burst.
const BURST_SIZE: usize = 3;

impl Disconnects {
    /// Records that a session of `server` ended from the backend's side; returns how long
    /// to wait before closing the client (zero unless this is part of a burst).
    pub fn backend_closed(
        &self,
        server: &str,
        spread: Duration,
        seed: u64,
        now: Instant,
    ) -> Duration {
        if spread.is_zero() {
            return Duration::ZERO;
        }
        let Ok(mut m) = self.recent.lock() else {
            return Duration::ZERO;
        };
        if m.len() >= MAX_KEYS {
            m.clear();
        }
        let q = m.entry(server.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > BURST_WINDOW)
        {
            q.pop_front();
        }
        q.push_back(now);
        if q.len() > 10_000 {
            q.pop_front();
        }
        if q.len() <= BURST_SIZE {
            return Duration::ZERO;
        }
        // Spread deterministically by session (no RNG needed): an even spread over the window.
        let h = crate::config::stable_hash(b"disconnect", &seed.to_string());
        let millis = spread.as_millis().max(1) as u64;
        Duration::from_millis(h % millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_limits_total_and_per_ip() {
        let a = Arc::new(Admission::default());
        let limits = ConnLimits {
            max_connections: 3,
            max_per_ip: 2,
            tls_handshakes_per_worker: 16,
        };
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = a.admit(ip1, &limits).unwrap();
        let _t2 = a.admit(ip1, &limits).unwrap();
        assert_eq!(a.admit(ip1, &limits).unwrap_err(), OverLimit::MaxPerIp);
        let _t3 = a.admit(ip2, &limits).unwrap();
        assert_eq!(
            a.admit(ip2, &limits).unwrap_err(),
            OverLimit::MaxConnections
        );
        drop(t1);
        let _t4 = a.admit(ip2, &limits).unwrap();
        assert_eq!(a.open(), 3);
    }

    #[test]
    fn throttle_delays_grow_then_block_and_success_clears_the_user() {
        let t = AuthThrottle::default();
        let cfg = Throttle {
            ip_failures: 5,
            user_failures: 3,
            window: Duration::from_secs(60),
            block: Duration::from_secs(30),
            delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
        };
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let now = Instant::now();
        assert_eq!(t.failure(ip, "bob", &cfg, now), Duration::from_millis(100));
        assert_eq!(t.failure(ip, "bob", &cfg, now), Duration::from_millis(200));
        assert!(t.blocked(ip, "bob", now).is_none());
        assert_eq!(t.failure(ip, "bob", &cfg, now), Duration::from_millis(350));
        assert!(t.blocked(ip, "bob", now).is_some(), "user blocked after 3");
        assert!(
            t.blocked("10.0.0.10".parse().unwrap(), "alice", now)
                .is_none(),
            "others unaffected"
        );
        // Blocks end.
        assert!(t
            .blocked(ip, "bob", now + Duration::from_secs(31))
            .is_none());
        t.success("bob");
        assert!(t.blocked(ip, "bob", now).is_none());
        // The address keeps counting across user names (spraying).
        for u in ["a", "b"] {
            t.failure(ip, u, &cfg, now);
        }
        assert!(
            t.blocked(ip, "carol", now).is_some(),
            "address blocked after 5"
        );
    }

    #[test]
    fn disconnects_spread_only_in_a_burst() {
        let d = Disconnects::default();
        let now = Instant::now();
        let spread = Duration::from_secs(10);
        let delays: Vec<Duration> = (0..50)
            .map(|i| d.backend_closed("green:143", spread, i, now))
            .collect();
        assert!(
            delays[..3].iter().all(|d| d.is_zero()),
            "a few ends are prompt"
        );
        let later = &delays[3..];
        assert!(later.iter().all(|d| *d < spread));
        let distinct: std::collections::HashSet<_> = later.iter().map(|d| d.as_secs()).collect();
        assert!(distinct.len() >= 5, "spread over the window: {distinct:?}");
        assert!(d.backend_closed("other:143", spread, 1, now).is_zero());
    }
}

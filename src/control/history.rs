//! Who logged in where: per user, the last time seen per (pool, protocol, listener, TLS),
//! for the stragglers report; and per client address, the last POP3/IMAP login, for the
//! pop-before-smtp bridge. Both are bounded: when full, the oldest quarter is forgotten.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::Serialize;

use super::state::Login;
use crate::config::Protocol;

/// Most client addresses remembered for the bridge.
const MAX_ADDRESSES: usize = 200_000;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    pool: String,
    protocol: Protocol,
    listener: String,
    tls: bool,
    last: i64,
}

/// One line of the stragglers report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Straggler {
    /// The proxy that saw the login (`instance_name`).
    pub instance: String,
    /// Normalized user.
    pub user: String,
    /// Pool that served the login.
    pub pool: String,
    /// Protocol.
    pub protocol: &'static str,
    /// Listener.
    pub listener: String,
    /// Whether the client used TLS.
    pub tls: bool,
    /// Last time seen (RFC 3339).
    pub last_seen: String,
    /// Why listed: `legacy_pool`, `no_tls` or both.
    pub why: Vec<&'static str>,
}

/// The history.
#[derive(Debug)]
pub struct History {
    max_users: usize,
    users: Mutex<HashMap<String, Vec<Seen>>>,
    addresses: Mutex<HashMap<IpAddr, (String, i64)>>,
}

impl History {
    /// An empty history remembering at most `max_users` users.
    pub fn new(max_users: usize) -> Self {
        History {
            max_users: max_users.max(1),
            users: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Records a successful login.
    pub fn record(&self, l: &Login<'_>) {
        if let Ok(mut users) = self.users.lock() {
            // The key is allocated only for a user not seen before.
            if !users.contains_key(l.user) {
                if users.len() >= self.max_users {
                    evict(&mut users, |v| v.iter().map(|s| s.last).max().unwrap_or(0));
                }
                users.insert(l.user.to_string(), Vec::new());
            }
            let Some(list) = users.get_mut(l.user) else {
                return;
            };
            match list.iter_mut().find(|s| {
                s.pool == l.pool
                    && s.protocol == l.protocol
                    && s.listener == l.listener
                    && s.tls == l.tls
            }) {
                Some(s) => s.last = l.now_ms,
                None => list.push(Seen {
                    pool: l.pool.to_string(),
                    protocol: l.protocol,
                    listener: l.listener.to_string(),
                    tls: l.tls,
                    last: l.now_ms,
                }),
            }
        }
        if l.protocol != Protocol::Smtp {
            if let Ok(mut addrs) = self.addresses.lock() {
                if addrs.len() >= MAX_ADDRESSES && !addrs.contains_key(&l.ip) {
                    evict(&mut addrs, |v| v.1);
                }
                match addrs.get_mut(&l.ip) {
                    Some((user, when)) if user == l.user => *when = l.now_ms,
                    _ => {
                        addrs.insert(l.ip, (l.user.to_string(), l.now_ms));
                    }
                }
            }
        }
    }

    /// The user who last logged in by POP3 or IMAP from `ip`, if within `window_ms`.
    pub fn recent_login(&self, ip: IpAddr, window_ms: i64, now_ms: i64) -> Option<String> {
        let addrs = self.addresses.lock().ok()?;
        let (user, when) = addrs.get(&ip)?;
        (now_ms - when <= window_ms).then(|| user.clone())
    }

    /// Users seen since `since_ms` on a legacy pool (per `is_legacy`) or without TLS.
    pub fn stragglers(&self, since_ms: i64, is_legacy: impl Fn(&str) -> bool) -> Vec<Straggler> {
        let Ok(users) = self.users.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (user, seen) in users.iter() {
            for s in seen.iter().filter(|s| s.last >= since_ms) {
                let mut why = Vec::new();
                if is_legacy(&s.pool) {
                    why.push("legacy_pool");
                }
                if !s.tls {
                    why.push("no_tls");
                }
                if !why.is_empty() {
                    out.push(Straggler {
                        instance: String::new(),
                        user: user.clone(),
                        pool: s.pool.clone(),
                        protocol: s.protocol.as_str(),
                        listener: s.listener.clone(),
                        tls: s.tls,
                        last_seen: crate::config::rfc3339::format(s.last / 1000),
                        why,
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            a.user
                .cmp(&b.user)
                .then(a.protocol.cmp(b.protocol))
                .then(a.listener.cmp(&b.listener))
        });
        out
    }

    /// Most users remembered.
    pub fn max_users(&self) -> usize {
        self.max_users
    }

    /// Users remembered.
    pub fn users(&self) -> usize {
        self.users.lock().map(|u| u.len()).unwrap_or(0)
    }
}

/// Forgets the oldest quarter of a full map (amortized O(1) per insert).
fn evict<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, age: impl Fn(&V) -> i64) {
    let mut ages: Vec<i64> = map.values().map(&age).collect();
    let q = ages.len() / 4;
    if q == 0 {
        map.clear();
        return;
    }
    let (_, cutoff, _) = ages.select_nth_unstable(q);
    let cutoff = *cutoff;
    map.retain(|_, v| age(v) > cutoff);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login<'a>(
        user: &'a str,
        pool: &'a str,
        protocol: Protocol,
        tls: bool,
        now_ms: i64,
    ) -> Login<'a> {
        Login {
            user,
            pool,
            protocol,
            listener: "imap",
            tls,
            legacy: pool == "legacy",
            ip: "127.0.0.7".parse().unwrap(),
            now_ms,
        }
    }

    #[test]
    fn stragglers_are_legacy_or_plaintext_within_the_window() {
        let h = History::new(100);
        h.record(&login("old", "legacy", Protocol::Pop3, true, 10));
        h.record(&login("bob", "legacy", Protocol::Imap, true, 1000));
        h.record(&login("joe", "new", Protocol::Imap, false, 1000));
        h.record(&login("ann", "new", Protocol::Imap, true, 1000));
        let s = h.stragglers(500, |p| p == "legacy");
        let users: Vec<_> = s.iter().map(|s| (s.user.as_str(), s.why.clone())).collect();
        assert_eq!(
            users,
            vec![("bob", vec!["legacy_pool"]), ("joe", vec!["no_tls"])]
        );
        assert_eq!(
            h.recent_login("127.0.0.7".parse().unwrap(), 600, 1100)
                .as_deref(),
            Some("ann")
        );
        assert_eq!(
            h.recent_login("127.0.0.7".parse().unwrap(), 600, 2000),
            None
        );
    }

    #[test]
    fn memory_is_bounded() {
        let h = History::new(1000);
        for i in 0..10_000 {
            h.record(&login(&format!("u{i}"), "legacy", Protocol::Imap, true, i));
        }
        assert!(h.users() <= 1000);
        // The newest are kept.
        assert!(h.stragglers(9_990, |_| true).len() == 10);
    }
}

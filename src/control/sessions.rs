//! The sessions being relayed, so that an operator or a routing change can end them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::Protocol;

/// Why a relayed session was ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// The user's pool changed (reload or stage).
    Moved,
    /// `cutover kick USER`.
    Admin,
}

impl KickReason {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KickReason::Moved => "moved",
            KickReason::Admin => "admin",
        }
    }
}

/// The handle a relaying session watches.
#[derive(Debug, Default)]
pub struct Kick {
    token: CancellationToken,
    reason: Mutex<Option<KickReason>>,
}

impl Kick {
    /// Resolves when the session is to be ended.
    pub async fn requested(&self) -> KickReason {
        self.token.cancelled().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| *r)
            .unwrap_or(KickReason::Admin)
    }
    fn fire(&self, reason: KickReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.token.cancel();
    }
}

/// What the registry knows about one relayed session.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Normalized user name.
    pub user: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Pool serving it.
    pub pool: String,
    /// The client's address (the PROXY header's when a balancer relayed the connection).
    pub client: std::net::SocketAddr,
    /// The kick handle.
    pub kick: Arc<Kick>,
}

/// Told of every session that starts or ends (a fleet keeps its listing in shared state).
pub type Observer = Box<dyn Fn(u64, Option<&Entry>) + Send + Sync>;

/// Every relayed session by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, Entry>>,
    observer: std::sync::OnceLock<Observer>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("len", &self.len())
            .finish()
    }
}

/// Removes its session from the registry when dropped.
pub struct Registration<'a> {
    sessions: &'a Sessions,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sessions.map.lock() {
            m.remove(&self.id);
        }
        if let Some(observe) = self.sessions.observer.get() {
            observe(self.id, None);
        }
    }
}

impl Sessions {
    /// Registers a relayed session; it stays registered while the guard lives.
    pub fn register(&self, id: u64, entry: Entry) -> Registration<'_> {
        // In the map first, then told: an observer that reads the map meanwhile (a
        // listing being rewritten) sees it, and the news comes after.
        let told = self.observer.get().map(|_| entry.clone());
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, entry);
        }
        if let (Some(observe), Some(entry)) = (self.observer.get(), told) {
            observe(id, Some(&entry));
        }
        Registration { sessions: self, id }
    }

    /// Runs `f` on every entry, holding the registry's lock (no session starts or ends
    /// meanwhile).
    pub fn with_entries(&self, f: impl FnOnce(&HashMap<u64, Entry>)) {
        if let Ok(m) = self.map.lock() {
            f(&m);
        }
    }

    /// Sets the observer told of every session that starts (`Some(entry)`) or ends
    /// (`None`). Only the first call takes effect.
    pub fn observe(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    /// A copy of every entry (for move checks and reports).
    pub fn snapshot(&self) -> Vec<(u64, Entry)> {
        self.map
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// Ends the sessions with these ids; returns how many were still there.
    pub fn kick_ids(&self, ids: &[u64], reason: KickReason) -> usize {
        let Ok(m) = self.map.lock() else { return 0 };
        let mut n = 0;
        for id in ids {
            if let Some(e) = m.get(id) {
                e.kick.fire(reason);
                n += 1;
            }
        }
        n
    }

    /// Ends every session of `user`; returns how many.
    pub fn kick_user(&self, user: &str, reason: KickReason) -> usize {
        let ids: Vec<u64> = self
            .snapshot()
            .into_iter()
            .filter(|(_, e)| e.user == user)
            .map(|(id, _)| id)
            .collect();
        self.kick_ids(&ids, reason)
    }

    /// Number of relayed sessions.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// True if none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

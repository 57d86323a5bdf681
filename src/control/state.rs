//! The state that proxies in a fleet must share, behind one interface: holds, the
//! failed-login throttle, the login history (the pop-before-smtp bridge and the
//! stragglers report) and the sessions being relayed (so they can be kicked).
//!
//! [`MemoryState`](super::memory::MemoryState) keeps it in this process, which is all a
//! single proxy needs. A fleet puts it in a shared store by implementing [`SharedState`]
//! once more; nothing above this interface changes. Every method returns a boxed future so
//! that an implementation may ask the network, with a deadline of its own: the login path
//! must never wait on shared state longer than its budget, and an implementation that
//! cannot reach its store answers from local state instead of failing the login.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Protocol, Throttle};

use super::history::Straggler;
use super::holds::HoldOutcome;
use super::sessions::{KickReason, Sessions};

/// A future some shared state answers with.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One successful login, as the history records it.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    /// Normalized user.
    pub user: &'a str,
    /// Pool that served it.
    pub pool: &'a str,
    /// Protocol.
    pub protocol: Protocol,
    /// Listener name.
    pub listener: &'a str,
    /// The client used TLS.
    pub tls: bool,
    /// The pool counts as legacy (the stragglers report lists its users).
    pub legacy: bool,
    /// The client's address.
    pub ip: IpAddr,
    /// When (Unix milliseconds).
    pub now_ms: i64,
}

/// One relayed session in a listing (`GET /sessions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    /// The proxy relaying it (`instance_name`).
    pub instance: String,
    /// The session id (unique per proxy).
    pub id: u64,
    /// Normalized user.
    pub user: String,
    /// Protocol.
    pub protocol: String,
    /// Pool serving it.
    pub pool: String,
    /// The client's address.
    pub client: String,
}

/// Called with a user name when the fleet is told to forget their lookup answers.
pub type ForgetHook = Box<dyn Fn(&str) + Send + Sync>;

/// Everything a login, the admin endpoint and the stragglers report ask of shared state.
pub trait SharedState: Send + Sync + std::fmt::Debug {
    /// Holds `user`'s new logins; false if already held.
    fn hold<'a>(&'a self, user: &'a str) -> Pending<'a, bool>;
    /// Releases `user`: waiting logins go on. False if the user was not held.
    fn release<'a>(&'a self, user: &'a str) -> Pending<'a, bool>;
    /// Held users, sorted (of the whole fleet when shared).
    fn holds(&self) -> Pending<'_, Vec<String>>;
    /// The holds this proxy enforces right now (its local mirror in a fleet), sorted.
    fn holds_enforced(&self) -> Vec<String>;
    /// Whether `user`'s logins are held now.
    fn is_held<'a>(&'a self, user: &'a str) -> Pending<'a, bool>;
    /// Waits while `user` is held, at most `max`.
    fn wait_release<'a>(&'a self, user: &'a str, max: Duration) -> Pending<'a, HoldOutcome>;

    /// If `ip` or `user` is blocked for too many failed logins, for how much longer.
    fn blocked<'a>(&'a self, ip: IpAddr, user: &'a str) -> Pending<'a, Option<Duration>>;
    /// Counts a failed login of `user` from `ip`; returns the tarpit delay before the
    /// client hears of it.
    fn failed<'a>(&'a self, ip: IpAddr, user: &'a str, cfg: &'a Throttle) -> Pending<'a, Duration>;
    /// A successful login clears the user's failures (not the address's).
    fn succeeded<'a>(&'a self, user: &'a str) -> Pending<'a, ()>;

    /// Records a successful login (stragglers report; POP3 and IMAP logins also open the
    /// pop-before-smtp window of the client's address).
    fn logged_in<'a>(&'a self, login: Login<'a>) -> Pending<'a, ()>;
    /// The user who logged in by POP3 or IMAP from `ip` within `window`, if any.
    fn bridge_user(&self, ip: IpAddr, window: Duration) -> Pending<'_, Option<String>>;
    /// Users seen since `since_ms` on a legacy pool (per `is_legacy`) or without TLS.
    fn stragglers<'a>(
        &'a self,
        since_ms: i64,
        is_legacy: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> Pending<'a, Vec<Straggler>>;

    /// The relayed sessions of this process: where a session registers itself and where
    /// its kick handle lives.
    fn sessions(&self) -> &Sessions;
    /// Ends every relayed session of `user` (on every proxy of a fleet); returns how many
    /// this proxy ended.
    fn kick<'a>(&'a self, user: &'a str, reason: KickReason) -> Pending<'a, usize>;
    /// The relayed sessions (of every proxy of a fleet), sorted by instance and id.
    fn session_list(&self) -> Pending<'_, Vec<SessionRow>>;
    /// Tells the other proxies of the fleet to make `user`'s cached lookup answers
    /// stale (nothing to do without a fleet).
    fn forget<'a>(&'a self, user: &'a str) -> Pending<'a, ()> {
        let _ = user;
        Box::pin(async {})
    }

    /// What to call when another proxy says `forget` (kept by fleet implementations).
    fn on_forget(&self, hook: ForgetHook) {
        let _ = hook;
    }
    /// Whether the shared store is reachable: `None` when the state is this process's own.
    fn store_up(&self) -> Option<bool> {
        None
    }
    /// Whether changes reach the other proxies of a fleet (admin replies say so).
    fn is_shared(&self) -> bool {
        false
    }
}

//! [`SharedState`] kept in this process: the tables of [`super::holds`],
//! [`super::limits::AuthThrottle`], [`super::history`] and [`super::sessions`]. Every
//! answer is immediate.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::{rfc3339, Throttle};

use super::history::{History, Straggler};
use super::holds::{HoldOutcome, Holds};
use super::limits::AuthThrottle;
use super::sessions::{Entry, KickReason, Sessions};
use super::state::{Login, Pending, SessionRow, SharedState};

/// Shared state for a single proxy.
#[derive(Debug)]
pub struct MemoryState {
    instance: String,
    holds: Holds,
    throttle: AuthThrottle,
    history: History,
    sessions: Sessions,
}

impl MemoryState {
    /// Empty state of the proxy named `instance`; the history remembers at most
    /// `max_users` users.
    pub fn new(instance: &str, max_users: usize) -> Self {
        MemoryState {
            instance: instance.to_string(),
            holds: Holds::default(),
            throttle: AuthThrottle::default(),
            history: History::new(max_users),
            sessions: Sessions::default(),
        }
    }
}

impl MemoryState {
    /// The holds table (a fleet mirrors its holds here).
    pub fn holds_table(&self) -> &Holds {
        &self.holds
    }

    /// The failed-login throttle (a fleet mirrors its blocks here).
    pub fn throttle(&self) -> &AuthThrottle {
        &self.throttle
    }

    /// Most users the history remembers.
    pub fn max_users(&self) -> usize {
        self.history.max_users()
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> Pending<'a, T> {
    Box::pin(std::future::ready(value))
}

impl SharedState for MemoryState {
    fn hold<'a>(&'a self, user: &'a str) -> Pending<'a, bool> {
        ready(self.holds.hold(user))
    }

    fn release<'a>(&'a self, user: &'a str) -> Pending<'a, bool> {
        ready(self.holds.release(user))
    }

    fn holds(&self) -> Pending<'_, Vec<String>> {
        ready(self.holds.list())
    }

    fn holds_enforced(&self) -> Vec<String> {
        self.holds.list()
    }

    fn is_held<'a>(&'a self, user: &'a str) -> Pending<'a, bool> {
        ready(self.holds.is_held(user))
    }

    fn wait_release<'a>(&'a self, user: &'a str, max: Duration) -> Pending<'a, HoldOutcome> {
        Box::pin(self.holds.wait(user, max))
    }

    fn blocked<'a>(&'a self, ip: IpAddr, user: &'a str) -> Pending<'a, Option<Duration>> {
        ready(self.throttle.blocked(ip, user, Instant::now()))
    }

    fn failed<'a>(&'a self, ip: IpAddr, user: &'a str, cfg: &'a Throttle) -> Pending<'a, Duration> {
        ready(self.throttle.failure(ip, user, cfg, Instant::now()))
    }

    fn succeeded<'a>(&'a self, user: &'a str) -> Pending<'a, ()> {
        self.throttle.success(user);
        ready(())
    }

    fn logged_in<'a>(&'a self, login: Login<'a>) -> Pending<'a, ()> {
        self.history.record(&login);
        ready(())
    }

    fn bridge_user(&self, ip: IpAddr, window: Duration) -> Pending<'_, Option<String>> {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        ready(self.history.recent_login(ip, window_ms, rfc3339::now_ms()))
    }

    fn stragglers<'a>(
        &'a self,
        since_ms: i64,
        is_legacy: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> Pending<'a, Vec<Straggler>> {
        let mut rows = self.history.stragglers(since_ms, is_legacy);
        for r in &mut rows {
            r.instance.clone_from(&self.instance);
        }
        ready(rows)
    }

    fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    fn kick<'a>(&'a self, user: &'a str, reason: KickReason) -> Pending<'a, usize> {
        ready(self.sessions.kick_user(user, reason))
    }

    fn session_list(&self) -> Pending<'_, Vec<SessionRow>> {
        let mut rows: Vec<SessionRow> = self
            .sessions
            .snapshot()
            .into_iter()
            .map(|(id, e)| session_row(&self.instance, id, &e))
            .collect();
        rows.sort_by_key(|r| r.id);
        ready(rows)
    }
}

/// A session as listed.
pub fn session_row(instance: &str, id: u64, e: &Entry) -> SessionRow {
    SessionRow {
        instance: instance.to_string(),
        id,
        user: e.user.clone(),
        protocol: e.protocol.as_str().to_string(),
        pool: e.pool.clone(),
        client: e.client.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn login(user: &str, protocol: Protocol, ip: [u8; 4]) -> Login<'_> {
        Login {
            user,
            pool: "legacy",
            protocol,
            listener: "l",
            tls: true,
            legacy: true,
            ip: IpAddr::from(ip),
            now_ms: rfc3339::now_ms(),
        }
    }

    #[tokio::test]
    async fn the_interface_reaches_every_table() {
        let s = MemoryState::new("proxy-a", 10);
        assert!(s.hold("joe").await);
        assert!(!s.hold("joe").await);
        assert_eq!(s.holds().await, ["joe"]);
        let max = Duration::from_millis(10);
        assert!(s.is_held("joe").await);
        assert!(!s.is_held("ann").await);
        assert_eq!(s.wait_release("joe", max).await, HoldOutcome::TimedOut);
        assert_eq!(s.wait_release("ann", max).await, HoldOutcome::Proceed);
        assert!(s.release("joe").await);
        assert!(!s.is_held("joe").await);

        let ip = IpAddr::from([192, 0, 2, 7]);
        let cfg = Throttle {
            ip_failures: 0,
            user_failures: 2,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        };
        assert_eq!(s.blocked(ip, "joe").await, None);
        s.failed(ip, "joe", &cfg).await;
        s.failed(ip, "joe", &cfg).await;
        assert!(s.blocked(ip, "joe").await.is_some());

        s.logged_in(login("ann", Protocol::Pop3, [192, 0, 2, 8]))
            .await;
        s.logged_in(login("bob", Protocol::Smtp, [192, 0, 2, 9]))
            .await;
        let window = Duration::from_secs(600);
        let pop = IpAddr::from([192, 0, 2, 8]);
        assert_eq!(s.bridge_user(pop, window).await.as_deref(), Some("ann"));
        let smtp = IpAddr::from([192, 0, 2, 9]);
        assert_eq!(
            s.bridge_user(smtp, window).await,
            None,
            "SMTP opens no window"
        );
        let legacy = |_: &str| true;
        let rows = s.stragglers(0, &legacy).await;
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.instance == "proxy-a"));
        assert_eq!(s.kick("ann", KickReason::Admin).await, 0);
    }
}

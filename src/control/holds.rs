//! Held users: while a mailbox gets its final copy, that user's new logins wait (up to a
//! bound) until released. Dovecot's move recipe (delay, move, kick) in one place.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// Users whose logins are held.
#[derive(Debug, Default)]
pub struct Holds {
    map: Mutex<HashMap<String, watch::Sender<bool>>>,
}

/// What came of waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Not held, or released: go on.
    Proceed,
    /// Still held after the maximum wait: answer with a temporary failure.
    TimedOut,
}

impl Holds {
    /// Holds `user`'s new logins. Returns false if already held.
    pub fn hold(&self, user: &str) -> bool {
        let Ok(mut m) = self.map.lock() else {
            return false;
        };
        if m.contains_key(user) {
            return false;
        }
        let (tx, _) = watch::channel(true);
        m.insert(user.to_string(), tx);
        true
    }

    /// Releases `user`: waiting logins go on to the route in force. Returns false if the
    /// user was not held.
    pub fn release(&self, user: &str) -> bool {
        let Ok(mut m) = self.map.lock() else {
            return false;
        };
        match m.remove(user) {
            Some(tx) => {
                let _ = tx.send(false);
                true
            }
            None => false,
        }
    }

    /// Held users.
    pub fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .map
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// True if `user` is held now.
    pub fn is_held(&self, user: &str) -> bool {
        self.map
            .lock()
            .map(|m| m.contains_key(user))
            .unwrap_or(false)
    }

    /// Waits while `user` is held, at most `max`.
    pub async fn wait(&self, user: &str, max: Duration) -> HoldOutcome {
        let rx = match self.map.lock() {
            Ok(m) => m.get(user).map(|tx| tx.subscribe()),
            Err(_) => None,
        };
        let Some(mut rx) = rx else {
            return HoldOutcome::Proceed;
        };
        let released =
            tokio::time::timeout(max, async move { rx.wait_for(|held| !*held).await.is_ok() })
                .await;
        match released {
            Ok(_) => HoldOutcome::Proceed, // released (or the sender went away)
            Err(_) => HoldOutcome::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hold_then_release_lets_waiters_through() {
        let holds = std::sync::Arc::new(Holds::default());
        assert_eq!(
            holds.wait("joe", Duration::from_millis(10)).await,
            HoldOutcome::Proceed
        );
        assert!(holds.hold("joe"));
        assert!(!holds.hold("joe"));
        assert_eq!(
            holds.wait("joe", Duration::from_millis(20)).await,
            HoldOutcome::TimedOut
        );
        let h = holds.clone();
        let waiter = tokio::spawn(async move { h.wait("joe", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(holds.release("joe"));
        assert_eq!(waiter.await.unwrap(), HoldOutcome::Proceed);
        assert!(!holds.release("joe"));
        assert!(holds.list().is_empty());
    }
}

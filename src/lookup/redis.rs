//! A lookup in Redis: the key `key` (with `{user}` replaced) holds the user's pool as a
//! string, or a hash with `pool` and `server` fields. One multiplexed connection carries
//! every query; it reconnects by itself.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use super::cache::{Fetched, QueryError};
use crate::route::Row;

/// A hash's `pool` and `server` fields.
type PoolServer = (Option<String>, Option<String>);

/// The Redis side of one lookup.
pub struct Redis {
    client: redis::Client,
    key: String,
    conn: OnceCell<ConnectionManager>,
    /// The last key read was a string: try `GET` first (else `HMGET`).
    strings: AtomicBool,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("key", &self.key).finish()
    }
}

impl Redis {
    /// Settings; nothing is connected yet. With `ca_file`, a `rediss://` server must
    /// present a certificate signed by one of its CAs (else the system's roots).
    pub fn new(url: &str, key: &str, ca_file: Option<&Path>) -> Result<Redis, String> {
        // The URL may carry a password: the error says what is wrong, not the URL.
        let bad_url = |e: redis::RedisError| format!("Redis URL: {:?}", e.kind());
        let client = match ca_file {
            Some(path) if url.starts_with("rediss://") => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("Redis CA file {}: {e}", path.display()))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(url, certs).map_err(bad_url)?
            }
            _ => redis::Client::open(url).map_err(bad_url)?,
        };
        Ok(Redis {
            client,
            key: key.to_string(),
            conn: OnceCell::new(),
            strings: AtomicBool::new(false),
        })
    }

    /// The key of `user`.
    pub fn key_of(&self, user: &str) -> String {
        self.key.replace("{user}", user)
    }

    async fn connection(&self, timeout: Duration) -> Result<ConnectionManager, QueryError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .map_err(|e| QueryError::Failed(e.to_string()))
            })
            .await?;
        Ok(conn.clone())
    }

    /// Asks for `user`'s row within `timeout`.
    pub async fn query(&self, user: &str, timeout: Duration) -> Fetched {
        match tokio::time::timeout(timeout, self.query_unbounded(user, timeout)).await {
            Ok(fetched) => fetched,
            Err(_) => Err(QueryError::Timeout),
        }
    }

    async fn query_unbounded(&self, user: &str, timeout: Duration) -> Fetched {
        let mut conn = self.connection(timeout).await?;
        let key = self.key_of(user);
        let failed = |e: redis::RedisError| QueryError::Failed(e.to_string());
        // Inside a pipeline the server's error may come wrapped: look at its text too.
        let wrong_type = |e: &redis::RedisError| {
            e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE")
        };
        // Providers use one shape for every key: the one seen last is tried first, and
        // a key of the other shape costs one more round trip.
        let mut strings = self.strings.load(Ordering::Relaxed);
        for _ in 0..2 {
            if strings {
                let r: Result<Option<String>, _> =
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await;
                match r {
                    Ok(v) => {
                        return Ok(v.filter(|p| !p.trim().is_empty()).map(|p| Row {
                            pool: Some(p.trim().to_string()),
                            server: None,
                        }))
                    }
                    Err(e) if wrong_type(&e) => strings = false,
                    Err(e) => return Err(failed(e)),
                }
            } else {
                // With EXISTS in the same round trip: a hash without these fields is a
                // row too (any key means the rule's pool for `{ lookup, pool }` rules).
                let r: Result<(PoolServer, bool), _> = redis::pipe()
                    .cmd("HMGET")
                    .arg(&key)
                    .arg("pool")
                    .arg("server")
                    .cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await;
                match r {
                    Ok((_, false)) => return Ok(None),
                    Ok(((pool, server), true)) => {
                        let clean = |v: Option<String>| {
                            v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
                        };
                        return Ok(Some(Row {
                            pool: clean(pool),
                            server: clean(server),
                        }));
                    }
                    Err(e) if wrong_type(&e) => strings = true,
                    Err(e) => return Err(failed(e)),
                }
            }
            self.strings.store(strings, Ordering::Relaxed);
        }
        Err(QueryError::Failed(format!(
            "key {key:?} is neither a string nor a hash"
        )))
    }
}

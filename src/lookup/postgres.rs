//! A lookup in PostgreSQL: one parameterised query, prepared once per connection, on a
//! few connections that carry many queries at once (tokio-postgres pipelines them).
//!
//! A connection is opened on first use and again after it broke or a query on it ran
//! past the lookup's timeout (that query is cancelled on the server: a stalled query
//! must not hold up the ones queued behind it on the same connection). TLS
//! (`sslmode=require` in the URL) uses rustls, verifying the server against `ca_file` or
//! the system's roots.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Statement};

use super::cache::{Fetched, QueryError};
use crate::config::Protocol;
use crate::route::Row;

/// One open connection with the statement prepared on it.
struct Conn {
    client: Client,
    statement: Statement,
    /// Column of the pool (None: no column can be read as one).
    pool_column: usize,
    /// Column of the server, if the query returns one.
    server_column: Option<usize>,
    /// The query takes the protocol as `$2`.
    takes_protocol: bool,
    /// Queries in flight on this connection.
    in_flight: AtomicUsize,
}

/// Counts a query in flight on a connection while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The PostgreSQL side of one lookup.
pub struct Postgres {
    config: tokio_postgres::Config,
    query: String,
    tls: RustlsConnect,
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Where connection tasks run (the main runtime, not a session worker).
    runtime: tokio::runtime::Handle,
}

/// One connection place: the connection, and a lock so one login opens it while the
/// others wait for it.
struct Slot {
    conn: Mutex<Option<Arc<Conn>>>,
    opening: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("hosts", &self.config.get_hosts().len())
            .field("query", &self.query)
            .finish()
    }
}

/// Why a lookup's PostgreSQL settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The connection string does not parse (its text is not repeated: it may hold a
    /// password).
    #[error("the PostgreSQL connection string does not parse")]
    Url,
    /// The CA file for TLS.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Postgres {
    /// Settings for `connections` connections; nothing is connected yet.
    pub fn new(
        url: &str,
        query: &str,
        connections: usize,
        ca_file: Option<&Path>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Postgres, SetupError> {
        let config: tokio_postgres::Config = url.parse().map_err(|_| SetupError::Url)?;
        let needs_tls = config.get_ssl_mode() != tokio_postgres::config::SslMode::Disable;
        let tls = RustlsConnect(if needs_tls {
            Some(crate::tls::client_config(ca_file)?)
        } else {
            None
        });
        Ok(Postgres {
            config,
            query: query.to_string(),
            tls,
            slots: (0..connections.max(1))
                .map(|_| Slot {
                    conn: Mutex::new(None),
                    opening: tokio::sync::Mutex::new(()),
                })
                .collect(),
            next: AtomicUsize::new(0),
            runtime,
        })
    }

    /// Asks for `user`'s row, within `timeout` (connecting and preparing included). A
    /// query past it is cancelled on the server and its connection replaced.
    pub async fn query(&self, user: &str, protocol: Protocol, timeout: Duration) -> Fetched {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        match tokio::time::timeout(timeout, self.query_on(slot, user, protocol)).await {
            Ok(fetched) => fetched,
            Err(_) => {
                self.abandon(slot);
                Err(QueryError::Timeout)
            }
        }
    }

    async fn query_on(&self, slot: &Slot, user: &str, protocol: Protocol) -> Fetched {
        let conn = self.connection(slot).await?;
        let _counted = InFlight::new(&conn.in_flight);
        let result = if conn.takes_protocol {
            conn.client
                .query(&conn.statement, &[&user, &protocol.as_str()])
                .await
        } else {
            conn.client.query(&conn.statement, &[&user]).await
        };
        match result {
            Ok(rows) => Ok(rows.first().map(|r| row(&conn, r))),
            Err(e) => {
                if conn.client.is_closed() {
                    drop_if_same(slot, &conn);
                }
                Err(QueryError::Failed(describe(&e)))
            }
        }
    }

    /// Takes a slot's connection out of use (the next query opens another) and, when no
    /// other query is in flight on it, cancels the stalled one on the server. Queries of
    /// other users pipelined on it finish there undisturbed (a cancel would hit whichever
    /// query the server runs at that moment).
    fn abandon(&self, slot: &Slot) {
        let taken = match slot.conn.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(conn) = taken.filter(|c| c.in_flight.load(Ordering::Acquire) == 0) {
            let token = conn.client.cancel_token();
            let tls = self.tls.clone();
            self.runtime.spawn(async move {
                let _ = token.cancel_query(tls).await;
            });
        }
    }

    /// The open connection of a slot, opened (and the statement prepared) if needed.
    async fn connection(&self, slot: &Slot) -> Result<Arc<Conn>, QueryError> {
        if let Some(c) = current(slot) {
            return Ok(c);
        }
        let _opening = slot.opening.lock().await;
        if let Some(c) = current(slot) {
            return Ok(c);
        }
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| QueryError::Failed(describe(&e)))?;
        self.runtime.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %describe(&e), "lookup: PostgreSQL connection ended");
            }
        });
        let statement = client
            .prepare(&self.query)
            .await
            .map_err(|e| QueryError::Failed(describe(&e)))?;
        let columns = statement.columns();
        let named = |n: &str| columns.iter().position(|c| c.name() == n);
        let (pool_column, server_column) = match (named("pool"), named("server")) {
            (Some(p), s) => (p, s),
            (None, Some(s)) => (usize::from(s == 0), Some(s)),
            (None, None) => (0, (columns.len() > 1).then_some(1)),
        };
        let conn = Arc::new(Conn {
            takes_protocol: statement.params().len() >= 2,
            in_flight: AtomicUsize::new(0),
            client,
            statement,
            pool_column,
            server_column,
        });
        match slot.conn.lock() {
            Ok(mut g) => *g = Some(conn.clone()),
            Err(p) => *p.into_inner() = Some(conn.clone()),
        }
        Ok(conn)
    }
}

fn current(slot: &Slot) -> Option<Arc<Conn>> {
    let g = match slot.conn.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    g.as_ref().filter(|c| !c.client.is_closed()).cloned()
}

fn drop_if_same(slot: &Slot, conn: &Arc<Conn>) {
    let mut g = match slot.conn.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if g.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
        *g = None;
    }
}

/// A text column, or None (NULL, or not text: `SELECT 1 ...` for a "migrated" table).
fn text(r: &tokio_postgres::Row, i: usize) -> Option<String> {
    r.try_get::<_, Option<String>>(i)
        .ok()
        .flatten()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn row(conn: &Conn, r: &tokio_postgres::Row) -> Row {
    Row {
        pool: text(r, conn.pool_column),
        server: conn.server_column.and_then(|i| text(r, i)),
    }
}

/// An error as logs show it: the server's message or the client's, never the connection
/// string.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// TLS to PostgreSQL with rustls (None: the URL says `sslmode=disable`).
#[derive(Clone)]
pub struct RustlsConnect(Option<Arc<rustls::ClientConfig>>);

/// One TLS connection to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnector> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnector {
            config: self.0.clone(),
            name,
        })
    }
}

/// Connects one stream.
pub struct RustlsConnector {
    config: Option<Arc<rustls::ClientConfig>>,
    name: rustls::pki_types::ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "TLS needs sslmode other than disable",
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

//! The relay: after login, bytes flow both ways unchanged until either side closes.
//!
//! Buffers are allocated here, only after authentication. Each direction reads only when
//! its buffer has room (backpressure); EOF on one side shuts down the write half of the
//! other (for TLS: close_notify), so half-closed sessions finish cleanly. Content is
//! never logged.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Per-direction relay buffer.
pub const RELAY_BUF: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// One side closed and the other followed; bytes client->backend, backend->client.
    Closed(u64, u64),
    /// An I/O error ended it (reset, broken pipe).
    Error(io::Error),
    /// `stop` was cancelled (shutdown grace expired, or the user was moved).
    Stopped,
}

/// Relays until both directions are finished or `stop` is cancelled.
pub async fn relay<C, B>(client: &mut C, backend: &mut B, stop: &CancellationToken) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(client, backend, RELAY_BUF, RELAY_BUF) => match r {
            Ok((up, down)) => RelayEnd::Closed(up, down),
            Err(e) => RelayEnd::Error(e),
        },
        _ = stop.cancelled() => RelayEnd::Stopped,
    }
}

//! Metric names, the Prometheus recorder and the `/metrics` endpoint.
//!
//! Labels are only ever protocol, pool, listener, result, reason, server and the like:
//! never a user name or a client address (unbounded and personal).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Logins by `protocol`, `pool`, `result` (ok | auth_failed | backend_unavailable | refused).
pub const LOGINS: &str = "cutover_logins_total";
/// 1 if a backend server is considered up, by `pool`, `protocol`, `server`.
pub const BACKEND_UP: &str = "cutover_backend_up";
/// Moves to the next server of a pool after one was unavailable, by `pool`, `protocol`.
pub const FAILOVERS: &str = "cutover_failovers_total";
/// Failed attempts to use a backend server, by `pool`, `protocol`, `server`, `reason`.
pub const BACKEND_FAILURES: &str = "cutover_backend_connect_failures_total";
/// Accepted client connections, by `listener`, `protocol`.
pub const CONNECTIONS: &str = "cutover_connections_total";
/// Open client connections, by `listener`, `protocol`.
pub const CONNECTIONS_ACTIVE: &str = "cutover_connections_active";
/// Relayed (logged-in) sessions, by `pool`, `protocol`.
pub const SESSIONS_ACTIVE: &str = "cutover_sessions_active";
/// Bytes relayed, by `pool`, `protocol`, `direction` (client_to_backend | backend_to_client).
pub const BYTES: &str = "cutover_relayed_bytes_total";

/// Installs the global recorder (once per process) and returns a handle for rendering.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours stays unused
            // and /metrics shows nothing, which a test would notice.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `GET /metrics` until `stop` is cancelled. A deliberately small HTTP/1.0-style
/// responder: one request per connection, bounded header size and time.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, stop: CancellationToken) {
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let first = head.lines().next().unwrap_or("");
            let mut parts = first.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let response = if method == "GET"
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".to_string()
            };
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

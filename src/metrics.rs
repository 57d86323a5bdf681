//! Metric names, the Prometheus recorder and the `/metrics` endpoint.
//!
//! Labels are only ever protocol, pool, listener, result, reason, server and the like:
//! never a user name or a client address (unbounded and personal).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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
/// 1 for the stage in force, 0 for the others, by `stage` (`(initial)`: the top-level routes).
pub const STAGE_ACTIVE: &str = "cutover_stage_active";
/// Configuration reloads, by `result` (ok | error).
pub const RELOADS: &str = "cutover_config_reloads_total";
/// Relayed sessions ended from outside, by `protocol`, `reason` (moved | admin | shutdown).
pub const KICKED: &str = "cutover_sessions_kicked_total";
/// Logins tried on a route's fallback pool, by `from`, `to`, `reason` (unavailable | auth_failed).
pub const FALLBACKS: &str = "cutover_fallbacks_total";
/// Logins that waited for a held user, by `result` (released | timed_out).
pub const HELD_LOGINS: &str = "cutover_held_logins_total";

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

/// Serves `GET /metrics` until `stop` is cancelled.
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
            let Some(req) = crate::http::read_request(&mut sock).await else { return };
            if req.method == "GET" && req.path == "/metrics" {
                let body = handle.render();
                crate::http::respond(&mut sock, 200, "text/plain; version=0.0.4; charset=utf-8", &body).await;
            } else {
                crate::http::respond(&mut sock, 404, "text/plain", "not found\n").await;
            }
        });
    }
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

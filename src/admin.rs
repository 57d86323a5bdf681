//! The admin endpoint: kick, hold and release users, list held users, sessions and
//! stragglers. Bound to loopback by default; a bearer token (from `admin.token_file`) is
//! required on every request when one is configured, and configuring one is mandatory
//! off loopback.
//!
//! | request | effect |
//! |---|---|
//! | `POST /kick?user=U` | end U's relayed sessions now (IMAP: `* BYE` first) |
//! | `POST /hold?user=U` | U's new logins wait (up to `admin.hold_max_wait`) |
//! | `POST /release?user=U` | waiting and new logins of U go to the route in force |
//! | `GET /holds` | held users (of the fleet, with shared state); `?scope=local`: the holds this proxy enforces now |
//! | `GET /sessions` | relayed sessions (user, protocol, pool) |
//! | `GET /stragglers?hours=N` | users seen on a legacy pool or without TLS in the last N hours (JSON) |
//! | `GET /config` | the configuration in force, as `cutover config dump` shows it (JSON, secrets not shown) |
//! | `GET /ready` | 200 once listening and the first health round is done, 503 while starting or draining |
//! | `POST /forget?user=U` | U's cached route lookup answers are stale: the next login asks the database (on every proxy of the fleet) |
//! | `GET /route?user=U&protocol=P` | where U's next login goes, through this proxy's lookup caches (JSON, as `cutover route --json`) |

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{rfc3339, Config};
use crate::control::sessions::KickReason;
use crate::control::Control;
use crate::http::{read_request, respond, Request};

/// Serves the admin endpoint until `stop`.
pub async fn serve(listener: TcpListener, control: Arc<Control>, stop: CancellationToken) {
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let control = control.clone();
        tokio::spawn(async move {
            let Some(req) = read_request(&mut sock).await else {
                return;
            };
            handle(&mut sock, &control, req).await;
        });
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(sock: &mut TcpStream, control: &Control, req: Request) {
    let snap = control.snapshot();
    let cfg = &snap.config;
    if let Some(token) = cfg.admin.as_ref().and_then(|a| a.token.as_deref()) {
        let ok = req
            .bearer
            .as_deref()
            .is_some_and(|b| constant_time_eq(b.as_bytes(), token.as_bytes()));
        if !ok {
            respond(sock, 401, "text/plain", "missing or wrong bearer token\n").await;
            return;
        }
    }
    let (status, body) = answer(control, cfg, &req).await;
    let content_type = match status {
        200 => "application/json",
        _ => "text/plain",
    };
    respond(sock, status, content_type, &body).await;
}

/// The status and body for one authorized request: JSON on success, text otherwise.
async fn answer(control: &Control, cfg: &Config, req: &Request) -> (u16, String) {
    let user = req
        .param("user")
        .map(|u| crate::config::normalize(&cfg.users, u));
    let json = |v: serde_json::Value| (200, v.to_string() + "\n");
    let state = &control.state;
    match (req.method.as_str(), req.path.as_str(), user) {
        ("POST", "/kick", Some(user)) => {
            let n = state.kick(&user, KickReason::Admin).await;
            tracing::info!(%user, sessions = n, "admin: kick");
            if state.is_shared() {
                // `kicked` counts this proxy's sessions; the others end theirs.
                json(serde_json::json!({"user": user, "kicked": n, "fleet": true}))
            } else {
                json(serde_json::json!({"user": user, "kicked": n}))
            }
        }
        ("POST", "/hold", Some(user)) => {
            let new = state.hold(&user).await;
            tracing::info!(%user, "admin: hold");
            json(serde_json::json!({"user": user, "held": true, "already": !new}))
        }
        ("POST", "/release", Some(user)) => {
            let was = state.release(&user).await;
            tracing::info!(%user, "admin: release");
            json(serde_json::json!({"user": user, "released": was}))
        }
        ("GET", "/config", _) => json(control.effective_config()),
        ("GET", "/ready", _) if control.is_ready() => (200, "{\"ready\":true}\n".to_string()),
        ("GET", "/ready", _) => (503, "not ready\n".to_string()),
        ("POST", "/forget", Some(user)) => {
            let n = control.forget(&user).await;
            tracing::info!(%user, lookups = n, "admin: forget");
            json(serde_json::json!({"user": user, "forgotten": n, "fleet": state.is_shared()}))
        }
        ("GET", "/route", Some(user)) => {
            let protocol = match req.param("protocol").unwrap_or("imap").parse() {
                Ok(p) => p,
                Err(e) => return (400, format!("{e}\n")),
            };
            let login = req.param("user").unwrap_or_default();
            let now = rfc3339::now();
            let routed =
                crate::lookup::route(&control.lookups, cfg, login, &user, protocol, now).await;
            if routed.changed {
                // Asking here noticed the change: the user's sessions move as on a login.
                control.lookup_changed(&user);
            }
            json(routed.to_json())
        }
        ("POST", "/kick" | "/hold" | "/release" | "/forget", None) | ("GET", "/route", None) => {
            (400, "missing ?user=NAME\n".to_string())
        }
        ("GET", "/holds", _) if req.param("scope") == Some("local") => {
            json(serde_json::json!({"held": state.holds_enforced()}))
        }
        ("GET", "/holds", _) => json(serde_json::json!({"held": state.holds().await})),
        ("GET", "/sessions", _) => match serde_json::to_string(&state.session_list().await) {
            Ok(body) => (200, body + "\n"),
            Err(_) => (500, "error\n".to_string()),
        },
        ("GET", "/stragglers", _) => {
            let hours: i64 = req
                .param("hours")
                .and_then(|h| h.parse().ok())
                .unwrap_or(24)
                .clamp(0, 24 * 366);
            let since = rfc3339::now_ms() - hours * 3_600_000;
            let is_legacy = |p: &str| cfg.pools.get(p).is_none_or(|pool| pool.legacy);
            let rows = state.stragglers(since, &is_legacy).await;
            match serde_json::to_string(&rows) {
                Ok(body) => (200, body + "\n"),
                Err(_) => (500, "error\n".to_string()),
            }
        }
        (
            _,
            "/kick" | "/hold" | "/release" | "/holds" | "/sessions" | "/stragglers" | "/forget"
            | "/route",
            _,
        ) => (405, "method not allowed\n".to_string()),
        _ => (404, "not found\n".to_string()),
    }
}

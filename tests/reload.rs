//! Reloads that move the endpoints, and settings a reload cannot apply: said in the log,
//! shown in a metric and in the admin endpoint's `GET /config`, never silently ignored.
mod common;

use std::sync::Arc;

use common::*;
use cutover::config::{Config, Protocol};
use cutover::snapshot::Snapshot;

fn yaml(backend: std::net::SocketAddr, metrics: u16, admin: u16, workers: usize) -> String {
    format!(
        r#"
listeners: [{{ name: imap, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true }}]
pools: {{ p: {{ health: {{ interval: 0s }}, imap: {{ servers: ["{backend}"] }} }} }}
routes: [{{ pool: p }}]
metrics: {{ listen: "127.0.0.1:{metrics}" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
workers: {workers}
shutdown: {{ drain_timeout: 1s }}
"#
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn endpoints_move_on_reload_and_restart_only_settings_are_reported() {
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let dir = TempDir::new("reload");
    let path = dir.join("routes.yaml");
    let (m1, a1, m2, a2) = (free_port(), free_port(), free_port(), free_port());
    std::fs::write(&path, yaml(backend.addr, m1, a1, 1)).unwrap();
    let snap = Arc::new(Snapshot::build(Config::load(&path).unwrap()).unwrap());
    let running = cutover::server::start(snap, cutover::backend::Backends::new())
        .await
        .unwrap();
    let old_metrics = running.metrics_addr().unwrap();
    assert!(scrape(old_metrics).await.contains("cutover_build_info"));

    // New endpoint addresses and another worker count.
    std::fs::write(&path, yaml(backend.addr, m2, a2, 2)).unwrap();
    running.reload_from(&path).await.unwrap();
    let new_metrics = running.metrics_addr().unwrap();
    assert_eq!(new_metrics.port(), m2);
    let body = scrape(new_metrics).await;
    assert_eq!(
        metric(
            &body,
            "cutover_config_restart_required",
            &[("key", "workers")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "cutover_config_restart_required",
            &[("key", "state")]
        ),
        Some(0.0)
    );
    // The old endpoints are closed, the new admin endpoint answers and shows the worker
    // count in force (the old one), as `cutover check` compares it.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(old_metrics).await.is_err());
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", a1))
        .await
        .is_err());
    let admin = running.admin_addr().unwrap();
    assert_eq!(admin.port(), a2);
    let (status, body) = cutover::http::request(admin, "GET", "/config", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["workers"], 1);
    assert_eq!(v["metrics"]["listen"], format!("127.0.0.1:{m2}"));
    // Logins go on.
    let mut c = Client::connect(running.addr("imap").unwrap()).await;
    c.login_ok("joeuser").await;
    // Back to one worker: nothing waits for a restart any more.
    std::fs::write(&path, yaml(backend.addr, m2, a2, 1)).unwrap();
    running.reload_from(&path).await.unwrap();
    let body = scrape(running.metrics_addr().unwrap()).await;
    assert_eq!(
        metric(
            &body,
            "cutover_config_restart_required",
            &[("key", "workers")]
        ),
        Some(0.0)
    );
    running.shutdown().await;
}

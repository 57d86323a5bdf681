//! The metrics catalogue (src/metrics.rs CATALOGUE, docs/metrics.md) and /metrics agree:
//! every catalogued metric is exported after a run that exercises each kind of event, and
//! nothing is exported that the catalogue does not list.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use cutover::config::Protocol;
use cutover::metrics::{Kind, CATALOGUE};

fn exported_families(response: &str) -> BTreeSet<String> {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or(response);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let name = l.split(['{', ' ']).next()?;
            let base = CATALOGUE
                .iter()
                .find(|d| {
                    d.kind == Kind::Histogram
                        && [
                            format!("{}_bucket", d.name),
                            format!("{}_sum", d.name),
                            format!("{}_count", d.name),
                        ]
                        .contains(&name.to_string())
                })
                .map(|d| d.name.to_string());
            Some(base.unwrap_or_else(|| name.to_string()))
        })
        .collect()
}

#[test]
fn docs_list_exactly_the_catalogue() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let documented: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect();
    let catalogued: BTreeSet<String> = CATALOGUE.iter().map(|d| d.name.to_string()).collect();
    assert_eq!(documented, catalogued);
    for d in CATALOGUE {
        match d.kind {
            Kind::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
            Kind::Histogram => assert!(d.name.ends_with("_seconds"), "{}", d.name),
            Kind::Gauge => assert!(!d.name.ends_with("_total"), "{}", d.name),
        }
        assert!(
            d.name.starts_with("cutover_") || d.name.starts_with("process_"),
            "{}",
            d.name
        );
        assert!(
            !d.labels
                .iter()
                .any(|l| ["user", "ip", "client", "address"].contains(l)),
            "{}",
            d.name
        );
    }
}

#[tokio::test]
async fn every_catalogued_metric_is_exported_and_nothing_else() {
    let new = fake("new", Protocol::Imap, |c| c.tls = Some(server_tls())).await;
    let green = fake("green", Protocol::Imap, |_| {}).await;
    let dir = common::TempDir::new("metrics");
    let c = certs();
    let (new_addr, green_addr, dead) = (new.addr, green.addr, dead_addr().await);
    let yaml = |routes: &str| {
        format!(
            r#"
tls:
  certificates: [{{ cert: {c}/proxy.pem, key: {c}/proxy-key.pem }}]
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", tls: starttls }}
  - {{ name: imaps, protocol: imap, listen: "127.0.0.1:0", tls: implicit }}
pools:
  new:
    imap: {{ servers: ["{new}"], tls: starttls, ca: {c}/ca.pem }}
  legacy:
    connect_timeout: 1s
    health: {{ interval: 0s }}
    imap: {{ servers: ["{dead}", "{green}"] }}
lookups:
  archive: {{ redis: {{ url: "redis://{dead}/0", key: "route:{{user}}" }}, on_error: next, timeout: 200ms }}
routes:
  - {{ users: [alice], lookup: archive }}
{routes}
stages:
  - {{ name: later, from: "2099-01-01T00:00:00Z", routes: [{{ pool: legacy }}] }}
metrics: {{ listen: "127.0.0.1:0" }}
admin: {{ listen: "127.0.0.1:0", hold_max_wait: 200ms }}
on_move: {{ action: kick, grace: 0s }}
shutdown: {{ drain_timeout: 1s }}
# Shared state whose Redis is gone: the proxy serves on local state and says so.
state:
  redis: {{ url: "redis://{dead}/0", timeout: 50ms }}
"#,
            c = c.display(),
            new = new_addr,
            green = green_addr,
        )
    };
    let path = dir.join("routes.yaml");
    std::fs::write(
        &path,
        yaml("  - { users: [joeuser], pool: new, fallback: legacy }\n  - { pool: legacy }"),
    )
    .unwrap();
    let cfg = cutover::config::Config::load(&path).unwrap();
    let snap = std::sync::Arc::new(cutover::snapshot::Snapshot::build(cfg).unwrap());
    let running = cutover::server::start(snap, cutover::backend::Backends::new())
        .await
        .unwrap();
    let imaps = running.addr("imaps").unwrap();
    let imap = running.addr("imap").unwrap();
    // ok via STARTTLS (new), failover to green for bob, auth failure, a kick, a hold.
    let mut c1 = Client::connect(imap).await;
    c1.line().await;
    c1.cmd("t", "STARTTLS").await;
    c1.start_tls().await;
    assert!(c1
        .cmd("a", "LOGIN joeuser password")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    let mut c2 = Client::connect_tls(imaps).await;
    c2.login_ok("bob").await;
    // alice's rule asks a lookup whose database is gone: on_error: next.
    let mut c6 = Client::connect_tls(imaps).await;
    c6.login_ok("alice").await;
    let mut c3 = Client::connect_tls(imaps).await;
    c3.line().await;
    assert!(c3
        .cmd("a", "LOGIN bob wrong")
        .await
        .last()
        .unwrap()
        .contains("AUTHENTICATIONFAILED"));
    let admin = running.admin.unwrap();
    cutover::http::request(admin, "POST", "/kick?user=bob", None)
        .await
        .unwrap();
    assert!(c2.closed().await);
    cutover::http::request(admin, "POST", "/hold?user=carol", None)
        .await
        .unwrap();
    let mut c4 = Client::connect_tls(imaps).await;
    c4.line().await;
    assert!(c4
        .cmd("a", "LOGIN carol password")
        .await
        .last()
        .unwrap()
        .contains("UNAVAILABLE"));
    // A reload that fails and one that moves joeuser (kicked: moved).
    std::fs::write(&path, "routes: [").unwrap();
    assert!(running.reload_from(&path).await.is_err());
    std::fs::write(&path, yaml("  - { pool: legacy }")).unwrap();
    running.reload_from(&path).await.unwrap();
    assert!(c1.closed().await);
    // The new pool is down now for joeuser? No: route it back to new, with new dead, so the
    // fallback fires.
    drop(new);
    std::fs::write(
        &path,
        yaml("  - { users: [joeuser], pool: new, fallback: legacy }\n  - { pool: legacy }"),
    )
    .unwrap();
    running.reload_from(&path).await.unwrap();
    let mut c5 = Client::connect_tls(imaps).await;
    c5.login_ok("joeuser").await;
    c5.cmd("z", "LOGOUT").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let body = scrape(running.metrics.unwrap()).await;
    let exported = exported_families(&body);
    let catalogued: BTreeSet<String> = CATALOGUE.iter().map(|d| d.name.to_string()).collect();
    let missing: Vec<_> = catalogued.difference(&exported).collect();
    let extra: Vec<_> = exported.difference(&catalogued).collect();
    assert!(
        missing.is_empty(),
        "catalogued but not exported: {missing:?}"
    );
    assert!(extra.is_empty(), "exported but not catalogued: {extra:?}");
    // Spot checks of values.
    assert!(
        metric(
            &body,
            "cutover_fallbacks_total",
            &[("from", "new"), ("to", "legacy"), ("reason", "unavailable")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(
            &body,
            "cutover_sessions_kicked_total",
            &[("reason", "moved")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(
            &body,
            "cutover_sessions_kicked_total",
            &[("reason", "admin")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(
            &body,
            "cutover_tls_handshakes_total",
            &[
                ("mode", "starttls"),
                ("result", "ok"),
                ("version", "TLSv1.3")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(
            &body,
            "cutover_config_reloads_total",
            &[("result", "error")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric(
            &body,
            "cutover_certificate_not_after_seconds",
            &[("certificate", "proxy.pem")]
        )
        .unwrap_or(0.0)
            > 2.0e9
    );
    assert!(metric(&body, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 1.0e6);
    assert!(
        !["joeuser", "carol", "bob"].iter().any(|u| body.contains(u)),
        "no user names in metrics"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn series_of_removed_servers_and_stages_disappear_on_reload() {
    let dir = common::TempDir::new("metrics-rm");
    let path = dir.join("routes.yaml");
    let with = r#"
listeners: [{ name: imap, protocol: imap, listen: "127.0.0.1:0" }]
pools:
  keep: { health: { interval: 0s }, imap: { servers: ["127.0.0.1:9"] } }
  gone: { health: { interval: 0s }, imap: { servers: ["127.0.0.1:7"] } }
routes: [{ pool: keep }]
stages: [{ name: wave-9, from: "2001-01-01T00:00:00Z", routes: [{ pool: gone }] }]
metrics: { listen: "127.0.0.1:0" }
"#;
    let without = r#"
listeners: [{ name: imap, protocol: imap, listen: "127.0.0.1:0" }]
pools:
  keep: { health: { interval: 0s }, imap: { servers: ["127.0.0.1:9"] } }
routes: [{ pool: keep }]
metrics: { listen: "127.0.0.1:0" }
"#;
    std::fs::write(&path, with).unwrap();
    let cfg = cutover::config::Config::load(&path).unwrap();
    let snap = std::sync::Arc::new(cutover::snapshot::Snapshot::build(cfg).unwrap());
    let running = cutover::server::start(snap, cutover::backend::Backends::new())
        .await
        .unwrap();
    let body = scrape(running.metrics.unwrap()).await;
    assert_eq!(
        metric(&body, "cutover_stage_active", &[("stage", "wave-9")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&body, "cutover_stage_active", &[("stage", "(initial)")]),
        Some(0.0)
    );
    assert!(metric(&body, "cutover_backend_up", &[("pool", "gone")]).is_some());
    std::fs::write(&path, "pools: [").unwrap();
    assert!(running.reload_from(&path).await.is_err());
    let body = scrape(running.metrics.unwrap()).await;
    assert_eq!(
        metric(&body, "cutover_config_last_reload_successful", &[]),
        Some(0.0)
    );
    std::fs::write(&path, without).unwrap();
    running.reload_from(&path).await.unwrap();
    let body = scrape(running.metrics.unwrap()).await;
    assert_eq!(
        metric(&body, "cutover_stage_active", &[("stage", "wave-9")]),
        None
    );
    assert_eq!(
        metric(&body, "cutover_stage_active", &[("stage", "(initial)")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&body, "cutover_backend_up", &[("pool", "gone")]),
        None
    );
    assert_eq!(
        metric(
            &body,
            "cutover_pool_info",
            &[("pool", "keep"), ("legacy", "false")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&body, "cutover_config_last_reload_successful", &[]),
        Some(1.0)
    );
    assert!(metric(&body, "process_cpu_seconds_total", &[]).is_some());
    running.shutdown().await;
}

//! Proxies sharing state through a real `redis-server` (started here on loopback, with its
//! own directory, and stopped afterwards): holds, kicks, the pop-before-smtp bridge, the
//! failed-login throttle, the session listing and the stragglers act fleet-wide, and
//! losing Redis degrades sharing without refusing anyone.
//!
//! Needs `redis-server` (Debian's package; `scripts/test.sh` installs it). Without it the
//! tests say so and pass, so that a bare `cargo test` on a developer machine still runs.
mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::servers::Redis;
use common::*;
use cutover::config::Protocol;
use cutover::demo::FakeBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port on 127.0.0.1 in 20000..22768 that is free, with port + 10000 free too (both
/// below the ephemeral range the proxies' listeners draw from).
fn free_port_pair() -> Option<u16> {
    let seed = u64::from(std::process::id()).wrapping_mul(2_654_435_761);
    for i in 0..2768u64 {
        let port = 20000 + (seed.wrapping_add(i * 7919) % 2768) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10000) {
            return Some(port);
        }
    }
    None
}

/// A throw-away Redis Cluster of three masters on loopback, made with
/// `redis-cli --cluster create`.
struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut r = Redis::start()?;
            r.kill();
            // A cluster's nodes find each other by the address they see: 127.0.0.1 (the
            // one their bus connections come from). The bus listens on port + 10000
            // (`redis-cli --cluster create` knows no other): both below the ephemeral range
            // the proxies' listeners draw from.
            r.ip = "127.0.0.1";
            r.port = free_port_pair()?;
            r.cluster = true;
            r.spawn();
            nodes.push(r);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|r| format!("{}:{}", r.ip, r.port))
            .collect();
        let mut create = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let created = loop {
            if let Some(status) = create.try_wait().ok()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = create.kill();
                panic!("redis-cli --cluster create did not finish");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(created.success(), "redis-cli --cluster create failed");
        // Every node must agree the cluster is up before it serves.
        let deadline = Instant::now() + Duration::from_secs(20);
        for r in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-h", r.ip, "-p", &r.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli runs");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Some(Cluster { nodes })
    }

    fn state(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|r| format!("\"{}\"", r.url().trim_end_matches("/0")))
            .collect();
        format!(
            "{{ cluster: {{ nodes: [{}] }}, key_prefix: \"c{}:\", timeout: 300ms }}",
            nodes.join(", "),
            self.nodes[0].port
        )
    }
}

struct Backends {
    imap: FakeBackend,
    pop3: FakeBackend,
    smtp: FakeBackend,
}

async fn backends() -> Backends {
    Backends {
        imap: fake("b", Protocol::Imap, |_| {}).await,
        pop3: fake("b", Protocol::Pop3, |_| {}).await,
        smtp: fake("b", Protocol::Smtp, |c| c.smtp_no_auth = true).await,
    }
}

/// `state.redis` for a single server.
fn single(redis: &Redis) -> String {
    format!(
        "{{ url: \"{}\", key_prefix: \"t{}:\", timeout: 200ms }}",
        redis.url(),
        redis.port
    )
}

/// One proxy of the fleet: same configuration but its name.
async fn proxy(name: &str, state: &str, b: &Backends, extra: &str) -> Proxy {
    let yaml = format!(
        r#"
instance_name: {name}
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
  - {{ name: pop3, protocol: pop3, listen: "127.0.0.1:0", allow_plaintext_auth: true }}
  - {{ name: compat, protocol: smtp, listen: "127.0.0.1:0", allow_plaintext_auth: true, relay: pop-before-smtp }}
pools:
  legacy:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{imap}"] }}
    pop3: {{ servers: ["{pop3}"] }}
    smtp: {{ servers: ["{smtp}"] }}
routes:
  - {{ pool: legacy }}
admin: {{ listen: "127.0.0.1:0", hold_max_wait: 10s }}
metrics: {{ listen: "127.0.0.1:0" }}
shutdown: {{ drain_timeout: 1s }}
state:
  redis: {state}
{extra}
"#,
        imap = b.imap.addr,
        pop3 = b.pop3.addr,
        smtp = b.smtp.addr,
    );
    let p = Proxy::start(&yaml).await;
    // Connected and subscribed: the store answers and a hold reaches this proxy.
    wait_until_up(&p).await;
    p
}

async fn wait_until_up(p: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(p.metrics_addr()).await;
        if metric(&body, "cutover_state_backend_up", &[]) == Some(1.0) {
            // The subscription comes up with the connection; give it a moment.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        assert!(Instant::now() < deadline, "shared state never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until a hold sent to each proxy is enforced by the other (both are subscribed).
async fn wait_until_sharing(a: &Proxy, b: &Proxy) {
    for (from, to) in [(a, b), (b, a)] {
        let deadline = Instant::now() + Duration::from_secs(10);
        admin(from, "POST", "/hold?user=readiness-probe").await;
        while !admin(to, "GET", "/holds?scope=local")
            .await
            .contains("readiness-probe")
        {
            assert!(Instant::now() < deadline, "the proxies never shared a hold");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin(from, "POST", "/release?user=readiness-probe").await;
        while admin(to, "GET", "/holds?scope=local")
            .await
            .contains("readiness-probe")
        {
            assert!(
                Instant::now() < deadline,
                "the release never reached the other proxy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn admin(p: &Proxy, method: &str, path: &str) -> String {
    let addr = p.running.as_ref().unwrap().admin.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn imap_login(addr: SocketAddr, user: &str, pass: &str) -> (Client, String) {
    let mut c = Client::connect(addr).await;
    c.line().await;
    let r = c.cmd("a", &format!("LOGIN {user} {pass}")).await;
    (c, r.last().cloned().unwrap_or_default())
}

#[tokio::test]
async fn holds_kicks_and_sessions_act_on_every_proxy() {
    let Some(redis) = Redis::start() else { return };
    let b = backends().await;
    let (pa, pb) = (
        proxy("proxy-a", &single(&redis), &b, "").await,
        proxy("proxy-b", &single(&redis), &b, "").await,
    );
    wait_until_sharing(&pa, &pb).await;
    // A hold sent to A makes a login arriving on B wait...
    assert!(admin(&pa, "POST", "/hold?user=bob")
        .await
        .contains("\"held\":true"));
    assert!(admin(&pb, "GET", "/holds").await.contains("bob"));
    let addr_b = pb.addr("imap");
    let waiting = tokio::spawn(async move { imap_login(addr_b, "bob", "password").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "held on B by a hold sent to A");
    // ... and a release sent to B lets it through.
    assert!(admin(&pb, "POST", "/release?user=bob")
        .await
        .contains("\"released\":true"));
    let (mut on_b, ok) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("released")
        .unwrap();
    assert!(ok.starts_with("a OK"), "{ok}");
    // Every proxy lists every proxy's sessions.
    let (mut on_a, ok) = imap_login(pa.addr("imap"), "bob", "password").await;
    assert!(ok.starts_with("a OK"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let listing = admin(&pa, "GET", "/sessions").await;
    assert!(
        listing.contains("\"instance\":\"proxy-a\"")
            && listing.contains("\"instance\":\"proxy-b\""),
        "{listing}"
    );
    // A kick sent to A ends bob's sessions on A and on B.
    on_a.send(b"i IDLE\r\n").await;
    on_a.line().await;
    on_b.send(b"i IDLE\r\n").await;
    on_b.line().await;
    let kicked = admin(&pa, "POST", "/kick?user=bob").await;
    assert!(kicked.contains("\"fleet\":true"), "{kicked}");
    for c in [&mut on_a, &mut on_b] {
        let rest = c.until("* BYE").await;
        assert!(rest.last().unwrap().contains("administrator"), "{rest:?}");
    }
    pa.stop().await;
    pb.stop().await;
}

#[tokio::test]
async fn the_bridge_and_the_throttle_span_the_fleet() {
    let Some(redis) = Redis::start() else { return };
    bridge_and_throttle(&single(&redis)).await;
}

#[tokio::test]
async fn a_redis_cluster_serves_the_fleet_too() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let state = cluster.state();
    bridge_and_throttle(&state).await;
    let b = backends().await;
    let (pa, pb) = (
        proxy("proxy-a", &state, &b, "").await,
        proxy("proxy-b", &state, &b, "").await,
    );
    wait_until_sharing(&pa, &pb).await;
    assert!(admin(&pa, "POST", "/hold?user=bob")
        .await
        .contains("\"held\":true"));
    let addr_b = pb.addr("imap");
    let waiting = tokio::spawn(async move { imap_login(addr_b, "bob", "password").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished(), "held on B by a hold sent to A");
    admin(&pb, "POST", "/release?user=bob").await;
    let (_, ok) = waiting.await.unwrap();
    assert!(ok.starts_with("a OK"), "{ok}");
    pa.stop().await;
    pb.stop().await;
}

/// The bridge and the throttle across two proxies sharing `state`.
async fn bridge_and_throttle(state: &str) {
    let b = backends().await;
    let extra = "auth_throttle: { user_failures: 3, ip_failures: 0, delay: 10ms, max_delay: 20ms }";
    let (pa, pb) = (
        proxy("proxy-a", state, &b, extra).await,
        proxy("proxy-b", state, &b, extra).await,
    );
    wait_until_sharing(&pa, &pb).await;
    // A POP3 login through A opens the window for SMTP arriving on B.
    let mut p = Client::connect(pa.addr("pop3")).await;
    p.line().await;
    p.send(b"USER bob\r\nPASS password\r\n").await;
    p.line().await;
    assert!(
        p.line().await.unwrap().starts_with("+OK"),
        "POP3 login on A"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = Client::connect(pb.addr("compat")).await;
    s.line().await;
    s.send(b"EHLO c\r\n").await;
    s.until("250 ").await;
    s.send(b"MAIL FROM:<bob@example.net>\r\n").await;
    let reply = s.line().await.unwrap();
    assert!(reply.starts_with("250"), "bridged on B: {reply}");
    // Two failures on A, a success on B: B clears the fleet-wide count (so three more
    // are needed below).
    for _ in 0..2 {
        let (_, r) = imap_login(pa.addr("imap"), "carol", "wrong").await;
        assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, r) = imap_login(pb.addr("imap"), "carol", "password").await;
    assert!(r.starts_with("a OK"), "{r}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Failed logins spread over A and B block at exactly 3.
    for (i, proxy) in [&pa, &pb, &pa].into_iter().enumerate() {
        let (_, r) = imap_login(proxy.addr("imap"), "carol", "wrong").await;
        assert!(
            r.starts_with("a NO [AUTHENTICATIONFAILED]"),
            "failure {i}: {r}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for proxy in [&pb, &pa] {
        let (_, r) = imap_login(proxy.addr("imap"), "carol", "password").await;
        assert!(
            r.contains("Too many failed logins"),
            "blocked fleet-wide: {r}"
        );
    }
    // Another user is not affected.
    let (_, r) = imap_login(pb.addr("imap"), "alice", "password").await;
    assert!(r.starts_with("a OK"), "{r}");
    // The stragglers of both proxies, on either.
    let report = admin(&pb, "GET", "/stragglers?hours=1").await;
    assert!(report.contains("\"instance\":\"proxy-a\""), "{report}");
    assert!(report.contains("\"instance\":\"proxy-b\""), "{report}");
    pa.stop().await;
    pb.stop().await;
}

#[tokio::test]
async fn losing_redis_degrades_sharing_and_its_return_resumes_it() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let b = backends().await;
    let (pa, pb) = (
        proxy("proxy-a", &single(&redis), &b, "").await,
        proxy("proxy-b", &single(&redis), &b, "").await,
    );
    wait_until_sharing(&pa, &pb).await;
    redis.kill();
    // Logins go on, on local state; the gauge says the store is down.
    let started = Instant::now();
    let (_, r) = imap_login(pa.addr("imap"), "bob", "password").await;
    assert!(r.starts_with("a OK"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a dead Redis must not stall logins"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(pa.metrics_addr()).await;
        if metric(
            &body,
            "cutover_state_backend_up",
            &[("instance_name", "proxy-a")],
        ) == Some(0.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the gauge never fell: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back: both reconnect by themselves and share again.
    redis.spawn();
    wait_until_up(&pa).await;
    wait_until_up(&pb).await;
    wait_until_sharing(&pa, &pb).await;
    assert!(admin(&pa, "POST", "/hold?user=alice")
        .await
        .contains("\"held\":true"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !admin(&pb, "GET", "/holds").await.contains("alice") {
        assert!(Instant::now() < deadline, "the hold never reached B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr_b = pb.addr("imap");
    let waiting = tokio::spawn(async move { imap_login(addr_b, "alice", "password").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "held on B after Redis came back");
    admin(&pa, "POST", "/release?user=alice").await;
    let (_, r) = waiting.await.unwrap();
    assert!(r.starts_with("a OK"), "{r}");
    pa.stop().await;
    pb.stop().await;
}

//! Load: 8,000 concurrent idle logged-in IMAP sessions (in IDLE) through the real proxy
//! binary, plus a stream of logins, held for a minute with no error. Reports the proxy's
//! resident memory per idle session. (The benchmark, not this test, holds the performance
//! targets: nothing here asserts a timing.)
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use cutover::config::Protocol;

const IDLE_SESSIONS: usize = 8_000;
const HOLD: Duration = Duration::from_secs(60);

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn fd_limit() -> u64 {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Hn")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(1024)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn idle_session(addr: std::net::SocketAddr) -> Result<Client, String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    // Generous: this test is about losing nothing, not about speed (CI machines may be busy).
    let mut c = Client::from_stream(s).with_timeout(Duration::from_secs(60));
    let g = c.line().await.ok_or("no greeting")?;
    if !g.starts_with("* OK") {
        return Err(g);
    }
    c.send(b"a LOGIN bob password\r\n").await;
    let r = c.until("a ").await;
    if !r.last().is_some_and(|l| l.starts_with("a OK")) {
        return Err(format!("{r:?}"));
    }
    c.send(b"i IDLE\r\n").await;
    let l = c.line().await.ok_or("no continuation")?;
    if !l.starts_with('+') {
        return Err(l);
    }
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_thousand_idle_sessions_and_a_stream_of_logins_for_a_minute() {
    // The test process holds 2 sockets per session (client and fake backend), the proxy 2.
    let limit = fd_limit();
    assert!(
        limit >= 2 * IDLE_SESSIONS as u64 + 1000,
        "hard fd limit {limit} is too low for this test"
    );
    raise_own_fd_limit();
    let backend = fake("b", Protocol::Imap, |_| {}).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("cutover-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("routes.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listeners:
  - {{ name: imap, protocol: imap, listen: "127.0.0.1:{port}", allow_plaintext_auth: true }}
pools:
  p:
    health: {{ interval: 0s }}
    imap: {{ servers: ["{}"] }}
routes: [{{ pool: p }}]
limits: {{ max_connections: 20000, max_connections_per_ip: 20000 }}
"#,
            backend.addr
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_cutover");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n $(ulimit -Hn) && exec {bin} run --config {}",
            cfg.display()
        ))
        .env("CUTOVER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("proxy starts");
    let child = Killed(child);
    let pid = child.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_kb = rss_kb(pid);

    // Open the idle sessions, 200 at a time.
    let mut idle = Vec::with_capacity(IDLE_SESSIONS);
    let started = Instant::now();
    while idle.len() < IDLE_SESSIONS {
        let batch: Vec<_> = (0..200.min(IDLE_SESSIONS - idle.len()))
            .map(|_| tokio::spawn(idle_session(addr)))
            .collect();
        for h in batch {
            idle.push(
                h.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("idle session {} failed: {e}", idle.len())),
            );
        }
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded_kb = rss_kb(pid);
    let per_session = (loaded_kb.saturating_sub(base_kb) * 1024) / IDLE_SESSIONS as u64;
    eprintln!(
        "load: {IDLE_SESSIONS} idle IMAP sessions opened in {opened:?}; proxy RSS {base_kb} kB -> {loaded_kb} kB: {per_session} bytes per idle session"
    );

    // A stream of logins for a minute, 20 loops.
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + HOLD;
    let loops: Vec<_> = (0..20)
        .map(|_| {
            let (ok, errors) = (ok.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    match tokio::time::timeout(Duration::from_secs(60), async {
                        let s = tokio::net::TcpStream::connect(addr)
                            .await
                            .map_err(|e| e.to_string())?;
                        let mut c = Client::from_stream(s).with_timeout(Duration::from_secs(30));
                        c.line().await.ok_or("no greeting")?;
                        c.send(b"a LOGIN bob password\r\nb LOGOUT\r\n").await;
                        let r = c.until("b ").await;
                        if r.iter().any(|l| l.starts_with("a OK"))
                            && r.last().is_some_and(|l| l.starts_with("b OK"))
                        {
                            Ok(())
                        } else {
                            Err(format!("{r:?}"))
                        }
                    })
                    .await
                    {
                        Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for l in loops {
        l.await.unwrap();
    }
    eprintln!(
        "load: {} logins during the minute, {} errors",
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 100);
    // Every idle session is still alive and answers.
    let mut alive = 0;
    for mut c in idle {
        c.send(b"DONE\r\n").await;
        if c.line().await.is_some_and(|l| l.starts_with("i OK")) {
            alive += 1;
        }
    }
    assert_eq!(alive, IDLE_SESSIONS, "idle sessions lost");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raises this process's soft fd limit to the hard one (the test holds ~16,000 sockets).
fn raise_own_fd_limit() {
    let pid = std::process::id();
    let hard = fd_limit();
    let _ = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
}

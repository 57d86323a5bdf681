//! Throw-away database servers for the integration tests, on loopback addresses of
//! their own, each in its own temporary directory, stopped and removed when dropped:
//! `redis-server` and a PostgreSQL cluster made with `initdb`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the test Redis servers listen: an address of their own, so that picking a free
/// port for one never races with the proxies' listeners on 127.0.0.1.
pub const REDIS_IP: &str = "127.0.0.55";

/// A throw-away redis-server on [`REDIS_IP`] and a free port.
pub struct Redis {
    child: Option<Child>,
    pub ip: &'static str,
    pub port: u16,
    dir: std::path::PathBuf,
    /// Cluster mode (its bus listens on port + 10000).
    pub cluster: bool,
}

impl Redis {
    pub fn start() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("redis-server is not installed: skipping (scripts/test.sh installs it)");
            return None;
        }
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("cutover-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut r = Redis {
            child: None,
            ip: REDIS_IP,
            port,
            dir,
            cluster: false,
        };
        r.spawn();
        Some(r)
    }

    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", self.ip, "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--cluster-enabled", if self.cluster { "yes" } else { "no" }])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.ip, self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/0", self.ip, self.port)
    }
}

/// A port nobody listens on now, on [`REDIS_IP`].
pub fn free_port() -> Option<u16> {
    Some(
        std::net::TcpListener::bind((REDIS_IP, 0))
            .ok()?
            .local_addr()
            .ok()?
            .port(),
    )
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the test PostgreSQL listens.
pub const POSTGRES_IP: &str = "127.0.0.56";

/// A throw-away PostgreSQL cluster (`initdb` in a temporary directory, trust
/// authentication for the role `cutover` on loopback, database `mail`), run as the
/// `postgres` system user when the tests run as root (PostgreSQL refuses root).
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl Postgres {
    /// None (and a message) when PostgreSQL is not installed.
    pub fn start() -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()?;
        let port = std::net::TcpListener::bind((POSTGRES_IP, 0))
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = std::env::temp_dir().join(format!("cutover-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut pg = Postgres {
            child: None,
            port,
            dir,
            bin,
        };
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown the PostgreSQL directory to postgres");
        }
        let status = pg
            .command("initdb")
            .args(["--auth=trust", "--username=cutover", "--no-sync", "-D"])
            .arg(pg.data())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb");
        pg.spawn();
        pg.psql("postgres", "CREATE DATABASE mail");
        Some(pg)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.join("data")
    }

    /// A PostgreSQL program, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn spawn(&mut self) {
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-h", POSTGRES_IP, "-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args(["-c", "fsync=off", "-c", "max_connections=50"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new("psql")
                .args(["-h", POSTGRES_IP, "-p", &self.port.to_string()])
                .args(["-U", "cutover", "-d", "postgres", "-tAc", "SELECT 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The postmaster itself (not runuser, which would pass on a gentler signal):
            // a fast shutdown ends every session at once.
            let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_string))
                .unwrap_or_else(|| c.id().to_string());
            let _ = Command::new("kill").args(["-INT", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs SQL in `db` with psql, returning its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", POSTGRES_IP, "-p", &self.port.to_string()])
            .args([
                "-U",
                "cutover",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The connection string of database `mail`.
    pub fn url(&self) -> String {
        format!("postgres://cutover@{POSTGRES_IP}:{}/mail", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    // The effective user of this process, without a libc binding.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

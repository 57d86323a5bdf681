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
    /// TLS only, with this certificate and key.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
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
            tls: None,
        };
        r.spawn();
        Some(r)
    }

    /// A server that speaks TLS only, with this certificate and key.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<Redis> {
        let mut r = Redis::start()?;
        r.kill();
        r.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        r.spawn();
        Some(r)
    }

    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", self.ip])
            .args(match &self.tls {
                None => vec!["--port".into(), self.port.to_string()],
                Some((cert, key)) => vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    self.port.to_string(),
                    "--tls-cert-file".into(),
                    cert.display().to_string(),
                    "--tls-key-file".into(),
                    key.display().to_string(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ],
            })
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
    /// Serves TLS only (with `cert` and `key`, copied into its directory).
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Postgres {
    /// None (and a message) when PostgreSQL is not installed.
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(None)
    }

    /// A server that accepts TLS connections only, with this certificate and key.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<Postgres> {
        Postgres::start_with(Some((cert.to_path_buf(), key.to_path_buf())))
    }

    fn start_with(tls: Option<(std::path::PathBuf, std::path::PathBuf)>) -> Option<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max();
        let Some(bin) = bin else {
            eprintln!("PostgreSQL is not installed: skipping (scripts/test.sh installs it)");
            return None;
        };
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
            tls: None,
        };
        if let Some((cert, key)) = &tls {
            std::fs::copy(cert, pg.dir.join("server.crt")).ok()?;
            std::fs::copy(key, pg.dir.join("server.key")).ok()?;
            let _ = Command::new("chmod")
                .arg("600")
                .arg(pg.dir.join("server.key"))
                .status();
            pg.tls = tls.clone();
        }
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
        if pg.tls.is_some() {
            // TLS or nothing over TCP.
            let hba = "local all all trust\nhostssl all all 127.0.0.0/8 trust\nhostnossl all all 127.0.0.0/8 reject\n";
            let path = pg.data().join("pg_hba.conf");
            let _ = std::fs::write(&path, hba);
        }
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
            .args(match &self.tls {
                Some(_) => vec![
                    "-c".to_string(),
                    "ssl=on".to_string(),
                    "-c".to_string(),
                    format!("ssl_cert_file={}", self.dir.join("server.crt").display()),
                    "-c".to_string(),
                    format!("ssl_key_file={}", self.dir.join("server.key").display()),
                ],
                None => vec![],
            })
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

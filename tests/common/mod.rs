//! Shared pieces of the integration tests: a proxy on 127.0.0.1:0 in front of in-process
//! fake backends, and a small line-oriented client with optional TLS.
#![allow(dead_code)]

pub mod servers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cutover::backend::Backends;
use cutover::config::{Config, Protocol};
use cutover::demo::{FakeBackend, FakeConfig};
use cutover::server::Running;
use cutover::snapshot::Snapshot;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn certs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("certs")
}

pub fn server_tls() -> Arc<rustls::ServerConfig> {
    let c = certs();
    cutover::tls::server_config(&[cutover::config::CertFiles {
        cert: c.join("proxy.pem"),
        key: c.join("proxy-key.pem"),
    }])
    .expect("demo certificate loads")
}

pub fn client_tls() -> Arc<rustls::ClientConfig> {
    cutover::tls::client_config(Some(&certs().join("ca.pem"))).expect("demo CA loads")
}

/// A fake backend on an ephemeral loopback port.
pub async fn fake(name: &str, protocol: Protocol, f: impl FnOnce(&mut FakeConfig)) -> FakeBackend {
    let mut cfg = FakeConfig::new(name, protocol);
    f(&mut cfg);
    FakeBackend::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("fake backend binds")
}

/// A loopback address where nothing listens (connections are refused).
/// An address where connections are refused. The port stays bound (but not listening) for
/// the rest of the test binary's life, so a server started by a test running beside this
/// one cannot be given the same port and answer where nothing should.
pub async fn dead_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = dead_socket();
    let a = socket.local_addr().unwrap();
    HELD.lock().unwrap().push(socket);
    a
}

/// A bound socket that does not listen: connecting to its address is refused until the test
/// calls `listen` on it (a server that comes back on the same port, with no window in which
/// another test could take the port).
pub fn dead_socket() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket
}

/// A server that accepts connections and never says anything.
pub async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (a, h)
}

pub struct Proxy {
    pub running: Option<Running>,
    pub snap: Arc<Snapshot>,
    pub backends: Backends,
}

impl Proxy {
    /// Starts a proxy from YAML; `certs/` paths resolve to the repository's demo certs.
    pub async fn start(yaml: &str) -> Proxy {
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config =
            Config::from_text(yaml, &base.join("test.yaml"), base).expect("test config is valid");
        let snap = Arc::new(Snapshot::build(config).expect("snapshot builds"));
        let backends = Backends::new();
        let running = cutover::server::start(snap.clone(), backends.clone())
            .await
            .expect("proxy starts");
        Proxy {
            running: Some(running),
            snap,
            backends,
        }
    }
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.running
            .as_ref()
            .unwrap()
            .addr(name)
            .expect("listener exists")
    }
    pub fn metrics_addr(&self) -> SocketAddr {
        self.running
            .as_ref()
            .unwrap()
            .metrics
            .expect("metrics enabled")
    }
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A line-oriented test client.
pub struct Client {
    io: Option<Box<dyn Io>>,
    buf: Vec<u8>,
    timeout: Duration,
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        Client {
            io: Some(Box::new(s)),
            buf: Vec::new(),
            timeout: TIMEOUT,
        }
    }
    /// How long `line` waits for the server (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }
    pub fn from_stream(s: TcpStream) -> Client {
        Client {
            io: Some(Box::new(s)),
            buf: Vec::new(),
            timeout: TIMEOUT,
        }
    }
    pub async fn connect_tls(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        let mut c = Client {
            io: Some(Box::new(s)),
            buf: Vec::new(),
            timeout: TIMEOUT,
        };
        c.start_tls().await;
        c
    }
    /// Runs a TLS handshake on the connection (after STARTTLS). Any buffered plaintext is
    /// an error: the server must not send anything after its go-ahead.
    pub async fn start_tls(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before TLS: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let io = self.io.take().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_tls())
            .connect(name, io)
            .await
            .expect("TLS handshake");
        self.io = Some(Box::new(tls));
    }
    pub async fn send(&mut self, bytes: &[u8]) {
        let io = self.io.as_mut().unwrap();
        io.write_all(bytes).await.expect("write");
        io.flush().await.expect("flush");
    }
    /// Reads one line (without CRLF); None on EOF.
    pub async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..p + 2).collect();
                return Some(String::from_utf8_lossy(&line[..p]).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(self.timeout, self.io.as_mut().unwrap().read(&mut chunk))
                .await
                .expect("server answered in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
    /// Lines up to and including the one starting with `prefix`.
    pub async fn until(&mut self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self
                .line()
                .await
                .unwrap_or_else(|| panic!("EOF while waiting for {prefix:?}; got {out:?}"));
            let done = l.starts_with(prefix);
            out.push(l);
            if done {
                return out;
            }
        }
    }
    /// Sends a command and returns every line up to its tagged reply.
    pub async fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await;
        self.until(&format!("{tag} ")).await
    }
    /// Reads the greeting, then `a LOGIN user password`, asserting the tagged OK.
    pub async fn login_ok(&mut self, user: &str) {
        self.line().await.expect("a greeting");
        let r = self.cmd("a", &format!("LOGIN {user} password")).await;
        assert!(r.last().is_some_and(|l| l.starts_with("a OK")), "{r:?}");
    }
    /// True if the server closes the connection (EOF) within the timeout.
    pub async fn closed(&mut self) -> bool {
        loop {
            match self.line().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }
}

/// Fetches /metrics.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The sum of the samples of `name` whose labels include `labels` (in any order).
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name
                || !labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// What a scripted backend does with one line from the proxy.
pub enum Reply {
    /// Send these bytes.
    Send(Vec<u8>),
    /// Send these bytes, then run a TLS handshake as server (with the demo backend
    /// certificate) and go on inside TLS.
    StartTls(Vec<u8>),
    /// Close the connection.
    Close,
}

/// A deliberately misbehaving backend: sends `greeting`, then answers each line with
/// `respond(line, tls_active)`. Every line it receives is recorded.
pub struct Scripted {
    pub addr: SocketAddr,
    pub received: Arc<std::sync::Mutex<Vec<String>>>,
}

pub async fn scripted(
    greeting: &'static str,
    respond: impl Fn(&str, bool) -> Reply + Send + Sync + 'static,
) -> Scripted {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = received.clone();
    let respond = Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let (rec, respond) = (rec.clone(), respond.clone());
            tokio::spawn(async move {
                let mut io: Box<dyn Io> = Box::new(sock);
                let mut tls = false;
                if io.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = Vec::new();
                let mut pending = String::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match io.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(line) = take_command(&mut buf, &mut pending, &mut io).await {
                        rec.lock().unwrap().push(line.clone());
                        match respond(&line, tls) {
                            Reply::Send(b) => {
                                if io.write_all(&b).await.is_err() {
                                    return;
                                }
                            }
                            Reply::StartTls(b) => {
                                if io.write_all(&b).await.is_err() {
                                    return;
                                }
                                let acceptor = tokio_rustls::TlsAcceptor::from(server_tls());
                                match acceptor.accept(io).await {
                                    Ok(t) => io = Box::new(t),
                                    Err(_) => return,
                                }
                                tls = true;
                                buf.clear();
                            }
                            Reply::Close => return,
                        }
                    }
                }
            });
        }
    });
    Scripted { addr, received }
}

/// Takes one complete IMAP command from `buf`: a line, or lines joined by their literals
/// (`{n}` gets a `+` continuation; the n bytes are taken as they are). None if incomplete.
async fn take_command(
    buf: &mut Vec<u8>,
    pending: &mut String,
    io: &mut Box<dyn Io>,
) -> Option<String> {
    loop {
        let p = buf.windows(2).position(|w| w == b"\r\n")?;
        let line: Vec<u8> = buf.drain(..p + 2).collect();
        let line = String::from_utf8_lossy(&line[..p]).into_owned();
        let literal = line
            .strip_suffix('}')
            .and_then(|l| l.rsplit_once('{'))
            .and_then(|(_, n)| {
                let (n, sync) = match n.strip_suffix('+') {
                    Some(n) => (n, false),
                    None => (n, true),
                };
                n.parse::<usize>().ok().map(|n| (n, sync))
            });
        pending.push_str(&line);
        let Some((n, sync)) = literal else {
            return Some(std::mem::take(pending));
        };
        if sync {
            io.write_all(b"+ go\r\n").await.ok()?;
        }
        while buf.len() < n {
            let mut chunk = [0u8; 4096];
            let got = io.read(&mut chunk).await.ok()?;
            if got == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..got]);
        }
        let data: Vec<u8> = buf.drain(..n).collect();
        pending.push_str(&String::from_utf8_lossy(&data));
    }
}

/// The tag of an IMAP command line.
pub fn tag(line: &str) -> &str {
    line.split(' ').next().unwrap_or("*")
}

/// A directory under the system's temporary directory, removed with everything in it
/// when dropped (also when the test fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/cutover-PREFIX-PID-N`, created empty.
    pub fn new(prefix: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cutover-{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        TempDir(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

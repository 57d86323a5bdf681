//! `cutover demo`, and the small in-process backends it runs: "new", "green" and "mauve",
//! each speaking just enough IMAP, POP3 and SMTP for a routed login, a message to read and
//! a message to send. The integration tests use the same backends.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Protocol};
use crate::proto::sasl;
use crate::snapshot::Snapshot;

/// The demo configuration: the repository's `routes.yaml`.
pub const DEMO_CONFIG: &str = include_str!("../routes.yaml");
const DEMO_CA: &str = include_str!("../certs/ca.pem");
const DEMO_CERT: &str = include_str!("../certs/proxy.pem");
const DEMO_KEY: &str = include_str!("../certs/proxy-key.pem");

/// The demo's users; every demo backend knows all of them.
pub const DEMO_USERS: &[(&str, &str)] = &[
    ("joeuser", "password"),
    ("alice", "password"),
    ("bob", "password"),
    ("carol", "password"),
];

/// How a fake backend behaves.
#[derive(Clone)]
pub struct FakeConfig {
    /// Shown in greetings and in the one message every mailbox holds.
    pub name: String,
    /// Protocol spoken.
    pub protocol: Protocol,
    /// Users and passwords.
    pub users: HashMap<String, String>,
    /// Offer STARTTLS with this config; logins are then refused before TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// IMAP: advertise AUTH=PLAIN and SASL-IR (else only LOGIN works).
    pub imap_plain: bool,
    /// SMTP: accept mail without AUTH (the legacy pop-before-smtp hosts).
    pub smtp_no_auth: bool,
}

impl FakeConfig {
    /// A backend with the demo users.
    pub fn new(name: &str, protocol: Protocol) -> Self {
        FakeConfig {
            name: name.to_string(),
            protocol,
            users: DEMO_USERS
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            tls: None,
            imap_plain: true,
            smtp_no_auth: false,
        }
    }
}

/// One message an SMTP fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Authenticated user, if any.
    pub user: Option<String>,
    /// MAIL FROM.
    pub from: String,
    /// RCPT TO.
    pub to: Vec<String>,
    /// DATA, dot-unstuffed.
    pub data: Vec<u8>,
}

/// A running fake backend.
pub struct FakeBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Messages received (SMTP).
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Logins that succeeded, by user.
    pub logins: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl FakeBackend {
    /// Binds `addr` and serves until stopped or dropped.
    pub async fn start(addr: SocketAddr, cfg: FakeConfig) -> std::io::Result<FakeBackend> {
        Self::serve_on(TcpListener::bind(addr).await?, cfg)
    }

    /// Serves on a listener the caller already holds, until stopped or dropped.
    pub fn serve_on(listener: TcpListener, cfg: FakeConfig) -> std::io::Result<FakeBackend> {
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let received = Arc::new(Mutex::new(Vec::new()));
        let logins = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            cfg,
            received: received.clone(),
            logins: logins.clone(),
        });
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let shared = shared.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(shared, sock) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Ok(FakeBackend {
            addr,
            received,
            logins,
            stop,
        })
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    cfg: FakeConfig,
    received: Arc<Mutex<Vec<Received>>>,
    logins: Arc<Mutex<Vec<String>>>,
}

impl Shared {
    fn check(&self, user: &str, pass: &[u8]) -> bool {
        let ok = self
            .cfg
            .users
            .get(user)
            .is_some_and(|p| p.as_bytes() == pass);
        if ok {
            if let Ok(mut l) = self.logins.lock() {
                l.push(user.to_string());
            }
        }
        ok
    }
    fn message(&self) -> String {
        format!(
            "From: demo@{0}\r\nTo: you@example.net\r\nSubject: hello from {0}\r\n\r\nThis mailbox lives on the {0} server.\r\n",
            self.cfg.name
        )
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn serve(shared: Arc<Shared>, sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let mut io: BufReader<Box<dyn Io>> = BufReader::new(Box::new(sock));
    let mut secure = false;
    loop {
        let upgrade = match shared.cfg.protocol {
            Protocol::Imap => imap(&shared, &mut io, secure).await,
            Protocol::Pop3 => pop3(&shared, &mut io, secure).await,
            Protocol::Smtp => smtp(&shared, &mut io, secure).await,
        };
        let (true, Some(tls)) = (upgrade, shared.cfg.tls.clone()) else {
            return;
        };
        // Anything buffered before the handshake is dropped with the BufReader.
        let inner = io.into_inner();
        match tokio_rustls::TlsAcceptor::from(tls).accept(inner).await {
            Ok(t) => {
                io = BufReader::new(Box::new(t));
                secure = true;
            }
            Err(_) => return,
        }
    }
}

async fn read_line(io: &mut BufReader<Box<dyn Io>>) -> Option<String> {
    let mut line = Vec::new();
    let n = (&mut *io)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await
        .ok()?;
    if n == 0 {
        return None;
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Some(String::from_utf8_lossy(&line).into_owned())
}

async fn send(io: &mut BufReader<Box<dyn Io>>, s: &str) -> Option<()> {
    io.get_mut().write_all(s.as_bytes()).await.ok()?;
    io.get_mut().flush().await.ok()
}

/// Splits an IMAP command into tokens: atoms, quoted strings, literals (read here,
/// sending `+` for synchronizing ones).
async fn imap_tokens(io: &mut BufReader<Box<dyn Io>>, first: String) -> Option<Vec<Vec<u8>>> {
    let mut tokens = Vec::new();
    let mut line = first;
    loop {
        let bytes = line.as_bytes();
        let mut i = 0;
        let mut literal = None;
        while i < bytes.len() {
            match bytes[i] {
                b' ' => i += 1,
                b'"' => {
                    let mut s = Vec::new();
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        if bytes[i] == b'\\' && i + 1 < bytes.len() {
                            i += 1;
                        }
                        s.push(bytes[i]);
                        i += 1;
                    }
                    i += 1;
                    tokens.push(s);
                }
                b'{' if line.ends_with('}') => {
                    let spec = &line[i + 1..line.len() - 1];
                    let (n, sync) = match spec.strip_suffix('+') {
                        Some(n) => (n.parse::<usize>().ok()?, false),
                        None => (spec.parse::<usize>().ok()?, true),
                    };
                    literal = Some((n, sync));
                    break;
                }
                _ => {
                    let start = i;
                    while i < bytes.len() && bytes[i] != b' ' {
                        i += 1;
                    }
                    tokens.push(bytes[start..i].to_vec());
                }
            }
        }
        let Some((n, sync)) = literal else {
            return Some(tokens);
        };
        if n > 64 * 1024 {
            return None;
        }
        if sync {
            send(io, "+ go ahead\r\n").await?;
        }
        let mut data = vec![0u8; n];
        io.read_exact(&mut data).await.ok()?;
        tokens.push(data);
        line = read_line(io).await?;
    }
}

async fn imap(shared: &Shared, io: &mut BufReader<Box<dyn Io>>, secure: bool) -> bool {
    let cfg = &shared.cfg;
    let can_tls = cfg.tls.is_some() && !secure;
    let caps = |authed: bool| {
        let mut c = String::from("IMAP4rev1 ID IDLE LITERAL+ ENABLE");
        if !authed {
            if cfg.imap_plain {
                c.push_str(" SASL-IR AUTH=PLAIN");
            }
            if can_tls {
                c.push_str(" STARTTLS LOGINDISABLED");
            }
        } else {
            c.push_str(" NAMESPACE UIDPLUS MOVE");
        }
        c
    };
    if !secure {
        let g = format!(
            "* OK [CAPABILITY {}] {} IMAP ready\r\n",
            caps(false),
            cfg.name
        );
        if send(io, &g).await.is_none() {
            return false;
        }
    }
    let mut user: Option<String> = None;
    while let Some(line) = read_line(io).await {
        let Some(tokens) = imap_tokens(io, line).await else {
            return false;
        };
        let tag = String::from_utf8_lossy(tokens.first().map(|t| t.as_slice()).unwrap_or(b"*"))
            .into_owned();
        let cmd = tokens
            .get(1)
            .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase())
            .unwrap_or_default();
        let arg = |n: usize| tokens.get(n).cloned().unwrap_or_default();
        let reply = match cmd.as_str() {
            "CAPABILITY" => format!("* CAPABILITY {}\r\n{tag} OK done\r\n", caps(user.is_some())),
            "NOOP" => format!("{tag} OK NOOP done\r\n"),
            "ID" => format!("* ID (\"name\" \"fake-{}\")\r\n{tag} OK ID done\r\n", cfg.name),
            "LOGOUT" => {
                let _ = send(io, &format!("* BYE bye\r\n{tag} OK LOGOUT done\r\n")).await;
                return false;
            }
            "STARTTLS" if can_tls => {
                if send(io, &format!("{tag} OK Begin TLS\r\n")).await.is_none() {
                    return false;
                }
                return true;
            }
            "LOGIN" | "AUTHENTICATE" if can_tls => format!("{tag} NO [PRIVACYREQUIRED] TLS first\r\n"),
            "LOGIN" => {
                let u = String::from_utf8_lossy(&arg(2)).into_owned();
                if shared.check(&u, &arg(3)) {
                    user = Some(u);
                    format!("{tag} OK [CAPABILITY {}] Logged in\r\n", caps(true))
                } else {
                    format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                }
            }
            "AUTHENTICATE" if cfg.imap_plain && arg(2).eq_ignore_ascii_case(b"PLAIN") => {
                let ir = match tokens.get(3) {
                    Some(ir) => ir.clone(),
                    None => {
                        if send(io, "+ \r\n").await.is_none() {
                            return false;
                        }
                        match read_line(io).await {
                            Some(l) => l.into_bytes(),
                            None => return false,
                        }
                    }
                };
                match sasl::decode_base64(&ir).ok().and_then(|d| sasl::parse_plain(d).ok()) {
                    Some(c) if shared.check(&c.user, c.secret().map_or(&[][..], |s| s.expose())) => {
                        user = Some(c.user.clone());
                        format!("{tag} OK [CAPABILITY {}] Logged in\r\n", caps(true))
                    }
                    _ => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                }
            }
            "SELECT" | "EXAMINE" if user.is_some() => format!(
                "* FLAGS (\\Seen)\r\n* 1 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n* OK [UIDNEXT 2] ok\r\n{tag} OK [READ-WRITE] selected\r\n"
            ),
            "FETCH" | "UID" if user.is_some() => {
                let msg = shared.message();
                format!("* 1 FETCH (UID 1 BODY[] {{{}}}\r\n{})\r\n{tag} OK FETCH done\r\n", msg.len(), msg)
            }
            "IDLE" if user.is_some() => {
                if send(io, "+ idling\r\n").await.is_none() {
                    return false;
                }
                match read_line(io).await {
                    Some(l) if l.eq_ignore_ascii_case("DONE") => format!("{tag} OK IDLE terminated\r\n"),
                    _ => return false,
                }
            }
            "LIST" | "LSUB" if user.is_some() => format!("* LIST () \"/\" INBOX\r\n{tag} OK LIST done\r\n"),
            _ if user.is_some() => format!("{tag} OK {cmd} done\r\n"),
            _ => format!("{tag} BAD unknown command\r\n"),
        };
        if send(io, &reply).await.is_none() {
            return false;
        }
    }
    false
}

async fn pop3(shared: &Shared, io: &mut BufReader<Box<dyn Io>>, secure: bool) -> bool {
    let cfg = &shared.cfg;
    let can_tls = cfg.tls.is_some() && !secure;
    if !secure
        && send(io, &format!("+OK {} POP3 ready\r\n", cfg.name))
            .await
            .is_none()
    {
        return false;
    }
    let mut user: Option<String> = None;
    let mut authed = false;
    while let Some(line) = read_line(io).await {
        let (cmd, arg) = match line.split_once(' ') {
            Some((c, a)) => (c.to_ascii_uppercase(), a.to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        let msg = shared.message().replace("\r\n.", "\r\n..");
        let reply = match cmd.as_str() {
            "CAPA" => {
                let mut c =
                    String::from("+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\nUIDL\r\nTOP\r\n");
                if can_tls {
                    c.push_str("STLS\r\n");
                }
                c + ".\r\n"
            }
            "STLS" if can_tls => {
                if send(io, "+OK Begin TLS\r\n").await.is_none() {
                    return false;
                }
                return true;
            }
            "USER" | "PASS" | "AUTH" if can_tls => "-ERR TLS first\r\n".to_string(),
            "USER" if !authed => {
                user = Some(arg);
                "+OK\r\n".to_string()
            }
            "PASS" if !authed => match user.take() {
                Some(u) if shared.check(&u, arg.as_bytes()) => {
                    authed = true;
                    "+OK Logged in.\r\n".to_string()
                }
                _ => "-ERR [AUTH] Authentication failed.\r\n".to_string(),
            },
            "AUTH" if !authed && arg.to_ascii_uppercase().starts_with("PLAIN") => {
                let ir = match arg.split_once(' ') {
                    Some((_, ir)) => ir.to_string(),
                    None => {
                        if send(io, "+ \r\n").await.is_none() {
                            return false;
                        }
                        read_line(io).await.unwrap_or_default()
                    }
                };
                match sasl::decode_base64(ir.as_bytes())
                    .ok()
                    .and_then(|d| sasl::parse_plain(d).ok())
                {
                    Some(c)
                        if shared.check(&c.user, c.secret().map_or(&[][..], |s| s.expose())) =>
                    {
                        authed = true;
                        "+OK Logged in.\r\n".to_string()
                    }
                    _ => "-ERR [AUTH] Authentication failed.\r\n".to_string(),
                }
            }
            "STAT" if authed => format!("+OK 1 {}\r\n", msg.len()),
            "LIST" if authed => format!("+OK 1 messages\r\n1 {}\r\n.\r\n", msg.len()),
            "UIDL" if authed => "+OK\r\n1 msg-1\r\n.\r\n".to_string(),
            "RETR" if authed && arg.trim() == "1" => {
                format!("+OK {} octets\r\n{}.\r\n", msg.len(), msg)
            }
            "NOOP" if authed => "+OK\r\n".to_string(),
            "QUIT" => {
                let _ = send(io, "+OK Bye\r\n").await;
                return false;
            }
            _ => "-ERR unknown command\r\n".to_string(),
        };
        if send(io, &reply).await.is_none() {
            return false;
        }
    }
    false
}

async fn smtp(shared: &Shared, io: &mut BufReader<Box<dyn Io>>, secure: bool) -> bool {
    let cfg = &shared.cfg;
    let can_tls = cfg.tls.is_some() && !secure;
    if !secure
        && send(io, &format!("220 {} ESMTP fake\r\n", cfg.name))
            .await
            .is_none()
    {
        return false;
    }
    let mut user: Option<String> = None;
    let mut from: Option<String> = None;
    let mut to = Vec::new();
    while let Some(line) = read_line(io).await {
        let (cmd, arg) = match line.split_once(' ') {
            Some((c, a)) => (c.to_ascii_uppercase(), a.to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        let may_send = user.is_some() || cfg.smtp_no_auth;
        let reply = match cmd.as_str() {
            "EHLO" => {
                let mut r = format!("250-{}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 10240000\r\n250-XFAKE\r\n", cfg.name);
                if can_tls {
                    r.push_str("250-STARTTLS\r\n");
                } else if !cfg.smtp_no_auth {
                    r.push_str("250-AUTH PLAIN LOGIN\r\n");
                }
                r + "250 ENHANCEDSTATUSCODES\r\n"
            }
            "HELO" => format!("250 {}\r\n", cfg.name),
            "STARTTLS" if can_tls => {
                if send(io, "220 2.0.0 go ahead\r\n").await.is_none() {
                    return false;
                }
                return true;
            }
            "AUTH" if !can_tls && !cfg.smtp_no_auth => {
                let mut parts = arg.split(' ');
                let mech = parts.next().unwrap_or("").to_ascii_uppercase();
                let creds = if mech == "PLAIN" {
                    let ir = match parts.next() {
                        Some(ir) => ir.to_string(),
                        None => {
                            if send(io, "334 \r\n").await.is_none() {
                                return false;
                            }
                            read_line(io).await.unwrap_or_default()
                        }
                    };
                    sasl::decode_base64(ir.as_bytes())
                        .ok()
                        .and_then(|d| sasl::parse_plain(d).ok())
                        .map(|c| {
                            (
                                c.user.clone(),
                                c.secret().map(|s| s.expose().to_vec()).unwrap_or_default(),
                            )
                        })
                } else if mech == "LOGIN" {
                    let _ = send(io, "334 VXNlcm5hbWU6\r\n").await;
                    let u = read_line(io).await.unwrap_or_default();
                    let _ = send(io, "334 UGFzc3dvcmQ6\r\n").await;
                    let p = read_line(io).await.unwrap_or_default();
                    match (
                        sasl::decode_base64(u.as_bytes()),
                        sasl::decode_base64(p.as_bytes()),
                    ) {
                        (Ok(u), Ok(p)) => Some((String::from_utf8_lossy(&u).into_owned(), p)),
                        _ => None,
                    }
                } else {
                    None
                };
                match creds {
                    Some((u, p)) if shared.check(&u, &p) => {
                        user = Some(u);
                        "235 2.7.0 Authentication successful\r\n".to_string()
                    }
                    _ => "535 5.7.8 Authentication credentials invalid\r\n".to_string(),
                }
            }
            "MAIL" if may_send => {
                from = Some(arg);
                "250 2.1.0 Ok\r\n".to_string()
            }
            "MAIL" => "530 5.7.0 Authentication required\r\n".to_string(),
            "RCPT" if from.is_some() => {
                to.push(arg);
                "250 2.1.5 Ok\r\n".to_string()
            }
            "DATA" if !to.is_empty() => {
                if send(io, "354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await
                    .is_none()
                {
                    return false;
                }
                let mut data = Vec::new();
                loop {
                    let Some(l) = read_line(io).await else {
                        return false;
                    };
                    if l == "." {
                        break;
                    }
                    data.extend_from_slice(l.strip_prefix('.').unwrap_or(&l).as_bytes());
                    data.extend_from_slice(b"\r\n");
                }
                if let Ok(mut r) = shared.received.lock() {
                    r.push(Received {
                        user: user.clone(),
                        from: from.take().unwrap_or_default(),
                        to: std::mem::take(&mut to),
                        data,
                    });
                }
                "250 2.0.0 Ok: queued\r\n".to_string()
            }
            "RSET" => {
                from = None;
                to.clear();
                "250 2.0.0 Ok\r\n".to_string()
            }
            "NOOP" => "250 2.0.0 Ok\r\n".to_string(),
            "QUIT" => {
                let _ = send(io, "221 2.0.0 Bye\r\n").await;
                return false;
            }
            _ => "502 5.5.2 Error: command not recognized\r\n".to_string(),
        };
        if send(io, &reply).await.is_none() {
            return false;
        }
    }
    false
}

fn write_demo_files(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("certs"))?;
    std::fs::write(dir.join("certs/ca.pem"), DEMO_CA)?;
    std::fs::write(dir.join("certs/proxy.pem"), DEMO_CERT)?;
    std::fs::write(dir.join("certs/proxy-key.pem"), DEMO_KEY)?;
    std::fs::write(dir.join("routes.yaml"), DEMO_CONFIG)?;
    Ok(())
}

/// Starts one fake backend per configured server: pool "new" gets backends named "new",
/// other pools name theirs "green", "mauve", then "legacy-N".
pub async fn start_backends(snap: &Snapshot) -> Result<Vec<FakeBackend>, String> {
    let tls = crate::tls::server_config(&snap.config.certificates).ok();
    let mut out = Vec::new();
    for (pool_name, pool) in &snap.config.pools {
        for (proto, pp) in &pool.protocols {
            for (i, addr) in pp.servers.iter().enumerate() {
                let name = if pool_name == "new" {
                    "new".to_string()
                } else {
                    ["green", "mauve"]
                        .get(i)
                        .map(|s| s.to_string())
                        .unwrap_or(format!("legacy-{i}"))
                };
                let crate::config::Host::Ip(ip) = addr.host else {
                    return Err(format!("demo backends need IP addresses, not {addr}"));
                };
                let mut fc = FakeConfig::new(&name, *proto);
                if pp.tls == crate::proto::BackendTls::StartTls {
                    fc.tls = tls.clone();
                }
                fc.smtp_no_auth = pp.auth == crate::config::SmtpAuth::PopBeforeSmtp;
                let b = FakeBackend::start(SocketAddr::new(ip, addr.port), fc)
                    .await
                    .map_err(|e| format!("demo backend {name} {proto} on {addr}: {e}"))?;
                out.push(b);
            }
        }
    }
    Ok(out)
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let dir: PathBuf = std::env::temp_dir().join(format!("cutover-demo-{}", std::process::id()));
    write_demo_files(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = Config::from_text(DEMO_CONFIG, &dir.join("routes.yaml"), &dir)
        .map_err(|e| e.to_string())?;
    let snap = Arc::new(Snapshot::build(config).map_err(|e| e.to_string())?);
    let backends = start_backends(&snap).await?;
    let running = crate::server::start(snap.clone(), crate::backend::Backends::new())
        .await
        .map_err(|e| e.to_string())?;
    let ca = dir.join("certs/ca.pem");
    let addr = |n: &str| {
        running
            .addr(n)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "\ncutover demo is running (Ctrl-C stops it). Demo users: joeuser, alice, bob, carol; password: password.\n\
         joeuser and alice are routed to the \"new\" pool by name, carol by the 30% rule; bob goes to \"legacy\" (green, failing over to mauve).\n\n\
         Read mail (the subject names the server that answered):\n\
         \x20 curl --cacert {ca} 'imaps://{imaps}/INBOX;UID=1' -u joeuser:password\n\
         \x20 curl --cacert {ca} 'imaps://{imaps}/INBOX;UID=1' -u bob:password\n\
         \x20 curl --ssl-reqd --cacert {ca} 'imap://{imap}/INBOX;UID=1' -u alice:password\n\
         \x20 curl --cacert {ca} 'pop3s://{pop3s}/1' -u carol:password\n\n\
         Send mail:\n\
         \x20 printf 'Subject: hi\\r\\n\\r\\nhello\\r\\n' | curl --ssl-reqd --cacert {ca} smtp://{sub} -u joeuser:password --mail-from joeuser@example.net --mail-rcpt you@example.net -T -\n\n\
         See the decision:  cutover route --config routes.yaml bob\n\
         Metrics:           curl http://{metrics}/metrics\n",
        ca = ca.display(),
        imaps = addr("imaps"),
        imap = addr("imap"),
        pop3s = addr("pop3s"),
        sub = addr("submission"),
        metrics = running.metrics.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
    );
    shutdown.await;
    running.shutdown().await;
    drop(backends);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

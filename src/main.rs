//! The `cutover` command line. No logic lives here: every command calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use cutover::config::{rfc3339, Config, Protocol};
use cutover::snapshot::Snapshot;

/// `cutover --version`: the version, the git commit it was built from and the TLS stack.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CUTOVER_GIT_COMMIT"),
    "; TLS: rustls 0.23 with ring, key exchange from aws-lc-rs)"
);

#[derive(Parser)]
#[command(
    name = "cutover",
    version = LONG_VERSION,
    about = "Mail front proxy for migrating users between server pools"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (SIGHUP or a changed file reloads; SIGTERM/SIGINT drains and stops).
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
        /// Take the listening sockets over from the process serving on `upgrade.socket`
        /// (what `cutover upgrade` starts the new binary with).
        #[arg(long)]
        takeover: bool,
    },
    /// Replace the running proxy by this binary without refusing a connection: the new
    /// process takes over the listening sockets, then the old one drains and exits.
    Upgrade {
        /// Configuration file (names `upgrade.socket`).
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
        /// The binary to start (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Ask the running proxy whether it is ready (exit 0) or not (exit 1), through its
    /// metrics or admin endpoint (`GET /ready`).
    Healthcheck {
        /// Configuration file (names the endpoints).
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Write the man pages or shell completions (for packaging).
    #[command(hide = true)]
    Generate {
        /// `man` or `completions`.
        what: String,
        /// Directory to write into.
        dir: PathBuf,
    },
    /// Validate a configuration file (exit 0 if valid) and list its stages.
    Check {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
    },
    /// Show where a user would be routed, now or at another time.
    Route {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
        /// Protocol.
        #[arg(long, short, default_value = "imap")]
        protocol: String,
        /// Decide as of this RFC 3339 time (default: now), e.g. 2026-12-01T18:13:00Z.
        #[arg(long)]
        at: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Ask the running proxy (its admin endpoint): the configuration in force there
        /// and its lookup caches (hit, stale). Without it, lookups are asked live.
        #[arg(long)]
        proxy: bool,
        /// The user name, as a client would send it.
        user: String,
    },
    /// End a user's relayed sessions (through the admin endpoint of the running proxy).
    Kick(AdminArgs),
    /// Make a user's new logins wait until released (for the final mailbox copy).
    Hold(AdminArgs),
    /// Let a held user's logins through to the route in force.
    Release(AdminArgs),
    /// Make a user's cached route lookup answers stale (on every proxy of a fleet): the
    /// next login reads the database.
    Forget(AdminArgs),
    /// List users still served by a legacy pool or logging in without TLS.
    Stragglers {
        /// Configuration file (names the admin endpoint).
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
        /// Look back this many hours.
        #[arg(long, default_value_t = 24)]
        hours: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the proxy with embedded demo backends "new", "green" and "mauve" on loopback.
    Demo,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print the effective configuration after defaults, secrets redacted.
    Dump {
        /// Configuration file.
        #[arg(long, short, default_value = "routes.yaml")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Configuration file (names the admin endpoint).
    #[arg(long, short, default_value = "routes.yaml")]
    config: PathBuf,
    /// User name.
    user: String,
}

/// Where logs go once an upgrade handed this process the old one's standard error (the
/// service's journal); until then, this process's own.
static LOG_TARGET: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// The log writer: the handed-over target, else standard error.
fn log_writer() -> Box<dyn std::io::Write> {
    match LOG_TARGET.get() {
        Some(f) => Box::new(f),
        None => Box::new(std::io::stderr()),
    }
}

/// Whether standard error is the systemd journal (`JOURNAL_STREAM` names its device and
/// inode): then the journal adds the time, and the level goes as a syslog priority.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// Text lines for the journal: `<priority>` (sd-daemon(3)) instead of a time and a level.
struct JournalFormat<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(log_writer);
    match format {
        LogFormat::Text if stderr_is_journal() => {
            let plain = tracing_subscriber::fmt::format()
                .without_time()
                .with_level(false)
                .with_ansi(false);
            builder
                .with_ansi(false)
                .event_format(JournalFormat(plain))
                .init()
        }
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn load(path: &Path) -> Result<Snapshot, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    Snapshot::build(config).map_err(|e| format!("{}: {e}", path.display()))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

fn check(path: &Path) -> ExitCode {
    let snap = match load(path) {
        Ok(s) => s,
        Err(e) => return fail(e, 2),
    };
    let c = &snap.config;
    println!("{}: OK", path.display());
    for l in &c.listeners {
        let bridge = l
            .bridge_window
            .map(|w| format!(", pop-before-smtp bridge {}s", w.as_secs()))
            .unwrap_or_default();
        println!(
            "  listener {:<12} {} on {} (tls {:?}{bridge})",
            l.name, l.protocol, l.listen, l.tls
        );
    }
    for (name, p) in &c.pools {
        let protos: Vec<String> = p
            .protocols
            .iter()
            .map(|(proto, pp)| {
                format!(
                    "{proto} {}",
                    pp.servers
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
            .collect();
        println!("  pool     {name:<12} {}", protos.join("; "));
    }
    for (name, l) in &c.lookups {
        let source = match &l.source {
            cutover::config::LookupSource::Postgres { url, .. } => {
                format!("postgres {}", cutover::config::redact_dsn(url))
            }
            cutover::config::LookupSource::Redis { url, key, .. } => {
                format!("redis {} key {key}", cutover::config::redact_dsn(url))
            }
        };
        println!(
            "  lookup   {name:<12} {source}, timeout {}ms, ttl {}s (no row {}s, stale for {}s), on error {}",
            l.timeout.as_millis(),
            l.cache.ttl.as_secs(),
            l.cache.negative_ttl.as_secs(),
            l.cache.stale_for.as_secs(),
            if l.on_error_next { "next rule" } else { "tempfail" }
        );
    }
    let now = rfc3339::now();
    let (active, _) = c.routes_at(now);
    println!(
        "  routes   {} top-level{}",
        c.routes.len(),
        if active.is_none() {
            " (in force now)"
        } else {
            ""
        }
    );
    for r in &c.routes {
        println!("           {}", r.text);
    }
    for s in &c.stages {
        let state = if Some(s.name.as_str()) == active {
            "in force now"
        } else if s.from > now {
            "scheduled"
        } else {
            "past"
        };
        println!(
            "  stage    {:<12} from {} ({state}), {} routes",
            s.name,
            rfc3339::format(s.from),
            s.routes.len()
        );
        for r in &s.routes {
            println!("           {}", r.text);
        }
    }
    running_differences(path, c);
    ExitCode::SUCCESS
}

/// With a running proxy (reachable through the admin endpoint the file names): which
/// changed settings a reload will not apply.
fn running_differences(path: &Path, file: &Config) {
    let Ok(body) = admin(path, "GET", "/config") else {
        return;
    };
    let Ok(running) = serde_json::from_str::<serde_json::Value>(&body) else {
        return;
    };
    let wanted = cutover::config::dump::to_value(file);
    let keys = cutover::config::dump::restart_keys(&running, &wanted);
    if keys.is_empty() {
        println!("  running  a reload applies every change in this file");
    } else {
        println!(
            "  running  a reload applies this file except {}: they need a restart (or cutover upgrade)",
            keys.join(", ")
        );
    }
}

fn route(config: &Path, protocol: &str, at: Option<&str>, json: bool, user: &str) -> ExitCode {
    let protocol: Protocol = match protocol.parse() {
        Ok(p) => p,
        Err(e) => return fail(e, 2),
    };
    let now = match at {
        Some(t) => match rfc3339::parse(t) {
            Ok(t) => t,
            Err(e) => return fail(e, 2),
        },
        None => rfc3339::now(),
    };
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    if !cfg.lookups.is_empty() {
        return route_with_lookups(&cfg, protocol, now, json, user);
    }
    match cutover::route::route(&cfg, user, protocol, now) {
        Ok(d) if json => match serde_json::to_string(&d) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        Ok(d) => {
            print!("{}", d.explain());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

/// `cutover route` for a configuration with lookups: they are asked live.
fn route_with_lookups(
    cfg: &Config,
    protocol: Protocol,
    now: i64,
    json: bool,
    user: &str,
) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start runtime: {e}"), 1),
    };
    let routed = rt.block_on(async {
        let lookups = cutover::lookup::Lookups::new(cfg);
        let normalized = cutover::config::normalize(&cfg.users, user);
        cutover::lookup::route(&lookups, cfg, user, &normalized, protocol, now).await
    });
    print_routed(
        &routed.to_json(),
        &routed.explain(),
        json,
        routed.result.is_ok(),
    )
}

fn print_routed(v: &serde_json::Value, text: &str, json: bool, ok: bool) -> ExitCode {
    if json {
        println!("{v}");
    } else {
        print!("{text}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `cutover route --proxy`: the running proxy's answer, through its caches.
fn route_by_proxy(config: &Path, protocol: &str, json: bool, user: &str) -> ExitCode {
    let path = format!(
        "/route?user={}&protocol={}",
        cutover::http::percent_encode(user),
        cutover::http::percent_encode(protocol)
    );
    let body = match admin(config, "GET", &path) {
        Ok(b) => b,
        Err(e) => return fail(e, 1),
    };
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => return fail(format!("admin endpoint: {e}"), 1),
    };
    let ok = v.get("error").is_none();
    let text = if ok {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
        let servers: Vec<String> = (v.get("servers").and_then(|x| x.as_array()))
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut t = format!(
            "user:     {}\npool:     {}\nservers:  {}\nrule:     {}\n",
            s("user"),
            s("pool"),
            servers.join(", "),
            s("rule")
        );
        for l in v
            .get("lookups")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            t.push_str(&format!("lookup:   {l}\n"));
        }
        t
    } else {
        format!("no decision: {}\n", v["error"].as_str().unwrap_or("-"))
    };
    print_routed(&v, &text, json, ok)
}

/// Calls the admin endpoint named in the configuration.
fn admin(config: &Path, method: &str, path: &str) -> Result<String, String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let admin = cfg.admin.ok_or_else(|| {
        format!(
            "{}: no admin endpoint configured (admin.listen)",
            config.display()
        )
    })?;
    let rt = runtime()?;
    let (status, body) = rt
        .block_on(cutover::http::request(
            admin.listen,
            method,
            path,
            admin.token.as_deref(),
        ))
        .map_err(|e| {
            format!(
                "admin endpoint {}: {e} (is the proxy running?)",
                admin.listen
            )
        })?;
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("admin endpoint answered {status}: {}", body.trim()))
    }
}

fn admin_user(args: &AdminArgs, action: &str) -> ExitCode {
    let path = format!(
        "/{action}?user={}",
        cutover::http::percent_encode(&args.user)
    );
    match admin(&args.config, "POST", &path) {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

fn stragglers(config: &Path, hours: u32, json: bool) -> ExitCode {
    let body = match admin(config, "GET", &format!("/stragglers?hours={hours}")) {
        Ok(b) => b,
        Err(e) => return fail(e, 1),
    };
    if json {
        print!("{body}");
        return ExitCode::SUCCESS;
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
    println!(
        "{:<24} {:<10} {:<6} {:<14} {:<5} {:<22} {:<16} why",
        "user", "pool", "proto", "listener", "tls", "last seen", "proxy"
    );
    for r in &rows {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        let why: Vec<String> = r
            .get("why")
            .and_then(|w| w.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let tls = r
            .get("tls")
            .and_then(|v| v.as_bool())
            .map(|b| if b { "yes" } else { "no" })
            .unwrap_or("-");
        println!(
            "{:<24} {:<10} {:<6} {:<14} {:<5} {:<22} {:<16} {}",
            s("user"),
            s("pool"),
            s("protocol"),
            s("listener"),
            tls,
            s("last_seen"),
            s("instance"),
            why.join(",")
        );
    }
    println!("{} entries in the last {hours} hours", rows.len());
    ExitCode::SUCCESS
}

fn run(path: PathBuf, format: LogFormat, takeover: bool) -> ExitCode {
    init_logs(format);
    let snap = match load(&path) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!("{e}");
            return fail(e, 2);
        }
    };
    let upgrade_path = snap.config.upgrade_socket.clone();
    // Sockets from systemd (socket activation) or from the process this one replaces.
    let mut inherited = cutover::server::Inherited::new();
    for (name, fds) in cutover::systemd::activated_sockets() {
        let socks = fds.into_iter().map(std::net::TcpListener::from).collect();
        inherited.insert(name, socks);
    }
    let mut handover = None;
    if takeover {
        let Some(up) = &upgrade_path else {
            return fail("--takeover needs upgrade.socket in the configuration", 2);
        };
        match take_over(&snap.config, up, &mut inherited) {
            Ok(h) => handover = Some(h),
            Err(e) => return fail(e, 1),
        }
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start runtime: {e}"), 1),
    };
    let result = rt.block_on(async move {
        let backends = cutover::backend::Backends::with_resolver(
            cutover::backend::resolve::Resolver::new(&snap.config.dns_servers),
        );
        let running = cutover::server::start_with(snap, backends, inherited).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(cutover::reload::watch(running.clone(), path, stop.clone()));
        let taken_over = tokio_util::sync::CancellationToken::new();
        let mut unix = None;
        if let Some((u, conn)) = handover {
            confirm_takeover(upgrade_path.clone().unwrap_or_default(), conn).await;
            unix = u;
        }
        if let Some(up) = upgrade_path {
            if let Err(e) = cutover::upgrade::serve(up, unix, running.clone(), taken_over.clone()) {
                tracing::warn!(error = %e, "upgrade socket unavailable: zero-downtime upgrades disabled");
            }
        }
        let handed_over = tokio::select! {
            _ = shutdown_signal() => false,
            _ = taken_over.cancelled() => true,
        };
        stop.cancel();
        if handed_over {
            running.handed_over().await;
        } else {
            running.shutdown().await;
        }
        Ok::<(), cutover::server::StartError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            fail(e, 1)
        }
    }
}

/// `--takeover`: takes the listening sockets over from the process serving on `up` into
/// `inherited`, except those whose address the configuration no longer names (bound anew;
/// the old socket closes with the old process), and logs where the old process did from
/// now on. Returns the upgrade socket to serve and the connection to confirm on.
fn take_over(
    cfg: &Config,
    up: &Path,
    inherited: &mut cutover::server::Inherited,
) -> Result<
    (
        Option<std::os::unix::net::UnixListener>,
        std::os::unix::net::UnixStream,
    ),
    cutover::upgrade::UpgradeError,
> {
    let (mut socks, unix, log_target, conn) = cutover::upgrade::take_over(up)?;
    tracing::info!(
        sockets = socks.values().map(Vec::len).sum::<usize>(),
        "took the listening sockets over"
    );
    let wanted = (cfg
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), Some(l.listen))))
    .chain([
        (cutover::server::METRICS_SOCKET, cfg.metrics),
        (
            cutover::server::ADMIN_SOCKET,
            cfg.admin.as_ref().map(|a| a.listen),
        ),
    ]);
    for (name, addr) in wanted {
        let moved = socks.get(name).and_then(|v| v.first()).is_some_and(|s| {
            addr.is_none_or(|a| a.port() != 0 && s.local_addr().is_ok_and(|b| b != a))
        });
        if moved {
            tracing::info!(listener = %name, addr = ?addr, "address changed: binding it anew");
            socks.remove(name);
        }
    }
    if let Some(fd) = log_target {
        let _ = LOG_TARGET.set(std::fs::File::from(fd));
    }
    inherited.extend(socks);
    Ok((unix, conn))
}

/// Serving on the inherited sockets now: tells the old process it may stop accepting.
async fn confirm_takeover(up: PathBuf, conn: std::os::unix::net::UnixStream) {
    match tokio::task::spawn_blocking(move || cutover::upgrade::finish_takeover(&up, conn)).await {
        Ok(Ok(old)) => {
            tracing::info!(
                old_pid = old,
                "upgrade: the old process drains; this one serves"
            );
            cutover::systemd::main_pid();
        }
        Ok(Err(e)) => tracing::error!(error = %e, "upgrade: the old process did not confirm"),
        Err(e) => tracing::error!(error = %e, "upgrade: hand-over task failed"),
    }
}

/// `cutover upgrade`: starts the new binary with `--takeover` and waits until it serves.
fn upgrade(config: &Path, binary: Option<PathBuf>) -> ExitCode {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let Some(socket) = cfg.upgrade_socket else {
        return fail(
            format!("{}: no upgrade.socket configured", config.display()),
            2,
        );
    };
    let old = match cutover::upgrade::serving_pid(&socket) {
        Ok(pid) => pid,
        Err(e) => return fail(format!("{e} (is the proxy running?)"), 1),
    };
    let binary = match binary.map(Ok).unwrap_or_else(std::env::current_exe) {
        Ok(b) => b,
        Err(e) => return fail(format!("cannot find this binary: {e}"), 1),
    };
    use std::os::unix::process::CommandExt;
    let startup_log = PathBuf::from(format!("{}.log", socket.display()));
    let show_log = || {
        if let Ok(text) = std::fs::read_to_string(&startup_log) {
            eprint!("{text}");
        }
    };
    let child = std::process::Command::new(&binary)
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--takeover")
        .stdin(std::process::Stdio::null())
        // Nothing of it stays on this command's output (whoever reads it would wait for
        // the new proxy to exit): it logs to a file until the hand-over, then where the
        // old process logged.
        .stdout(std::process::Stdio::null())
        .stderr(match std::fs::File::create(&startup_log) {
            Ok(f) => std::process::Stdio::from(f),
            Err(_) => std::process::Stdio::null(),
        })
        // Its own process group: a terminal's hangup does not reach it.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", binary.display()), 1),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            show_log();
            return fail(
                format!("the new process exited ({status}) before taking over"),
                1,
            );
        }
        if let Ok(pid) = cutover::upgrade::serving_pid(&socket) {
            if pid != old {
                println!("upgraded: pid {pid} serves, pid {old} drains and exits");
                return ExitCode::SUCCESS;
            }
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            show_log();
            return fail("the new process did not take over within 60 s", 1);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `cutover healthcheck`: `GET /ready` on the metrics endpoint (or the admin endpoint).
fn healthcheck(config: &Path) -> ExitCode {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let (addr, token) = match (cfg.metrics, &cfg.admin) {
        (Some(m), _) => (m, None),
        (None, Some(a)) => (a.listen, a.token.clone()),
        (None, None) => return fail("neither metrics.listen nor admin.listen is configured", 2),
    };
    // A wildcard listen address is reached on loopback.
    let addr = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start runtime: {e}"), 1),
    };
    let answer = rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            cutover::http::request(addr, "GET", "/ready", token.as_deref()),
        )
        .await
    });
    match answer {
        Ok(Ok((200, _))) => {
            println!("ready");
            ExitCode::SUCCESS
        }
        Ok(Ok((status, body))) => {
            println!("not ready ({status}: {})", body.trim());
            ExitCode::from(1)
        }
        Ok(Err(e)) => {
            println!("not ready: {addr}: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            println!("not ready: {addr} did not answer within 5 s");
            ExitCode::from(1)
        }
    }
}

/// `cutover generate man|completions DIR`: man pages (cutover.1 and one per command) or
/// completions for bash, zsh and fish.
fn generate(what: &str, dir: &Path) -> ExitCode {
    use clap::CommandFactory;
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(format!("{}: {e}", dir.display()), 1);
    }
    let cmd = Cli::command();
    let result = match what {
        "man" => clap_mangen::generate_to(cmd, dir),
        "completions" => [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ]
        .into_iter()
        .try_for_each(|shell| {
            clap_complete::generate_to(shell, &mut Cli::command(), "cutover", dir).map(|_| ())
        }),
        other => return fail(format!("{other:?}: expected man or completions"), 2),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{}: {e}", dir.display()), 1),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Route {
            config,
            protocol,
            at,
            json,
            proxy,
            user,
        } => {
            if proxy {
                route_by_proxy(&config, &protocol, json, &user)
            } else {
                route(&config, &protocol, at.as_deref(), json, &user)
            }
        }
        Command::Run { config, takeover } => run(config, cli.log_format, takeover),
        Command::Upgrade { config, binary } => upgrade(&config, binary),
        Command::Healthcheck { config } => healthcheck(&config),
        Command::Config {
            action: ConfigAction::Dump { config },
        } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", cutover::config::dump::to_yaml(&c));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 2),
        },
        Command::Generate { what, dir } => generate(&what, &dir),
        Command::Kick(a) => admin_user(&a, "kick"),
        Command::Hold(a) => admin_user(&a, "hold"),
        Command::Release(a) => admin_user(&a, "release"),
        Command::Forget(a) => admin_user(&a, "forget"),
        Command::Stragglers {
            config,
            hours,
            json,
        } => stragglers(&config, hours, json),
        Command::Demo => {
            init_logs(cli.log_format);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start runtime: {e}"), 1),
            };
            match rt.block_on(cutover::demo::run(shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e, 1),
            }
        }
    }
}

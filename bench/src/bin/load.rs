//! `cutover-load`: the load generator of the benchmark (and its report step).
//!
//! Modes (each prints one JSON line on stdout, a human summary on stderr):
//!
//! * `login`: `--concurrency` loops of connect, (implicit TLS 1.3, full handshake), greeting,
//!   `LOGIN`, tagged `OK`, `LOGOUT`, until `--duration`; logins/s, p50/p99 of the login
//!   latency (connect until the tagged OK of LOGIN), errors. `--rate N` caps the loops
//!   together at N login starts per second, evenly spaced.
//! * `throughput`: logged-in sessions that `SELECT` then `FETCH` the server's literal again
//!   and again (`--pipeline` requests in flight); MB/s (10^6 bytes) of literal data.
//! * `idle`: `--sessions` logged-in sessions sitting in `IDLE`; reads `VmRSS` of `--pid`
//!   (summed over several) before and after, and reports bytes per session.
//! * `noop`: one session, `NOOP` round trips; p50/p99.
//! * `storm`: `--sessions` logged-in sessions on `--addr`, each doing `NOOP` round trips
//!   one at a time while `--storm-concurrency` TLS login loops (as in `login`) run against
//!   `--tls-addr`; p50/p99/max of the NOOPs, the storm's logins/s, errors. `--storm-rate N`
//!   caps the storm at N TLS logins per second in all, evenly spaced (the concurrency
//!   stays an upper bound), so that every target can be stormed at the same rate.
//! * `report`: turns a results file written by `compare.sh` into the table and
//!   `BENCHMARKS.md`; `scale-report`: the `## Scale` section from the same file, and its
//!   plot (gnuplot, SVG).
//!
//! With `--users-count N` every login (any mode) is a different user, `PREFIX<k>`
//! (`--users-order`), as `bench/lookups.py` needs for warm and cold lookup caches.
//!
//! Every loop is bounded in time (and count), every I/O step has a timeout, and targets
//! are whatever address is given: `compare.sh` only ever gives loopback addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Parser, Subcommand};
use tokio::net::TcpStream;

use cutover_bench::{micros, percentile, report, Conn, Io};

#[derive(Parser)]
#[command(
    name = "cutover-load",
    about = "IMAP load generator for the cutover benchmarks"
)]
struct Cli {
    /// Worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(ClapArgs, Clone)]
struct Target {
    /// Server address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// Implicit TLS (TLS 1.3, full handshake, no resumption).
    #[arg(long)]
    tls: bool,
    /// CA certificate to trust (PEM), required with --tls.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name to send (SNI) and verify.
    #[arg(long, default_value = "bench.test")]
    sni: String,
    /// Login user.
    #[arg(long, default_value = "bench")]
    user: String,
    /// Login password.
    #[arg(long, default_value = "secret")]
    pass: String,
    /// With `--users-count`: log in as PREFIX<k> instead of `--user`, a different user
    /// per login (k from `--users-start`, see `--users-order`).
    #[arg(long, default_value = "user")]
    users_prefix: String,
    /// Distinct user names to cycle through (0: every login uses `--user`).
    #[arg(long, default_value_t = 0)]
    users_count: u64,
    /// First k of the user names.
    #[arg(long, default_value_t = 0)]
    users_start: u64,
    /// `seq`: the n-th login (over all loops) is user start + (n mod count); `spread`: the
    /// same n mapped through a fixed permutation of 0..count (consecutive logins far apart
    /// in the name space; still each of the count users once per count logins).
    #[arg(long, default_value = "seq", value_parser = ["seq", "spread"])]
    users_order: String,
    /// Per-step I/O timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Verify the server's certificate chain on every connection (default: once per
    /// distinct chain; the handshake signature is checked on every connection anyway).
    #[arg(long)]
    full_verify: bool,
    /// Label printed in the JSON result.
    #[arg(long, default_value = "")]
    label: String,
    /// Tag the JSON result as measured with the processes pinned to CPUs (`"pinned":true`);
    /// the pinning itself is the caller's (`taskset`).
    #[arg(long)]
    pinned: bool,
}

impl Target {
    /// The start of a JSON result line: mode, label, TLS and pinning (no closing brace).
    fn json_head(&self, mode: &str) -> String {
        format!(
            "{{\"mode\":\"{mode}\",\"label\":\"{}\",\"tls\":{},\"pinned\":{}",
            self.label, self.tls, self.pinned
        )
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Login cycles per second.
    Login {
        #[command(flatten)]
        t: Target,
        /// Concurrent login loops.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Upper bound on login cycles.
        #[arg(long, default_value_t = 5_000_000)]
        max_count: u64,
        /// Cap on login starts per second, all loops together, evenly spaced (0: none).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// MB/s of FETCH literals.
    Throughput {
        #[command(flatten)]
        t: Target,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// FETCH commands in flight per session.
        #[arg(long, default_value_t = 2)]
        pipeline: usize,
        /// Upper bound on FETCH commands per session.
        #[arg(long, default_value_t = 1_000_000)]
        max_count: u64,
    },
    /// Resident memory per idle logged-in session.
    Idle {
        #[command(flatten)]
        t: Target,
        /// Sessions to open.
        #[arg(long, default_value_t = 2000)]
        sessions: usize,
        /// Sessions being set up at once.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Processes whose VmRSS is summed (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', required = true)]
        pid: Vec<u32>,
        /// Seconds to wait after the last session is idle before reading RSS.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// NOOP round-trip latency on one session.
    Noop {
        #[command(flatten)]
        t: Target,
        /// Round trips measured (after 500 of warm-up).
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// Upper bound in seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// NOOP latency of established sessions during a TLS login storm.
    Storm {
        /// The established sessions' server (`--addr`, plaintext unless `--tls`); `--ca`
        /// also serves the storm.
        #[command(flatten)]
        t: Target,
        /// Implicit-TLS address the login storm goes to.
        #[arg(long)]
        tls_addr: SocketAddr,
        /// Established sessions, each doing one NOOP at a time.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Concurrent TLS login loops of the storm.
        #[arg(long, default_value_t = 200)]
        storm_concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Upper bound on the storm's login cycles.
        #[arg(long, default_value_t = 5_000_000)]
        max_count: u64,
        /// Cap on the storm's TLS login starts per second, all its loops together, evenly
        /// spaced (0: as fast as the loops go). `--storm-concurrency` stays the upper
        /// bound on logins in flight.
        #[arg(long, default_value_t = 0.0)]
        storm_rate: f64,
    },
    /// Writes the table and BENCHMARKS.md from a results file of compare.sh.
    Report(report::ReportArgs),
    /// Writes the `## Scale` section (and its plot, with gnuplot) from the same results.
    ScaleReport(report::ScaleArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let reported = match &cli.mode {
        Mode::Report(a) => Some(report::run(a)),
        Mode::ScaleReport(a) => Some(report::scale(a)),
        _ => None,
    };
    if let Some(r) = reported {
        return match r {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("report: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cli.mode {
            Mode::Login {
                t,
                concurrency,
                duration,
                max_count,
                rate,
            } => login(t, concurrency, duration, max_count, rate).await,
            Mode::Throughput {
                t,
                concurrency,
                duration,
                pipeline,
                max_count,
            } => throughput(t, concurrency, duration, pipeline, max_count).await,
            Mode::Idle {
                t,
                sessions,
                concurrency,
                pid,
                settle,
            } => idle(t, sessions, concurrency, pid, settle).await,
            Mode::Noop { t, count, duration } => noop(t, count, duration).await,
            Mode::Storm {
                t,
                tls_addr,
                sessions,
                storm_concurrency,
                duration,
                max_count,
                storm_rate,
            } => {
                storm(
                    t,
                    tls_addr,
                    sessions,
                    storm_concurrency,
                    duration,
                    max_count,
                    storm_rate,
                )
                .await
            }
            Mode::Report(_) | Mode::ScaleReport(_) => Ok(()),
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connection settings shared by every task.
struct Dialer {
    t: Target,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    timeout: Duration,
    login: Vec<u8>,
    /// Logins started so far (picks the user with `--users-count`).
    logins: std::sync::atomic::AtomicU64,
}

impl Dialer {
    fn new(t: Target) -> std::io::Result<Arc<Dialer>> {
        let tls = if t.tls {
            let ca =
                t.ca.as_ref()
                    .ok_or_else(|| std::io::Error::other("--tls needs --ca"))?;
            let name = rustls::pki_types::ServerName::try_from(t.sni.clone())
                .map_err(|e| std::io::Error::other(format!("--sni: {e}")))?;
            Some((
                tokio_rustls::TlsConnector::from(cutover_bench::client_config(ca, !t.full_verify)?),
                name,
            ))
        } else {
            None
        };
        let login = format!("a1 LOGIN {} {}\r\n", quote(&t.user), quote(&t.pass)).into_bytes();
        Ok(Arc::new(Dialer {
            timeout: Duration::from_secs_f64(t.timeout),
            t,
            tls,
            login,
            logins: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The LOGIN command of the next login: `--user`, or the next of `--users-count`.
    fn login_line(&self) -> std::borrow::Cow<'_, [u8]> {
        let count = self.t.users_count;
        if count == 0 {
            return std::borrow::Cow::Borrowed(&self.login);
        }
        let n = self
            .logins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % count;
        let k = if self.t.users_order == "spread" {
            spread(n, count)
        } else {
            n
        };
        let user = format!("{}{}", self.t.users_prefix, self.t.users_start + k);
        std::borrow::Cow::Owned(
            format!("a1 LOGIN {} {}\r\n", quote(&user), quote(&self.t.pass)).into_bytes(),
        )
    }

    /// LOGIN commands handed out so far (with `--users-count`: distinct users while
    /// below the count).
    fn logins_taken(&self) -> u64 {
        self.logins.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn step<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: timeout")),
        }
    }

    /// Connects (and handshakes) and reads the greeting.
    async fn open(&self, rbuf: usize) -> Result<Conn, String> {
        let tcp = self
            .step("connect", TcpStream::connect(self.t.addr))
            .await?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            Some((connector, name)) => Box::new(
                self.step("tls", connector.connect(name.clone(), tcp))
                    .await?,
            ),
            None => Box::new(tcp),
        };
        let mut c = Conn::new(io, rbuf);
        let greeting = self.step("greeting", c.line()).await?;
        if !greeting.starts_with(b"* OK") {
            return Err(format!(
                "greeting: {:?}",
                String::from_utf8_lossy(&greeting[..greeting.len().min(60)])
            ));
        }
        Ok(c)
    }

    /// Sends LOGIN and waits for its tagged reply.
    async fn login(&self, c: &mut Conn) -> Result<(), String> {
        let line = self.login_line();
        self.step("login send", c.send(&line)).await?;
        let mut lit = 0;
        if self.step("login reply", c.tagged(b"a1", &mut lit)).await? {
            Ok(())
        } else {
            Err("login: not OK".into())
        }
    }
}

/// A permutation of 0..count: n times a prime multiplier, mod count (a bijection when
/// the prime does not divide count; otherwise n itself).
fn spread(n: u64, count: u64) -> u64 {
    const P: u128 = 2_654_435_761;
    if u128::from(count) % P == 0 {
        return n;
    }
    ((u128::from(n) * P + 12_345) % u128::from(count)) as u64
}

/// IMAP quoted string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for ch in s.chars() {
        if ch == '"' || ch == '\\' {
            q.push('\\');
        }
        q.push(ch);
    }
    q.push('"');
    q
}

/// Error counts by kind, and the first message of each kind.
#[derive(Default)]
struct Errors {
    total: u64,
    kinds: std::collections::BTreeMap<String, (u64, String)>,
}

impl Errors {
    fn add(&mut self, e: String) {
        self.total += 1;
        let kind = e.split(':').next().unwrap_or("").to_string();
        self.kinds.entry(kind).or_insert((0, e)).0 += 1;
    }
    fn merge(&mut self, o: Errors) {
        self.total += o.total;
        for (k, (n, m)) in o.kinds {
            self.kinds.entry(k).or_insert((0, m)).0 += n;
        }
    }
    fn print(&self) {
        for (k, (n, m)) in &self.kinds {
            eprintln!("  errors {k}: {n} (first: {m})");
        }
    }
}

fn json_f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

/// Evenly spaced start times for a capped rate, shared by every loop: each login takes
/// the next slot, `1 / rate` after the one before, but never one in the past, so loops
/// that fell behind (all busy) do not make up for it with a burst.
struct Pacer {
    interval: Duration,
    next: std::sync::Mutex<Instant>,
}

impl Pacer {
    /// `None` for no cap (a rate of zero, negative or not a number).
    fn new(rate: f64) -> Option<Arc<Pacer>> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        Some(Arc::new(Pacer {
            interval: Duration::from_secs_f64(1.0 / rate),
            next: std::sync::Mutex::new(Instant::now()),
        }))
    }

    /// Takes the next slot: the instant the caller may start its login.
    fn slot(&self) -> Instant {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (*next).max(now);
        *next = slot + self.interval;
        slot
    }
}

/// `concurrency` loops of login cycles (connect, [TLS], greeting, `LOGIN`, tagged OK,
/// `LOGOUT`, the server's close) until `deadline` or `max_count` cycles in all, each
/// started at its slot of `pace` if given: the login latencies in microseconds (connect
/// until the tagged OK of LOGIN; unsorted) and the errors.
async fn login_loops(
    d: &Arc<Dialer>,
    concurrency: usize,
    deadline: Instant,
    max_count: u64,
    pace: Option<Arc<Pacer>>,
) -> std::io::Result<(Vec<u32>, Errors)> {
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(max_count));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (d, budget, pace) = (d.clone(), budget.clone(), pace.clone());
        tasks.spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(4096);
            let mut errors = Errors::default();
            while Instant::now() < deadline
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |b| b.checked_sub(1),
                    )
                    .is_ok()
            {
                if let Some(p) = &pace {
                    let slot = p.slot();
                    if slot >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(slot.into()).await;
                }
                let t0 = Instant::now();
                let r: Result<(), String> = async {
                    let mut c = d.open(4096).await?;
                    d.login(&mut c).await?;
                    lat.push(micros(t0.elapsed()));
                    d.step("logout send", c.send(b"a2 LOGOUT\r\n")).await?;
                    let mut lit = 0;
                    let _ = d.step("logout reply", c.tagged(b"a2", &mut lit)).await?;
                    // The server closes first: wait for its FIN (no TIME_WAIT here).
                    let _ = d.step("close", c.until_eof()).await;
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    errors.add(e);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = Errors::default();
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r.map_err(std::io::Error::other)?;
        lat.extend(l);
        errors.merge(e);
    }
    Ok((lat, errors))
}

async fn login(
    t: Target,
    concurrency: usize,
    duration: f64,
    max_count: u64,
    rate_cap: f64,
) -> std::io::Result<()> {
    let d = Dialer::new(t)?;
    let pace = Pacer::new(rate_cap);
    let cap = if pace.is_some() { rate_cap } else { f64::NAN };
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(duration);
    let (mut lat, errors) = login_loops(&d, concurrency, deadline, max_count, pace).await?;
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let rate = lat.len() as f64 / elapsed;
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    eprintln!(
        "login {}{}: {} logins in {elapsed:.2}s = {rate:.0}/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
        d.t.addr,
        if d.t.tls { " tls" } else { "" },
        lat.len(),
        p50 / 1000.0,
        p99 / 1000.0,
        errors.total
    );
    errors.print();
    println!(
        "{},\"concurrency\":{concurrency},\"rate_cap\":{},\"ok\":{},\"errors\":{},\"elapsed_s\":{},\"rate\":{},\"p50_ms\":{},\"p99_ms\":{},\"users_taken\":{},\"cpu_ticks\":{}}}",
        d.t.json_head("login"),
        json_f(cap),
        lat.len(),
        errors.total,
        json_f(elapsed),
        json_f(rate),
        json_f(p50 / 1000.0),
        json_f(p99 / 1000.0),
        d.logins_taken(),
        cutover_bench::self_cpu_ticks()
    );
    Ok(())
}

async fn session(d: &Dialer, rbuf: usize) -> Result<Conn, String> {
    let mut c = d.open(rbuf).await?;
    d.login(&mut c).await?;
    Ok(c)
}

async fn throughput(
    t: Target,
    concurrency: usize,
    duration: f64,
    pipeline: usize,
    max_count: u64,
) -> std::io::Result<()> {
    let d = Dialer::new(t)?;
    let pipeline = pipeline.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(duration);
    for _ in 0..concurrency.max(1) {
        let d = d.clone();
        tasks.spawn(async move {
            let r: Result<(u64, u64, Duration), String> = async {
                let mut c = session(&d, 256 * 1024).await?;
                d.step("select", c.send(b"s1 SELECT INBOX\r\n")).await?;
                let mut lit = 0;
                if !d.step("select reply", c.tagged(b"s1", &mut lit)).await? {
                    return Err("select: not OK".into());
                }
                let t0 = Instant::now();
                let (mut sent, mut done, mut bytes) = (0u64, 0u64, 0u64);
                let mut req = Vec::with_capacity(pipeline * 32);
                for _ in 0..pipeline.min(max_count as usize) {
                    sent += 1;
                    req.extend_from_slice(format!("f{sent} FETCH 1 BODY[]\r\n").as_bytes());
                }
                d.step("fetch send", c.send(&req)).await?;
                while done < sent {
                    let tag = format!("f{}", done + 1);
                    if !d
                        .step("fetch reply", c.tagged(tag.as_bytes(), &mut bytes))
                        .await?
                    {
                        return Err("fetch: not OK".into());
                    }
                    done += 1;
                    if Instant::now() < deadline && sent < max_count {
                        sent += 1;
                        d.step(
                            "fetch send",
                            c.send(format!("f{sent} FETCH 1 BODY[]\r\n").as_bytes()),
                        )
                        .await?;
                    }
                }
                let spent = t0.elapsed();
                let _ = d.step("logout", c.send(b"a9 LOGOUT\r\n")).await;
                let _ = d.step("logout reply", c.until_eof()).await;
                Ok((bytes, done, spent))
            }
            .await;
            r
        });
    }
    let (mut bytes, mut fetches, mut errors) = (0u64, 0u64, Errors::default());
    let mut longest = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        match r.map_err(std::io::Error::other)? {
            Ok((b, f, spent)) => {
                bytes += b;
                fetches += f;
                longest = longest.max(spent);
            }
            Err(e) => errors.add(e),
        }
    }
    let secs = longest.as_secs_f64();
    let mbps = if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        f64::NAN
    };
    eprintln!(
        "throughput {}{}: {fetches} fetches, {bytes} literal bytes in {secs:.2}s = {mbps:.0} MB/s, {} errors",
        d.t.addr,
        if d.t.tls { " tls" } else { "" },
        errors.total
    );
    errors.print();
    println!(
        "{},\"concurrency\":{concurrency},\"fetches\":{fetches},\"bytes\":{bytes},\"errors\":{},\"elapsed_s\":{},\"mbps\":{},\"cpu_ticks\":{}}}",
        d.t.json_head("throughput"),
        errors.total,
        json_f(secs),
        json_f(mbps),
        cutover_bench::self_cpu_ticks()
    );
    Ok(())
}

async fn idle(
    t: Target,
    sessions: usize,
    concurrency: usize,
    pids: Vec<u32>,
    settle: f64,
) -> std::io::Result<()> {
    let d = Dialer::new(t)?;
    let before = cutover_bench::rss_kib(&pids)?;
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..sessions {
        let (d, sem) = (d.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
            // A small read buffer: thousands of these are held open.
            let mut c = session(&d, 1024).await?;
            d.step("idle send", c.send(b"a2 IDLE\r\n")).await?;
            let line = d.step("idle reply", c.line()).await?;
            if !line.starts_with(b"+") {
                return Err(format!(
                    "idle: {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(60)])
                ));
            }
            Ok(c)
        });
    }
    let mut held = Vec::with_capacity(sessions);
    let mut errors = Errors::default();
    while let Some(r) = tasks.join_next().await {
        match r.map_err(std::io::Error::other)? {
            Ok(c) => held.push(c),
            Err(e) => errors.add(e),
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let after = cutover_bench::rss_kib(&pids)?;
    let per = if held.is_empty() {
        f64::NAN
    } else {
        (after as f64 - before as f64) * 1024.0 / held.len() as f64
    };
    eprintln!(
        "idle {}{}: {} sessions in IDLE, RSS {before} KiB -> {after} KiB = {:.0} bytes/session, {} errors",
        d.t.addr,
        if d.t.tls { " tls" } else { "" },
        held.len(),
        per,
        errors.total
    );
    errors.print();
    println!(
        "{},\"sessions\":{},\"errors\":{},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"bytes_per_session\":{},\"cpu_ticks\":{}}}",
        d.t.json_head("idle"),
        held.len(),
        errors.total,
        json_f(per),
        cutover_bench::self_cpu_ticks()
    );
    // Leave IDLE and log out politely, bounded; then drop the rest.
    let leave = async {
        for c in held.iter_mut() {
            let _ = c.send(b"DONE\r\na3 LOGOUT\r\n").await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), leave).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    Ok(())
}

/// One `NOOP` round trip (tag `n<i>`) on a logged-in session: the time from sending it
/// until its tagged OK.
async fn noop_round_trip(d: &Dialer, c: &mut Conn, i: u64) -> Result<Duration, String> {
    let tag = format!("n{i}");
    let cmd = format!("{tag} NOOP\r\n");
    let mut lit = 0;
    let t0 = Instant::now();
    c.send(cmd.as_bytes())
        .await
        .map_err(|e| format!("noop send: {e}"))?;
    if !d
        .step("noop reply", c.tagged(tag.as_bytes(), &mut lit))
        .await?
    {
        return Err("noop: not OK".into());
    }
    Ok(t0.elapsed())
}

/// `LOGOUT`, then the server's close (bounded by the step timeout); errors ignored.
async fn logout(d: &Dialer, c: &mut Conn) {
    let _ = c.send(b"a9 LOGOUT\r\n").await;
    let _ = d.step("logout", c.until_eof()).await;
}

/// NOOP round trips measured after this many of warm-up.
const NOOP_WARMUP: u64 = 500;

async fn noop(t: Target, count: u64, duration: f64) -> std::io::Result<()> {
    let d = Dialer::new(t)?;
    // The latencies measured, and every round trip made (warm-up included).
    let r: Result<(Vec<u32>, u64), String> = async {
        let mut c = session(&d, 16 * 1024).await?;
        let deadline = Instant::now() + Duration::from_secs_f64(duration);
        let mut lat = Vec::with_capacity(count as usize);
        let mut made = 0;
        for i in 0..(NOOP_WARMUP + count) {
            if Instant::now() >= deadline {
                break;
            }
            let rtt = noop_round_trip(&d, &mut c, i).await?;
            made += 1;
            if i >= NOOP_WARMUP {
                lat.push(micros(rtt));
            }
        }
        logout(&d, &mut c).await;
        Ok((lat, made))
    }
    .await;
    let (mut lat, made) = r.map_err(std::io::Error::other)?;
    lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    eprintln!(
        "noop {}{}: {} round trips, p50 {p50:.0} us, p99 {p99:.0} us",
        d.t.addr,
        if d.t.tls { " tls" } else { "" },
        lat.len()
    );
    println!(
        "{},\"count\":{},\"round_trips\":{made},\"p50_us\":{},\"p99_us\":{},\"cpu_ticks\":{}}}",
        d.t.json_head("noop"),
        lat.len(),
        json_f(p50),
        json_f(p99),
        cutover_bench::self_cpu_ticks()
    );
    Ok(())
}

/// NOOP round trips of warm-up on each storm session before the storm starts.
const STORM_WARMUP: u64 = 50;
/// Upper bound on the NOOPs of one storm session.
const STORM_MAX_NOOPS: u64 = 10_000_000;

/// What the storm's sessions measured: NOOP latencies (µs, unsorted), errors (setup and
/// NOOPs), sessions that were logged in when the storm started.
type SessionsResult = (Vec<u32>, Errors, usize);

/// The storm's established sessions, run on a thread and runtime of their own (see
/// [`storm`]): opens and logs in `n` sessions, warms each up, says how many are ready,
/// waits for the deadline, then has each do one NOOP at a time until it.
async fn storm_sessions(
    d: Arc<Dialer>,
    n: usize,
    ready: tokio::sync::oneshot::Sender<usize>,
    go: tokio::sync::oneshot::Receiver<Instant>,
) -> std::io::Result<SessionsResult> {
    let mut errors = Errors::default();
    let mut setup = tokio::task::JoinSet::new();
    for _ in 0..n {
        let d = d.clone();
        setup.spawn(async move {
            let mut c = session(&d, 16 * 1024).await?;
            for i in 0..STORM_WARMUP {
                noop_round_trip(&d, &mut c, i).await?;
            }
            Ok::<Conn, String>(c)
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = setup.join_next().await {
        match r.map_err(std::io::Error::other)? {
            Ok(c) => conns.push(c),
            Err(e) => errors.add(e),
        }
    }
    let ready_n = conns.len();
    let _ = ready.send(ready_n);
    let Ok(deadline) = go.await else {
        return Ok((Vec::new(), errors, ready_n));
    };
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        let d = d.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(16 * 1024);
            let mut err = None;
            let mut i = STORM_WARMUP;
            while Instant::now() < deadline && i < STORM_WARMUP + STORM_MAX_NOOPS {
                match noop_round_trip(&d, &mut c, i).await {
                    Ok(rtt) => lat.push(micros(rtt)),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
                i += 1;
            }
            if err.is_none() {
                logout(&d, &mut c).await;
            }
            (lat, err)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r.map_err(std::io::Error::other)?;
        lat.extend(l);
        if let Some(e) = e {
            errors.add(e);
        }
    }
    Ok((lat, errors, ready_n))
}

/// `sessions` established sessions do NOOPs, one at a time each, while
/// `storm_concurrency` TLS login loops run against `tls_addr` for `duration` seconds.
///
/// The sessions run on a thread with a runtime of their own, so that a NOOP reply is not
/// queued in the load generator behind the storm's TLS handshakes (which keep its
/// multi-threaded runtime busy): what is measured is the server's delay, plus the
/// operating system's scheduling of that one thread.
async fn storm(
    t: Target,
    tls_addr: SocketAddr,
    sessions: usize,
    storm_concurrency: usize,
    duration: f64,
    max_count: u64,
    storm_rate: f64,
) -> std::io::Result<()> {
    if t.ca.is_none() {
        return Err(std::io::Error::other("storm: the TLS logins need --ca"));
    }
    let mut st = t.clone();
    st.addr = tls_addr;
    st.tls = true;
    let ds = Dialer::new(st)?;
    let d = Dialer::new(t)?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let dn = d.clone();
    let worker = std::thread::Builder::new()
        .name("storm-sessions".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(storm_sessions(dn, sessions, ready_tx, go_rx))
        })?;
    let join = move || async move {
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("storm sessions: thread panicked"))?
    };
    // Sessions that cannot be set up are counted as errors and the storm runs anyway; if
    // the sessions' thread ended before it, its error ends the run.
    if ready_rx.await.is_err() {
        join().await?;
        return Err(std::io::Error::other("storm sessions: thread ended early"));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(duration);
    let _ = go_tx.send(deadline);
    let pace = Pacer::new(storm_rate);
    let cap = if pace.is_some() { storm_rate } else { f64::NAN };
    let (mut storm_lat, storm_errors) =
        login_loops(&ds, storm_concurrency, deadline, max_count, pace).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let (mut lat, noop_errors, ready) = join().await?;
    lat.sort_unstable();
    storm_lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    let max = lat.last().map_or(f64::NAN, |&m| m as f64);
    let rate = storm_lat.len() as f64 / elapsed;
    let (s50, s99) = (percentile(&storm_lat, 50.0), percentile(&storm_lat, 99.0));
    eprintln!(
        "storm {}{} with TLS logins on {tls_addr}: {ready}/{sessions} sessions, {} NOOPs, p50 {p50:.0} us, \
         p99 {p99:.0} us, max {max:.0} us, {} errors; storm: {} logins in {elapsed:.2}s = {rate:.0}/s{}, \
         p50 {:.3} ms, p99 {:.3} ms, {} errors",
        d.t.addr,
        if d.t.tls { " tls" } else { "" },
        lat.len(),
        noop_errors.total,
        storm_lat.len(),
        if cap.is_finite() {
            format!(" (cap {cap:.0}/s)")
        } else {
            String::new()
        },
        s50 / 1000.0,
        s99 / 1000.0,
        storm_errors.total
    );
    noop_errors.print();
    storm_errors.print();
    println!(
        "{},\"sessions\":{ready},\"noops\":{},\"noop_p50_us\":{},\"noop_p99_us\":{},\"noop_max_us\":{},\"noop_errors\":{},\"storm_concurrency\":{storm_concurrency},\"storm_rate_cap\":{},\"storm_logins\":{},\"storm_rate\":{},\"storm_p50_ms\":{},\"storm_p99_ms\":{},\"storm_errors\":{},\"errors\":{},\"elapsed_s\":{},\"cpu_ticks\":{}}}",
        d.t.json_head("storm"),
        lat.len(),
        json_f(p50),
        json_f(p99),
        json_f(max),
        noop_errors.total,
        json_f(cap),
        storm_lat.len(),
        json_f(rate),
        json_f(s50 / 1000.0),
        json_f(s99 / 1000.0),
        storm_errors.total,
        noop_errors.total + storm_errors.total,
        json_f(elapsed),
        cutover_bench::self_cpu_ticks()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_the_slots_and_does_not_make_up_for_lost_time() {
        assert!(Pacer::new(0.0).is_none());
        assert!(Pacer::new(-5.0).is_none());
        assert!(Pacer::new(f64::NAN).is_none());
        let p = Pacer::new(1000.0).expect("a pacer");
        let (a, b, c) = (p.slot(), p.slot(), p.slot());
        assert_eq!(b - a, p.interval);
        assert_eq!(c - b, p.interval);
        // Behind schedule: the next slot is now, not a burst of past ones.
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        let d = p.slot();
        assert!(d >= now);
        assert_eq!(p.slot() - d, p.interval);
    }
}

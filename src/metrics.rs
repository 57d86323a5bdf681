//! Metric names, the Prometheus recorder and the `/metrics` endpoint.
//!
//! Labels are only ever protocol, pool, listener, result, reason, server and the like:
//! never a user name or a client address (unbounded and personal).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub mod handles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Logins by `protocol`, `pool`, `rule`, `result` (ok | auth_failed | backend_unavailable |
/// refused), `tls` (true | false: whether the client used TLS).
pub const LOGINS: &str = "cutover_logins_total";
/// Login attempts by `protocol`, `mechanism` (login | plain | oauthbearer | xoauth2 |
/// bridged) and `result` (ok | auth_failed | unavailable | refused).
pub const LOGINS_BY_MECHANISM: &str = "cutover_logins_by_mechanism_total";
/// Time the proxy itself spent on a login (routing, holds, replies), by `protocol`.
pub const LOGIN_PROXY_SECONDS: &str = "cutover_login_proxy_seconds";
/// Time spent logging in at the backends (connect, TLS, replay, failovers), by `protocol`, `pool`.
pub const LOGIN_BACKEND_SECONDS: &str = "cutover_login_backend_seconds";
/// 1 if a backend server is considered up, by `pool`, `protocol`, `server`.
pub const BACKEND_UP: &str = "cutover_backend_up";
/// TCP connect time to a backend server, by `pool`, `protocol`, `server`.
pub const BACKEND_CONNECT_SECONDS: &str = "cutover_backend_connect_seconds";
/// Moves to the next server of a pool after one was unavailable, by `pool`, `protocol`.
pub const FAILOVERS: &str = "cutover_failovers_total";
/// Failed attempts to use a backend server, by `pool`, `protocol`, `server`, `reason`.
pub const BACKEND_FAILURES: &str = "cutover_backend_connect_failures_total";
/// Logins served by a server other than the first of the user's try order, by `pool`,
/// `protocol`.
pub const LOGINS_STANDBY: &str = "cutover_logins_standby_total";
/// Relayed sessions whose backend connection ended with the client still there, by
/// `pool`, `protocol`, `reason` (eof | reset | timeout | error | goodbye).
pub const BACKEND_DISCONNECTS: &str = "cutover_backend_disconnects_total";
/// Accepted client connections, by `listener`, `protocol`.
pub const CONNECTIONS: &str = "cutover_connections_total";
/// Open client connections, by `listener`, `protocol`.
pub const CONNECTIONS_ACTIVE: &str = "cutover_connections_active";
/// Client connections refused or ended by a limit, by `listener`, `protocol`, `reason`.
pub const REFUSED: &str = "cutover_connections_refused_total";
/// Client TLS handshakes, by `listener`, `mode` (implicit | starttls), `result`, `version`.
pub const TLS_HANDSHAKES: &str = "cutover_tls_handshakes_total";
/// Relayed (logged-in) sessions, by `pool`, `protocol`.
pub const SESSIONS_ACTIVE: &str = "cutover_sessions_active";
/// Duration of relayed sessions, by `pool`, `protocol`.
pub const SESSION_SECONDS: &str = "cutover_session_duration_seconds";
/// Bytes relayed, by `pool`, `protocol`, `direction` (client_to_backend | backend_to_client).
pub const BYTES: &str = "cutover_relayed_bytes_total";
/// 1 for the stage in force, 0 for the others, by `stage` (`(initial)`: the top-level routes).
pub const STAGE_ACTIVE: &str = "cutover_stage_active";
/// Configuration reloads, by `result` (ok | error).
pub const RELOADS: &str = "cutover_config_reloads_total";
/// Relayed sessions ended from outside, by `protocol`, `reason` (moved | admin | shutdown).
pub const KICKED: &str = "cutover_sessions_kicked_total";
/// Logins tried on a route's fallback pool, by `from`, `to`, `reason` (unavailable | auth_failed).
pub const FALLBACKS: &str = "cutover_fallbacks_total";
/// Logins that waited for a held user, by `result` (released | timed_out).
pub const HELD_LOGINS: &str = "cutover_held_logins_total";
/// Not-after time of each served certificate, Unix seconds, by `certificate` (file name).
pub const CERT_NOT_AFTER: &str = "cutover_certificate_not_after_seconds";
/// Always 1, by `version`.
pub const BUILD_INFO: &str = "cutover_build_info";
/// Resident memory of the process.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
/// Open file descriptors of the process.
pub const PROCESS_FDS: &str = "process_open_fds";
/// CPU time of the process.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
/// Start time of the process, Unix seconds.
pub const PROCESS_START: &str = "process_start_time_seconds";
/// The most file descriptors the process may open.
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
/// Always 1 per configured pool, by `pool`, `legacy` (true | false).
pub const POOL_INFO: &str = "cutover_pool_info";
/// 1 if the last configuration reload succeeded (or none was tried), else 0.
pub const RELOAD_SUCCESS: &str = "cutover_config_last_reload_successful";
/// Whether the shared state store (Redis) answers.
pub const STATE_UP: &str = "cutover_state_backend_up";
/// Calls to the shared state store that failed or were late.
pub const STATE_ERRORS: &str = "cutover_state_errors_total";

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter (`_total`).
    Counter,
    /// Gauge.
    Gauge,
    /// Histogram (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// One entry of the metrics catalogue (docs/metrics.md lists the same).
#[derive(Debug, Clone, Copy)]
pub struct Def {
    /// Name.
    pub name: &'static str,
    /// Kind.
    pub kind: Kind,
    /// Label names.
    pub labels: &'static [&'static str],
    /// Help text.
    pub help: &'static str,
}

/// Route lookup queries to the database, by `lookup`, `result` (found | not_found | error | timeout).
pub const LOOKUP_QUERIES: &str = "cutover_lookup_queries_total";
/// Route lookup answers by where they came from, by `lookup`, `result` (hit | miss | stale | error).
pub const LOOKUP_CACHE: &str = "cutover_lookup_cache_total";
/// Time of one route lookup query, by `lookup`.
pub const LOOKUP_SECONDS: &str = "cutover_lookup_seconds";
/// Rows naming a pool or server the configuration does not have, by `lookup`, `reason`.
pub const LOOKUP_BAD_ROWS: &str = "cutover_lookup_rejected_rows_total";
/// 1 while a lookup's last query got an answer from its database, by `lookup`.
pub const LOOKUP_UP: &str = "cutover_lookup_up";
/// Answers held in a lookup's cache, by `lookup`.
pub const LOOKUP_CACHE_ENTRIES: &str = "cutover_lookup_cache_entries";

/// 1 for each key changed in the file that takes effect only at the next start, by `key`.
pub const RESTART_REQUIRED: &str = "cutover_config_restart_required";

/// Every metric cutover exports.
pub const CATALOGUE: &[Def] = &[
    Def {
        name: LOGINS,
        kind: Kind::Counter,
        labels: &["protocol", "pool", "rule", "result", "tls"],
        help: "Login attempts by outcome (ok, auth_failed, backend_unavailable, refused) and whether the client used TLS.",
    },
    Def { name: LOGINS_BY_MECHANISM, kind: Kind::Counter, labels: &["protocol", "mechanism", "result"], help: "Login attempts by SASL mechanism (login, plain, oauthbearer, xoauth2, bridged) and result (ok, auth_failed, unavailable, refused)." },
    Def { name: LOGIN_PROXY_SECONDS, kind: Kind::Histogram, labels: &["protocol"], help: "Time the proxy itself spent on a login (routing, holds, replies)." },
    Def { name: LOGIN_BACKEND_SECONDS, kind: Kind::Histogram, labels: &["protocol", "pool"], help: "Time spent logging in at the backends (connect, TLS, replay, failovers)." },
    Def { name: BACKEND_UP, kind: Kind::Gauge, labels: &["pool", "protocol", "server"], help: "1 while a backend server is considered up." },
    Def { name: BACKEND_CONNECT_SECONDS, kind: Kind::Histogram, labels: &["pool", "protocol", "server"], help: "TCP connect time to a backend server." },
    Def { name: FAILOVERS, kind: Kind::Counter, labels: &["pool", "protocol"], help: "Moves to the next server of a pool after one was unavailable." },
    Def { name: BACKEND_FAILURES, kind: Kind::Counter, labels: &["pool", "protocol", "server", "reason"], help: "Failed attempts to use a backend server: refused, timeout, tls, greeting, protocol, resolve, no_mechanism." },
    Def { name: LOGINS_STANDBY, kind: Kind::Counter, labels: &["pool", "protocol"], help: "Logins served by a server other than the preferred one (the first of the user's try order): its standby carries the user." },
    Def { name: BACKEND_DISCONNECTS, kind: Kind::Counter, labels: &["pool", "protocol", "reason"], help: "Relayed sessions whose backend connection ended with the client still there (no LOGOUT or QUIT): eof, reset, timeout, error, or goodbye (the backend said its own BYE, 421 or -ERR first)." },
    Def { name: CONNECTIONS, kind: Kind::Counter, labels: &["listener", "protocol"], help: "Accepted client connections." },
    Def { name: CONNECTIONS_ACTIVE, kind: Kind::Gauge, labels: &["listener", "protocol"], help: "Open client connections." },
    Def { name: REFUSED, kind: Kind::Counter, labels: &["listener", "protocol", "reason"], help: "Client connections refused or ended by a limit." },
    Def { name: TLS_HANDSHAKES, kind: Kind::Counter, labels: &["listener", "mode", "result", "version"], help: "Client TLS handshakes (implicit or STARTTLS) by result and TLS version." },
    Def { name: SESSIONS_ACTIVE, kind: Kind::Gauge, labels: &["pool", "protocol"], help: "Logged-in sessions being relayed." },
    Def { name: SESSION_SECONDS, kind: Kind::Histogram, labels: &["pool", "protocol"], help: "Duration of relayed sessions." },
    Def { name: BYTES, kind: Kind::Counter, labels: &["pool", "protocol", "direction"], help: "Bytes relayed after login, client_to_backend or backend_to_client." },
    Def { name: STAGE_ACTIVE, kind: Kind::Gauge, labels: &["stage"], help: "1 for the routing stage in force." },
    Def { name: RELOADS, kind: Kind::Counter, labels: &["result"], help: "Configuration reloads, ok or error." },
    Def { name: KICKED, kind: Kind::Counter, labels: &["protocol", "reason"], help: "Relayed sessions ended from outside: moved, admin, shutdown." },
    Def { name: FALLBACKS, kind: Kind::Counter, labels: &["from", "to", "reason"], help: "Logins tried on a route's fallback pool: unavailable, auth_failed." },
    Def { name: HELD_LOGINS, kind: Kind::Counter, labels: &["result"], help: "Logins that waited for a held user: released, timed_out." },
    Def { name: CERT_NOT_AFTER, kind: Kind::Gauge, labels: &["certificate"], help: "Not-after time of each served certificate (Unix seconds)." },
    Def { name: BUILD_INFO, kind: Kind::Gauge, labels: &["version"], help: "Always 1; the version label says which cutover runs." },
    Def { name: PROCESS_RSS, kind: Kind::Gauge, labels: &[], help: "Resident memory of the process in bytes." },
    Def { name: PROCESS_FDS, kind: Kind::Gauge, labels: &[], help: "Open file descriptors of the process." },
    Def { name: PROCESS_CPU, kind: Kind::Counter, labels: &[], help: "User and system CPU time of the process in seconds." },
    Def { name: PROCESS_START, kind: Kind::Gauge, labels: &[], help: "Start time of the process (Unix seconds)." },
    Def { name: PROCESS_MAX_FDS, kind: Kind::Gauge, labels: &[], help: "The most file descriptors the process may open." },
    Def { name: POOL_INFO, kind: Kind::Gauge, labels: &["pool", "legacy"], help: "Always 1 per configured pool; legacy says whether the stragglers report counts it as legacy." },
    Def { name: RESTART_REQUIRED, kind: Kind::Gauge, labels: &["key"], help: "1 for each setting changed in the file that a reload cannot apply (workers, instance_name, state): it takes effect at the next start or upgrade." },
    Def { name: RELOAD_SUCCESS, kind: Kind::Gauge, labels: &[], help: "1 if the last configuration reload succeeded (or none was tried), else 0." },
    Def { name: STATE_UP, kind: Kind::Gauge, labels: &["instance_name"], help: "1 while the shared state store (state.redis) answers; absent without one." },
    Def { name: LOOKUP_QUERIES, kind: Kind::Counter, labels: &["lookup", "result"], help: "Route lookup queries to the database: found, not_found, error, timeout." },
    Def { name: LOOKUP_CACHE, kind: Kind::Counter, labels: &["lookup", "result"], help: "Route lookup answers by source: hit (cached), miss (asked), stale (cached past its TTL while the database failed), error (no answer)." },
    Def { name: LOOKUP_SECONDS, kind: Kind::Histogram, labels: &["lookup"], help: "Time of one route lookup query, connecting included." },
    Def { name: LOOKUP_BAD_ROWS, kind: Kind::Counter, labels: &["lookup", "reason"], help: "Lookup rows naming a pool or server the configuration does not have (unknown_pool, unknown_server): refused as a temporary failure, never connected to." },
    Def { name: LOOKUP_UP, kind: Kind::Gauge, labels: &["lookup"], help: "1 while a route lookup's last query got an answer from its database." },
    Def { name: LOOKUP_CACHE_ENTRIES, kind: Kind::Gauge, labels: &["lookup"], help: "Answers held in a route lookup's cache." },
    Def { name: STATE_ERRORS, kind: Kind::Counter, labels: &["op"], help: "Calls to the shared state store that failed or were late (answered from local state instead)." },
];

/// Latency buckets (seconds) for the login and connect histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets (seconds) for session durations: IMAP sessions last hours.
const SESSION_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

/// Installs the global recorder (once per process) and returns a handle for rendering.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            use metrics_exporter_prometheus::Matcher;
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(SESSION_SECONDS.into()), SESSION_BUCKETS)
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours stays unused
            // and /metrics shows nothing, which a test would notice.
            if metrics::set_global_recorder(recorder).is_ok() {
                handles::recorder_installed();
            }
            for d in CATALOGUE {
                match d.kind {
                    _ if SCRAPED.contains(&d.name) => {}
                    Kind::Counter => metrics::describe_counter!(d.name, d.help),
                    Kind::Gauge => metrics::describe_gauge!(d.name, d.help),
                    Kind::Histogram => {
                        metrics::describe_histogram!(d.name, metrics::Unit::Seconds, d.help)
                    }
                }
            }
            handle
        })
        .clone()
}

/// Creates the series a configuration makes known, at zero, so dashboards and alerts see
/// them before the first event (an absent series is not a zero).
pub fn prime(cfg: &crate::config::Config) {
    let protocols: std::collections::BTreeSet<&'static str> =
        cfg.listeners.iter().map(|l| l.protocol.as_str()).collect();
    prime_listeners(cfg);
    prime_pools(cfg);
    prime_routes(cfg, &protocols);
    prime_lookups(cfg);
    prime_process(&protocols);
}

/// Per listener: connections, refusals (and the PROXY header's, where one is read), TLS
/// handshakes.
fn prime_listeners(cfg: &crate::config::Config) {
    for l in &cfg.listeners {
        let p = l.protocol.as_str();
        metrics::counter!(CONNECTIONS, "listener" => l.name.clone(), "protocol" => p).absolute(0);
        metrics::gauge!(CONNECTIONS_ACTIVE, "listener" => l.name.clone(), "protocol" => p)
            .increment(0.0);
        let proxied = l.proxy_protocol != crate::config::ProxyMode::Off;
        let front: &[&str] = if proxied {
            &[
                "proxy_untrusted",
                "proxy_missing",
                "proxy_invalid",
                "proxy_timeout",
            ]
        } else {
            &[]
        };
        let limits = [
            "max_connections",
            "max_per_ip",
            "input_too_large",
            "rate_limited",
        ];
        for &reason in limits.iter().chain(front) {
            metrics::counter!(REFUSED, "listener" => l.name.clone(), "protocol" => p, "reason" => reason).increment(0);
        }
    }
    for l in cfg
        .listeners
        .iter()
        .filter(|l| l.tls != crate::proto::ListenerTls::None)
    {
        let mode = if l.tls == crate::proto::ListenerTls::Implicit {
            "implicit"
        } else {
            "starttls"
        };
        for (result, version) in [("ok", "TLSv1.3"), ("error", "none"), ("timeout", "none")] {
            metrics::counter!(TLS_HANDSHAKES, "listener" => l.name.clone(), "mode" => mode, "result" => result, "version" => version).increment(0);
        }
    }
}

/// Per pool and protocol: failovers, sessions, bytes, disconnects, per-server failures.
fn prime_pools(cfg: &crate::config::Config) {
    for (name, pool) in &cfg.pools {
        for (proto, pp) in &pool.protocols {
            let p = proto.as_str();
            metrics::counter!(FAILOVERS, "pool" => name.clone(), "protocol" => p).increment(0);
            metrics::counter!(LOGINS_STANDBY, "pool" => name.clone(), "protocol" => p).increment(0);
            for reason in crate::relay::DISCONNECT_REASONS {
                metrics::counter!(BACKEND_DISCONNECTS, "pool" => name.clone(), "protocol" => p, "reason" => reason).increment(0);
            }
            metrics::gauge!(SESSIONS_ACTIVE, "pool" => name.clone(), "protocol" => p)
                .increment(0.0);
            for dir in ["client_to_backend", "backend_to_client"] {
                metrics::counter!(BYTES, "pool" => name.clone(), "protocol" => p, "direction" => dir).increment(0);
            }
            for s in &pp.servers {
                for reason in ["refused", "timeout", "tls", "greeting"] {
                    metrics::counter!(BACKEND_FAILURES, "pool" => name.clone(), "protocol" => p, "server" => s.to_string(), "reason" => reason).increment(0);
                }
            }
        }
    }
}

/// Per rule with a pool: its logins and fallbacks.
fn prime_routes(cfg: &crate::config::Config, protocols: &std::collections::BTreeSet<&'static str>) {
    let stage_routes = cfg.stages.iter().flat_map(|s| s.routes.iter());
    for r in cfg.routes.iter().chain(stage_routes) {
        // A lookup rule without a pool names its pool per user: its series appear as
        // they are used.
        let Some(pool) = &r.pool else { continue };
        for p in protocols {
            for result in ["ok", "auth_failed", "backend_unavailable"] {
                for tls in ["true", "false"] {
                    metrics::counter!(LOGINS, "protocol" => *p, "pool" => pool.clone(), "rule" => r.id.clone(), "result" => result, "tls" => tls).increment(0);
                }
            }
        }
        if let Some(f) = &r.fallback {
            for reason in ["unavailable", "auth_failed"] {
                metrics::counter!(FALLBACKS, "from" => pool.clone(), "to" => f.clone(), "reason" => reason).increment(0);
            }
        }
    }
}

/// Per lookup: queries, cache results, bad rows.
fn prime_lookups(cfg: &crate::config::Config) {
    for name in cfg.lookups.keys() {
        for result in ["found", "not_found", "error", "timeout"] {
            metrics::counter!(LOOKUP_QUERIES, "lookup" => name.clone(), "result" => result)
                .increment(0);
        }
        for result in ["hit", "miss", "stale", "error"] {
            metrics::counter!(LOOKUP_CACHE, "lookup" => name.clone(), "result" => result)
                .increment(0);
        }
        for reason in ["unknown_pool", "unknown_server"] {
            metrics::counter!(LOOKUP_BAD_ROWS, "lookup" => name.clone(), "reason" => reason)
                .increment(0);
        }
    }
}

/// Whole-process series: logins refused before routing, kicks, reloads, held logins.
fn prime_process(protocols: &std::collections::BTreeSet<&'static str>) {
    for p in protocols {
        for tls in ["true", "false"] {
            for (pool, result) in [
                ("none", "refused"),
                ("throttled", "refused"),
                ("held", "backend_unavailable"),
            ] {
                metrics::counter!(LOGINS, "protocol" => *p, "pool" => pool, "rule" => "none", "result" => result, "tls" => tls).increment(0);
            }
        }
    }
    for p in protocols {
        for reason in ["moved", "admin", "shutdown"] {
            metrics::counter!(KICKED, "protocol" => *p, "reason" => reason).increment(0);
        }
    }
    for result in ["ok", "error"] {
        metrics::counter!(RELOADS, "result" => result).increment(0);
    }
    for result in ["released", "timed_out"] {
        metrics::counter!(HELD_LOGINS, "result" => result).increment(0);
    }
}

/// Metrics computed at scrape time from live state rather than recorded as events:
/// their series follow the configuration in force (a server or stage removed by a reload
/// disappears) and the process as it is now.
pub const SCRAPED: &[&str] = &[
    BACKEND_UP,
    STAGE_ACTIVE,
    CERT_NOT_AFTER,
    BUILD_INFO,
    POOL_INFO,
    RELOAD_SUCCESS,
    STATE_UP,
    PROCESS_RSS,
    PROCESS_FDS,
    PROCESS_MAX_FDS,
    PROCESS_CPU,
    PROCESS_START,
];

/// Writes Prometheus text for scrape-time metrics.
pub struct Text<'a>(pub &'a mut String);

impl Text<'_> {
    /// `# HELP` and `# TYPE` of a catalogued family.
    pub fn family(&mut self, name: &str) {
        use std::fmt::Write;
        if let Some(d) = CATALOGUE.iter().find(|d| d.name == name) {
            let kind = match d.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(self.0, "# HELP {name} {}\n# TYPE {name} {kind}", d.help);
        }
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        use std::fmt::Write;
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// The process metrics, from /proc (Linux; nothing elsewhere).
pub fn collect_process(t: &mut Text<'_>) {
    t.family(BUILD_INFO);
    t.sample(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
        if let Some(kb) = kb {
            t.family(PROCESS_RSS);
            t.sample(PROCESS_RSS, &[], kb * 1024.0);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        t.family(PROCESS_FDS);
        t.sample(PROCESS_FDS, &[], dir.count() as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        let soft = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = soft {
            t.family(PROCESS_MAX_FDS);
            t.sample(PROCESS_MAX_FDS, &[], v);
        }
    }
    if let Some((utime, stime, _)) = proc_stat_fields() {
        t.family(PROCESS_CPU);
        t.sample(PROCESS_CPU, &[], (utime + stime) / clock_ticks());
    }
    if let Some(start) = process_start_time() {
        t.family(PROCESS_START);
        t.sample(PROCESS_START, &[], start);
    }
}

/// A function that appends scrape-time metrics to the response.
pub type Collector = std::sync::Arc<dyn Fn(&mut String) + Send + Sync>;

fn clock_ticks() -> f64 {
    100.0 // USER_HZ on Linux
}

/// (utime, stime, starttime) in clock ticks from /proc/self/stat.
fn proc_stat_fields() -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15, starttime 22.
    Some((
        f.get(11)?.parse().ok()?,
        f.get(12)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

fn process_start_time() -> Option<f64> {
    let start_ticks = proc_stat_fields()?.2;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + start_ticks / clock_ticks())
}

/// Whether the proxy is ready (`GET /ready`).
pub type Readiness = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `GET /metrics` and `GET /ready` (200 `ready`, or 503 while starting or
/// draining) until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    collect: Collector,
    ready: Readiness,
    stop: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (handle, collect, ready) = (handle.clone(), collect.clone(), ready.clone());
        tokio::spawn(async move {
            let Some(req) = crate::http::read_request(&mut sock).await else {
                return;
            };
            if req.method == "GET" && req.path == "/metrics" {
                let mut body = handle.render();
                collect(&mut body);
                crate::http::respond(
                    &mut sock,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                )
                .await;
            } else if req.method == "GET" && req.path == "/ready" {
                let (status, body) = if ready() {
                    (200, "ready\n")
                } else {
                    (503, "not ready\n")
                };
                crate::http::respond(&mut sock, status, "text/plain", body).await;
            } else {
                crate::http::respond(&mut sock, 404, "text/plain", "not found\n").await;
            }
        });
    }
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

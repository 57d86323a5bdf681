//! The report step of `compare.sh`: medians, ratios, the targets of issue 7, and
//! `BENCHMARKS.md`.
//!
//! Input: a results file with one measurement per line, `target<TAB>metric<TAB>value`
//! (repeated runs give several lines; the median is reported), and a meta file with
//! `key<TAB>value` lines (machine, versions, settings). A hand-written section of an
//! existing `BENCHMARKS.md` that starts with a `## Findings` heading is kept at the end.
//!
//! `scale-report` ([`scale`]) writes the `## Scale` section from the `scale_*` metrics of
//! the same results file (idle memory against sessions, logins/s and p99 against
//! concurrent loops) and draws its plot with gnuplot; `compare.sh` splices it in.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Arguments of `cutover-load report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Results file (`target<TAB>metric<TAB>value`).
    #[arg(long)]
    pub results: PathBuf,
    /// Meta file (`key<TAB>value`).
    #[arg(long)]
    pub meta: PathBuf,
    /// Markdown file to write (its `## Findings` section, if any, is kept).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The systems measured, in table order (`compare.sh` target, column name); every one
/// but cutover also gets a ratio column, cutover divided by it.
pub const TARGETS: &[(&str, &str)] = &[
    ("direct", "direct"),
    ("haproxy", "HAProxy"),
    ("nginx", "nginx"),
    ("cutover", "cutover"),
    ("stalwart", "Stalwart proxy"),
];

/// The target the ratios are about.
const MINE: &str = "cutover";

/// A reported figure.
struct Metric {
    key: &'static str,
    name: &'static str,
    higher_better: bool,
    decimals: usize,
}

const METRICS: &[Metric] = &[
    m(
        "login_plain_rate",
        "logins/s, plain, 200 concurrent",
        true,
        0,
    ),
    m(
        "login_plain_p50_ms",
        "  login latency p50 at that load (ms)",
        false,
        2,
    ),
    m(
        "login_plain_p99_ms",
        "  login latency p99 at that load (ms)",
        false,
        2,
    ),
    m("login_plain_errors", "  errors", false, 0),
    m(
        "login_plain_cpu_us",
        "  server CPU per login (us)",
        false,
        0,
    ),
    m(
        "login_plain_cpu_user_us",
        "    of which user space (us)",
        false,
        0,
    ),
    m(
        "login_plain_cpu_sys_us",
        "    of which kernel, system time (us)",
        false,
        0,
    ),
    m(
        "login_plain_pinned_rate",
        "logins/s, plain, 200 concurrent, proxy pinned to CPU 1",
        true,
        0,
    ),
    m(
        "login_plain_pinned_p50_ms",
        "  login latency p50 at that load (ms)",
        false,
        2,
    ),
    m(
        "login_plain_pinned_p99_ms",
        "  login latency p99 at that load (ms)",
        false,
        2,
    ),
    m("login_plain_pinned_errors", "  errors", false, 0),
    m(
        "login_plain_pinned_cpu_us",
        "  server CPU per login (us)",
        false,
        0,
    ),
    m(
        "login_plain_pinned_cpu_user_us",
        "    of which user space (us)",
        false,
        0,
    ),
    m(
        "login_plain_pinned_cpu_sys_us",
        "    of which kernel, system time (us)",
        false,
        0,
    ),
    m(
        "login_tls_rate",
        "logins/s, implicit TLS 1.3, 200 concurrent",
        true,
        0,
    ),
    m(
        "login_tls_p50_ms",
        "  login latency p50 at that load (ms)",
        false,
        2,
    ),
    m(
        "login_tls_p99_ms",
        "  login latency p99 at that load (ms)",
        false,
        2,
    ),
    m("login_tls_errors", "  errors", false, 0),
    m("login_tls_cpu_us", "  server CPU per login (us)", false, 0),
    m(
        "login_tls_cpu_user_us",
        "    of which user space (us)",
        false,
        0,
    ),
    m(
        "login_tls_cpu_sys_us",
        "    of which kernel, system time (us)",
        false,
        0,
    ),
    m(
        "login_tls_pinned_rate",
        "logins/s, implicit TLS 1.3, 200 concurrent, proxy pinned to CPU 1",
        true,
        0,
    ),
    m(
        "login_tls_pinned_p50_ms",
        "  login latency p50 at that load (ms)",
        false,
        2,
    ),
    m(
        "login_tls_pinned_p99_ms",
        "  login latency p99 at that load (ms)",
        false,
        2,
    ),
    m("login_tls_pinned_errors", "  errors", false, 0),
    m(
        "login_tls_pinned_cpu_us",
        "  server CPU per login (us)",
        false,
        0,
    ),
    m(
        "login_tls_pinned_cpu_user_us",
        "    of which user space (us)",
        false,
        0,
    ),
    m(
        "login_tls_pinned_cpu_sys_us",
        "    of which kernel, system time (us)",
        false,
        0,
    ),
    m(
        "unloaded_plain_p50_ms",
        "unloaded login latency p50, plain (ms)",
        false,
        3,
    ),
    m(
        "unloaded_tls_p50_ms",
        "unloaded login latency p50, TLS (ms)",
        false,
        3,
    ),
    m(
        "fetch_plain_mbps",
        "FETCH 1 MiB literals, plain (MB/s)",
        true,
        0,
    ),
    m(
        "fetch_plain_cpu_us_per_mb",
        "  server CPU per MB relayed (us)",
        false,
        0,
    ),
    m(
        "fetch_tls_mbps",
        "FETCH 1 MiB literals, TLS (MB/s)",
        true,
        0,
    ),
    m(
        "fetch_tls_cpu_us_per_mb",
        "  server CPU per MB relayed (us)",
        false,
        0,
    ),
    m(
        "idle_plain_kib",
        "RSS per idle session in IDLE, plain (KiB)",
        false,
        1,
    ),
    m(
        "idle_tls_kib",
        "RSS per idle session in IDLE, TLS (KiB)",
        false,
        1,
    ),
    m("noop_p50_us", "NOOP round trip p50, plain (us)", false, 0),
    m("noop_p99_us", "NOOP round trip p99, plain (us)", false, 0),
    m("noop_cpu_us", "  server CPU per round trip (us)", false, 1),
    m(
        "noop_floor_p50_us",
        "  through the floor relay (see Settings): p50 (us)",
        false,
        0,
    ),
    m("noop_floor_p99_us", "    p99 (us)", false, 0),
    m(
        "noop_floor_cpu_us",
        "    relay CPU per round trip (us)",
        false,
        1,
    ),
    m(
        "storm_noop_p99_us",
        "NOOP p99 of 50 sessions during a TLS login storm (us)",
        false,
        0,
    ),
    m("storm_noop_p50_us", "  NOOP p50 (us)", false, 0),
    m(
        "storm_rate",
        "  the storm: TLS logins/s, 200 concurrent",
        true,
        0,
    ),
    m("storm_errors", "  errors", false, 0),
    m(
        "storm_capped_noop_p99_us",
        "NOOP p99 of 50 sessions during a TLS login storm at {cap} TLS logins/s (us)",
        false,
        0,
    ),
    m("storm_capped_noop_p50_us", "  NOOP p50 (us)", false, 0),
    m(
        "storm_capped_rate",
        "  the storm: TLS logins/s achieved (cap {cap}, up to 200 concurrent)",
        true,
        0,
    ),
    m("storm_capped_errors", "  errors", false, 0),
];

const fn m(key: &'static str, name: &'static str, higher_better: bool, decimals: usize) -> Metric {
    Metric {
        key,
        name,
        higher_better,
        decimals,
    }
}

type Results = BTreeMap<(String, String), Vec<f64>>;

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn get(r: &Results, target: &str, metric: &str) -> Option<f64> {
    median(r.get(&(target.to_string(), metric.to_string()))?)
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => {
            let s = format!("{v:.decimals$}");
            // Thousands separators for big integers, for reading.
            if decimals == 0 && v.abs() >= 1_000.0 {
                let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
                let mut out = String::new();
                for (i, ch) in digits.chars().enumerate() {
                    if i > 0 && (digits.len() - i) % 3 == 0 {
                        out.push(',');
                    }
                    out.push(ch);
                }
                format!("{sign}{out}")
            } else {
                s
            }
        }
        None => "n/a".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// One target (of issue 7, or the issue its name says) and whether this run met it.
struct Check {
    name: &'static str,
    detail: String,
    met: Option<bool>,
}

fn checks(r: &Results) -> Vec<Check> {
    let c = |m: &str| get(r, "cutover", m);
    let mut out = Vec::new();
    let ge = |name: &'static str, mine: Option<f64>, peer: Option<f64>, peer_name: &str, k: f64| {
        let (detail, met) = match (mine, peer) {
            (Some(a), Some(b)) if b > 0.0 => (
                format!(
                    "{} vs {peer_name} {} = {:.2}x (need >= {k}x)",
                    fmt(Some(a), 0),
                    fmt(Some(b), 0),
                    a / b
                ),
                Some(a >= k * b),
            ),
            _ => ("not measured".into(), None),
        };
        Check { name, detail, met }
    };
    out.push(ge(
        "logins/s plain >= 1.5x nginx",
        c("login_plain_rate"),
        get(r, "nginx", "login_plain_rate"),
        "nginx",
        1.5,
    ));
    out.push(ge(
        "logins/s TLS >= 1.5x nginx",
        c("login_tls_rate"),
        get(r, "nginx", "login_tls_rate"),
        "nginx",
        1.5,
    ));
    out.push(match c("unloaded_tls_p50_ms") {
        Some(v) => Check {
            name: "unloaded TLS login p50 < 1 ms",
            detail: format!("{v:.3} ms"),
            met: Some(v < 1.0),
        },
        None => Check {
            name: "unloaded TLS login p50 < 1 ms",
            detail: "not measured".into(),
            met: None,
        },
    });
    for (key, name) in [
        ("idle_plain_kib", "RSS per idle session, plain, below nginx"),
        ("idle_tls_kib", "RSS per idle session, TLS, below nginx"),
    ] {
        let (mine, peer) = (c(key), get(r, "nginx", key));
        out.push(match (mine, peer) {
            (Some(a), Some(b)) => Check {
                name,
                detail: format!("{a:.1} KiB vs nginx {b:.1} KiB"),
                met: Some(a < b),
            },
            _ => Check {
                name,
                detail: "not measured".into(),
                met: None,
            },
        });
    }
    out.push(ge(
        "FETCH MB/s >= 1.0x HAProxy",
        c("fetch_plain_mbps"),
        get(r, "haproxy", "fetch_plain_mbps"),
        "HAProxy",
        1.0,
    ));
    out.push(match (c("noop_p50_us"), get(r, "direct", "noop_p50_us")) {
        (Some(a), Some(b)) => Check {
            name: "NOOP p50 <= direct + 40 us",
            detail: format!("{a:.0} us vs direct {b:.0} us (+{:.0} us)", a - b),
            met: Some(a <= b + 40.0),
        },
        _ => Check {
            name: "NOOP p50 <= direct + 40 us",
            detail: "not measured".into(),
            met: None,
        },
    });
    out.push(noop_vs_floor(r));
    out.push(match c("storm_noop_p99_us") {
        Some(v) => Check {
            name: "NOOP p99 under a TLS login storm < 5 ms",
            detail: format!(
                "{} us (p50 {} us) with {} TLS logins/s",
                fmt(Some(v), 0),
                fmt(c("storm_noop_p50_us"), 0),
                fmt(c("storm_rate"), 0)
            ),
            met: Some(v < 5_000.0),
        },
        None => Check {
            name: "NOOP p99 under a TLS login storm < 5 ms",
            detail: "not measured".into(),
            met: None,
        },
    });
    out.push(match c("storm_capped_noop_p99_us") {
        Some(v) => Check {
            name: "NOOP p99 under a TLS login storm at an equal, capped rate < 5 ms",
            detail: format!(
                "{} us (p50 {} us) with {} TLS logins/s (cap {})",
                fmt(Some(v), 0),
                fmt(c("storm_capped_noop_p50_us"), 0),
                fmt(c("storm_capped_rate"), 0),
                fmt(get(r, "_", "storm_cap"), 0)
            ),
            met: Some(v < 5_000.0),
        },
        None => Check {
            name: "NOOP p99 under a TLS login storm at an equal, capped rate < 5 ms",
            detail: "not measured".into(),
            met: None,
        },
    });
    out
}

/// Issue 13's NOOP target, with the floor relay's figure of the same run beside it: what
/// any relay adds to a round trip on this machine (two more hops through the kernel, two
/// more wake-ups), which cutover's overhead can approach but not go under.
fn noop_vs_floor(r: &Results) -> Check {
    const NAME: &str = "NOOP p50 <= direct + 25 us (issue 13)";
    let direct = get(r, "direct", "noop_p50_us");
    let (Some(mine), Some(direct)) = (get(r, "cutover", "noop_p50_us"), direct) else {
        return Check {
            name: NAME,
            detail: "not measured".into(),
            met: None,
        };
    };
    let mut detail = format!("+{:.0} us", mine - direct);
    if let Some(floor) = get(r, "direct", "noop_floor_p50_us") {
        let _ = write!(
            detail,
            "; the floor relay +{:.0} us, so cutover is the floor {:+.0} us",
            floor - direct,
            mine - floor
        );
    }
    if let (Some(a), Some(b)) = (
        get(r, "cutover", "noop_cpu_us"),
        get(r, "direct", "noop_floor_cpu_us"),
    ) {
        let _ = write!(
            detail,
            " (CPU per round trip {a:.1} us, the floor relay's {b:.1})"
        );
    }
    Check {
        name: NAME,
        detail,
        met: Some(mine <= direct + 25.0),
    }
}

fn read_results(path: &std::path::Path) -> std::io::Result<Results> {
    let mut r = Results::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let mut f = line.split('\t');
        let (Some(t), Some(m), Some(v)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if let Ok(v) = v.trim().parse::<f64>() {
            r.entry((t.to_string(), m.to_string())).or_default().push(v);
        }
    }
    Ok(r)
}

fn read_meta(path: &std::path::Path) -> std::io::Result<Vec<(String, String)>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The results table (markdown): one column per target, then cutover/peer for each peer.
fn table(r: &Results) -> String {
    let peers: Vec<usize> = (0..TARGETS.len())
        .filter(|&i| TARGETS[i].0 != MINE)
        .collect();
    let mine_at = TARGETS.iter().position(|(t, _)| *t == MINE);
    let mut s = String::from("| workload |");
    for (_, name) in TARGETS {
        let _ = write!(s, " {name} |");
    }
    for &i in &peers {
        let _ = write!(s, " {MINE}/{} |", TARGETS[i].1);
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(TARGETS.len() + peers.len()));
    s.push('\n');
    for m in METRICS {
        let vals: Vec<Option<f64>> = TARGETS.iter().map(|(t, _)| get(r, t, m.key)).collect();
        if vals.iter().all(Option::is_none) {
            continue;
        }
        let better = if m.key.ends_with("errors") {
            ""
        } else if m.higher_better {
            " ↑"
        } else {
            " ↓"
        };
        let cap = fmt(get(r, "_", "storm_cap"), 0);
        let name = m.name.replace("{cap}", &cap);
        let sub = name.trim_start_matches(' ');
        let name = format!("{}{sub}", "&nbsp;".repeat(name.len() - sub.len()));
        let _ = write!(s, "| {name}{better} |");
        for v in &vals {
            let _ = write!(s, " {} |", fmt(*v, m.decimals));
        }
        let mine = mine_at.and_then(|i| vals[i]);
        for &i in &peers {
            if m.key.ends_with("errors") {
                s.push_str(" |");
            } else {
                let _ = write!(s, " {} |", ratio(mine, vals[i]));
            }
        }
        s.push('\n');
    }
    s
}

/// Builds the report; prints the table and writes the markdown file if asked.
pub fn run(a: &ReportArgs) -> std::io::Result<()> {
    let r = read_results(&a.results)?;
    let meta = read_meta(&a.meta)?;
    let metaget = |k: &str| {
        meta.iter()
            .find(|(mk, _)| mk == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("?")
    };
    let tbl = table(&r);
    let checks = checks(&r);
    let mut targets = String::new();
    targets.push_str("| target (issue 7 unless named) | this run | met? |\n|---|---|---|\n");
    for c in &checks {
        let met = match c.met {
            Some(true) => "**yes**",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(targets, "| {} | {} | {} |", c.name, c.detail, met);
    }
    println!("{tbl}");
    println!("{targets}");
    let Some(out) = &a.out else {
        return Ok(());
    };
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    let _ = writeln!(
        md,
        "Written by `bench/compare.sh{}` on {} ({} run, {} s). cutover is compared, in one run on one \
         machine, with the fake backend directly (the limit), HAProxy in TCP mode, nginx's mail \
         proxy and Stalwart's migration proxy. Reproduce with `bench/compare.sh` (root; \
         installs nginx, libnginx-mod-mail and haproxy with apt-get if missing, builds \
         Stalwart's proxy from its repository at a pinned commit once); `bench/compare.sh \
         --quick` for a short run. Ratios are cutover divided by the peer; ↑ higher is better, \
         ↓ lower is better.\n",
        if metaget("mode") == "quick" { " --quick" } else { "" },
        metaget("date"),
        metaget("mode"),
        metaget("elapsed_s"),
    );
    md.push_str("## Machine and versions\n\n| | |\n|---|---|\n");
    for (k, label) in [
        ("nproc", "CPUs (`nproc`)"),
        ("cpu", "CPU model"),
        ("mem", "memory"),
        ("kernel", "kernel"),
        ("os", "OS"),
        ("cutover", "cutover"),
        ("git", "cutover source"),
        ("rustc", "rustc"),
        ("nginx", "nginx"),
        ("haproxy", "HAProxy"),
        ("stalwart", "Stalwart proxy"),
        ("openssl", "OpenSSL (nginx, HAProxy)"),
    ] {
        let _ = writeln!(md, "| {label} | {} |", metaget(k));
    }
    md.push_str("\n## Settings\n\n");
    for (k, v) in &meta {
        if k == "setting" {
            let _ = writeln!(md, "- {v}");
        }
    }
    let noise = r.get(&("_".to_string(), "other_cpu_pct".to_string()));
    if let Some(v) = noise {
        let max = v.iter().copied().fold(f64::NAN, f64::max);
        let _ = writeln!(
            md,
            "- Noise: CPU taken by processes other than the load generator, the fake backend and \
             the proxies (other users' builds or fuzzers, kernel threads) during the login runs: \
             median {}%, max {}% of the machine. Before each measurement the script waits \
             (bounded) for the machine to be idle; {} measurement(s) had to go ahead on a busy \
             machine. \"server CPU\" rows are user+system time of the fake backend (direct) or \
             of the proxy's processes per operation (split below them into user space and \
             kernel time, as /proc/PID/stat counts them in clock ticks): much less sensitive \
             to such noise than rates.",
            fmt(median(v), 0),
            fmt(Some(max), 0),
            metaget("busy_measurements"),
        );
    }
    md.push_str("\n## Results\n\n");
    if let Some(m) = noise.and_then(|v| median(v)).filter(|m| *m > 15.0) {
        let _ = writeln!(
            md,
            "**Warning: this run shared the machine with other work (median {m:.0}% of the CPU \
             taken by other processes).** Rates, and so the ratios of rates, are depressed and \
             uneven between targets; compare the \"server CPU\" rows, and re-run on an idle \
             machine before judging the rate targets.\n"
        );
    }
    md.push_str(&tbl);
    md.push_str("\n## Targets\n\n");
    md.push_str(&targets);
    md.push_str(REFERENCE);
    let old = std::fs::read_to_string(out).unwrap_or_default();
    match old.find("\n## Findings") {
        Some(i) => md.push_str(&old[i..]),
        None => md.push_str(
            "\n## Findings\n\n(Nothing written yet: profiling notes for missed targets go here; \
             `compare.sh` keeps this section when it rewrites the file.)\n",
        ),
    }
    std::fs::write(out, md)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

const REFERENCE: &str = "
### Reference figures quoted in issue 7

Measured by the issue's author with an independent tool on machines of the same size, for
checking that this bench reproduces figures of the same kind (not part of this run):

| workload | direct | HAProxy | nginx | Stalwart proxy |
|---|---:|---:|---:|---:|
| logins/s plain | 19,300 | 10,000 | 7,700 | 8,700 |
| logins/s TLS | 3,500 | 2,100 | 2,000 | 2,900 |
| unloaded TLS login p50 | 0.6 ms | 0.9 ms | 44 ms | 0.7 ms |
| FETCH MB/s | 6,300 | 2,200 | 280 | ~1.1x HAProxy |
| RSS per idle session plain / TLS | | 3.4 / 17.9 KB | 9.9 / 24.8 KB | 33 / 41 KB |
| NOOP p50 | 51-67 us | ~80 us | ~80 us | |
";

// --- the scale section (`cutover-load scale-report`) ------------------------------------

/// Arguments of `cutover-load scale-report`.
#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// Results file (`target<TAB>metric<TAB>value`), as for `report`; the `scale_*` metrics
    /// are read.
    #[arg(long)]
    pub results: PathBuf,
    /// Meta file (`key<TAB>value`): `date`, `mode`, `git` and `scale_setting` lines.
    #[arg(long)]
    pub meta: PathBuf,
    /// Where to write the `## Scale` section (markdown).
    #[arg(long)]
    pub out: PathBuf,
    /// SVG file to draw with gnuplot (no plot without it).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// The SVG's path as the markdown links it (relative to the report; default: --svg).
    #[arg(long)]
    pub svg_link: Option<String>,
    /// Also write the gnuplot script here.
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// The gnuplot program.
    #[arg(long, default_value = "gnuplot")]
    pub gnuplot: PathBuf,
}

/// The two kinds of connection of every scale point: (metric part, label).
const KINDS: &[(&str, &str)] = &[("plain", "plain"), ("tls", "TLS")];

/// The plot's colour per target, in the order of [`TARGETS`].
const COLOURS: &[&str] = &["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"];

/// Fraction of its highest rate at which a target's login rate counts as saturated.
const SATURATED: f64 = 0.95;

/// The numbers N of the metrics `PREFIX<N>SUFFIX` any target has (sorted, distinct).
fn points(r: &Results, prefix: &str, suffix: &str) -> Vec<u64> {
    let mut v: Vec<u64> = r
        .keys()
        .filter(|(t, _)| t != "_")
        .filter_map(|(_, m)| m.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The targets (index into [`TARGETS`]) with any metric starting with `prefix`.
fn targets_with(r: &Results, prefix: &str) -> Vec<usize> {
    (0..TARGETS.len())
        .filter(|&i| {
            r.keys()
                .any(|(t, m)| t == TARGETS[i].0 && m.starts_with(prefix))
        })
        .collect()
}

/// What the scale section measured, read from the results.
struct ScaleData {
    /// Idle session counts measured.
    sizes: Vec<u64>,
    /// Idle session counts asked for but not measured (they did not fit the limit).
    too_big: Vec<u64>,
    /// The descriptor limit of the run.
    nofile: Option<f64>,
    idle_targets: Vec<usize>,
    /// Concurrent login loops measured.
    loops: Vec<u64>,
    login_targets: Vec<usize>,
}

impl ScaleData {
    fn new(r: &Results) -> ScaleData {
        let mut sizes = points(r, "scale_idle_plain_", "_kib");
        sizes.extend(points(r, "scale_idle_tls_", "_kib"));
        sizes.sort_unstable();
        sizes.dedup();
        let mut loops = points(r, "scale_login_plain_", "_rate");
        loops.extend(points(r, "scale_login_tls_", "_rate"));
        loops.sort_unstable();
        loops.dedup();
        let mut too_big: Vec<u64> = r
            .get(&("_".to_string(), "scale_idle_na".to_string()))
            .map(|v| v.iter().map(|&x| x as u64).collect())
            .unwrap_or_default();
        too_big.sort_unstable();
        too_big.dedup();
        ScaleData {
            sizes,
            too_big,
            nofile: get(r, "_", "nofile"),
            idle_targets: targets_with(r, "scale_idle_"),
            loops,
            login_targets: targets_with(r, "scale_login_"),
        }
    }

    fn is_empty(&self) -> bool {
        self.sizes.is_empty() && self.too_big.is_empty() && self.loops.is_empty()
    }
}

fn pct_change(a: f64, b: f64) -> String {
    if a == 0.0 {
        return "n/a".into();
    }
    format!("{:+.0}%", (b - a) / a * 100.0)
}

/// Where the plot is: a link for the markdown, or why there is none.
pub enum Plot {
    Link(String),
    Missing(String),
}

/// The `## Scale` section.
pub fn scale_md(r: &Results, meta: &[(String, String)], plot: &Plot) -> String {
    let metaget = |k: &str| {
        meta.iter()
            .find(|(mk, _)| mk == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("?")
    };
    let d = ScaleData::new(r);
    let mut md = String::from("## Scale\n\n");
    let _ = writeln!(
        md,
        "Memory per idle session as the sessions grow, and logins per second and p99 login \
         latency as the concurrent login loops grow; written by `bench/compare.sh{}` on {} \
         (source {}).\n",
        if metaget("mode") == "quick" {
            " --quick"
        } else {
            ""
        },
        metaget("date"),
        metaget("git"),
    );
    match plot {
        Plot::Link(link) => {
            let _ = writeln!(
                md,
                "![Memory per idle session against idle sessions; logins/s and p99 login latency \
                 against concurrent login loops]({link})\n"
            );
        }
        Plot::Missing(why) => {
            let _ = writeln!(md, "Plot: n/a ({why}).\n");
        }
    }
    for (k, v) in meta {
        if k == "scale_setting" {
            let _ = writeln!(md, "- {v}");
        }
    }
    if meta.iter().any(|(k, _)| k == "scale_setting") {
        md.push('\n');
    }
    if d.is_empty() {
        md.push_str("Nothing measured in this run.\n");
        return md;
    }
    if !d.sizes.is_empty() || !d.too_big.is_empty() {
        scale_idle_md(r, &d, &mut md);
    }
    for (kind, label) in KINDS {
        scale_login_md(r, kind, label, &mut md);
    }
    md
}

fn scale_idle_md(r: &Results, d: &ScaleData, md: &mut String) {
    md.push_str("### Memory per idle session\n\n");
    md.push_str(
        "KiB of VmRSS per session, (after - before) / sessions, each size from a freshly \
         started proxy; in parentheses the RSS all the sessions added.\n\n",
    );
    let mut head = String::from("| idle sessions |");
    let mut rule = String::from("|---:|");
    for (_, label) in KINDS {
        for &i in &d.idle_targets {
            let _ = write!(head, " {} {label} |", TARGETS[i].1);
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(md, "{head}\n{rule}");
    let mut all: Vec<u64> = d.sizes.iter().chain(&d.too_big).copied().collect();
    all.sort_unstable();
    all.dedup();
    for n in &all {
        let _ = write!(md, "| {} |", fmt(Some(*n as f64), 0));
        for (kind, _) in KINDS {
            for &i in &d.idle_targets {
                let t = TARGETS[i].0;
                let kib = get(r, t, &format!("scale_idle_{kind}_{n}_kib"));
                let mib = get(r, t, &format!("scale_idle_{kind}_{n}_mib"));
                let errors = get(r, t, &format!("scale_idle_{kind}_{n}_errors")).unwrap_or(0.0);
                let mut cell = match (kib, mib) {
                    (Some(k), Some(m)) => format!("{k:.1} ({m:.1} MiB)"),
                    (Some(k), None) => format!("{k:.1}"),
                    _ => "n/a".into(),
                };
                if errors > 0.0 {
                    let _ = write!(cell, " ({} failed)", fmt(Some(errors), 0));
                }
                let _ = write!(md, " {cell} |");
            }
        }
        md.push('\n');
    }
    md.push('\n');
    for n in &d.too_big {
        let limit = d.nofile.map_or("unknown".to_string(), |l| fmt(Some(l), 0));
        let _ = writeln!(
            md,
            "{}: not measured: a proxy holds two descriptors per session (the client's and the \
             backend's), about {} in one process, and the limit per process here is {limit} \
             (`ulimit -Hn`; raising it needs CAP_SYS_RESOURCE).{}\n",
            fmt(Some(*n as f64), 0),
            fmt(Some(2.0 * *n as f64), 0),
            match d.sizes.last() {
                Some(m) if m < n => format!(
                    " {} is the largest size measured: the most that fits beside the \
                     processes' own descriptors.",
                    fmt(Some(*m as f64), 0)
                ),
                _ => String::new(),
            }
        );
    }
    // How flat: the smallest size measured against the largest, per column.
    if let (Some(lo), Some(hi)) = (d.sizes.first(), d.sizes.last()) {
        if lo < hi {
            let mut parts = Vec::new();
            for (kind, label) in KINDS {
                for &i in &d.idle_targets {
                    let t = TARGETS[i].0;
                    let a = get(r, t, &format!("scale_idle_{kind}_{lo}_kib"));
                    let b = get(r, t, &format!("scale_idle_{kind}_{hi}_kib"));
                    if let (Some(a), Some(b)) = (a, b) {
                        parts.push(format!(
                            "{} {label} {a:.1} -> {b:.1} KiB ({})",
                            TARGETS[i].1,
                            pct_change(a, b)
                        ));
                    }
                }
            }
            if !parts.is_empty() {
                let _ = writeln!(
                    md,
                    "From {} to {} sessions, per session: {}.\n",
                    fmt(Some(*lo as f64), 0),
                    fmt(Some(*hi as f64), 0),
                    parts.join("; ")
                );
            }
        }
    }
}

/// The table of one kind's login points (nothing if it has none).
fn scale_login_md(r: &Results, kind: &str, label: &str, md: &mut String) {
    let loops = points(r, &format!("scale_login_{kind}_"), "_rate");
    let targets = targets_with(r, &format!("scale_login_{kind}_"));
    if loops.is_empty() || targets.is_empty() {
        return;
    }
    let title = if kind == "tls" {
        "implicit TLS 1.3"
    } else {
        label
    };
    let _ = writeln!(md, "### Logins against concurrency, {title}\n");
    let mine_at = targets.iter().position(|&i| TARGETS[i].0 == MINE);
    let peers: Vec<usize> = targets
        .iter()
        .copied()
        .filter(|&i| TARGETS[i].0 != MINE && TARGETS[i].0 != "direct")
        .collect();
    let mut head = String::from("| login loops |");
    let mut rule = String::from("|---:|");
    for &i in &targets {
        let _ = write!(head, " {} logins/s | p99 (ms) |", TARGETS[i].1);
        rule.push_str("---:|---:|");
    }
    if mine_at.is_some() {
        for &i in &peers {
            let _ = write!(head, " {MINE}/{} logins/s |", TARGETS[i].1);
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for c in &loops {
        let _ = write!(md, "| {} |", fmt(Some(*c as f64), 0));
        for &i in &targets {
            let t = TARGETS[i].0;
            let rate = get(r, t, &format!("scale_login_{kind}_{c}_rate"));
            let p99 = get(r, t, &format!("scale_login_{kind}_{c}_p99_ms"));
            let errors = get(r, t, &format!("scale_login_{kind}_{c}_errors")).unwrap_or(0.0);
            let mut cell = fmt(rate, 0);
            if errors > 0.0 {
                let _ = write!(cell, " ({} errors)", fmt(Some(errors), 0));
            }
            let _ = write!(md, " {cell} | {} |", fmt(p99, 2));
        }
        if mine_at.is_some() {
            let mine = get(r, MINE, &format!("scale_login_{kind}_{c}_rate"));
            for &i in &peers {
                let peer = get(r, TARGETS[i].0, &format!("scale_login_{kind}_{c}_rate"));
                let _ = write!(md, " {} |", ratio(mine, peer));
            }
        }
        md.push('\n');
    }
    // The knee: the fewest loops at which each target reaches most of its highest rate.
    let mut parts = Vec::new();
    for &i in &targets {
        let t = TARGETS[i].0;
        let rates: Vec<(u64, f64)> = loops
            .iter()
            .filter_map(|c| Some((*c, get(r, t, &format!("scale_login_{kind}_{c}_rate"))?)))
            .collect();
        let Some(&(best_at, best)) = rates.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else {
            continue;
        };
        let Some(&(knee, _)) = rates.iter().find(|(_, v)| *v >= SATURATED * best) else {
            continue;
        };
        parts.push(format!(
            "{} {}/s at {} loops, {:.0}% of it from {} loops on",
            TARGETS[i].1,
            fmt(Some(best), 0),
            fmt(Some(best_at as f64), 0),
            SATURATED * 100.0,
            fmt(Some(knee as f64), 0)
        ));
    }
    if !parts.is_empty() {
        let _ = writeln!(md, "\nHighest rate: {}.", parts.join("; "));
    }
    md.push('\n');
}

/// gnuplot's single-quoted string.
fn gp_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One curve of a panel: the datablock's column, the target and the kind.
struct Curve {
    col: usize,
    target: usize,
    tls: bool,
}

fn gp_curves(block: &str, curves: &[Curve], suffix: &str) -> String {
    let mut s = String::from("plot ");
    for (n, c) in curves.iter().enumerate() {
        if n > 0 {
            s.push_str(", \\\n     ");
        }
        let _ = write!(
            s,
            "{block} using 1:{} with linespoints lw 2 lc rgb {} dt {} pt {} ps 0.8 title {}",
            c.col,
            gp_quote(COLOURS[c.target]),
            if c.tls { 2 } else { 1 },
            if c.tls { 5 } else { 7 },
            gp_quote(&format!(
                "{} {}{suffix}",
                TARGETS[c.target].1,
                if c.tls { "TLS" } else { "plain" }
            ))
        );
    }
    s.push('\n');
    s
}

/// The gnuplot script that draws the scale plot into `svg` (SVG); `None` with no data.
pub fn scale_gnuplot(r: &Results, svg: &str, title: &str) -> Option<String> {
    let d = ScaleData::new(r);
    let cell = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.3}"));
    let mut panels = Vec::new();
    let mut blocks = String::new();
    if !d.sizes.is_empty() && !d.idle_targets.is_empty() {
        // Columns: sessions, then per kind and target: KiB per session, MiB in all.
        blocks.push_str("$idle << EOD\n");
        let (mut kib, mut mib) = (Vec::new(), Vec::new());
        let mut col = 2;
        for (kind, _) in KINDS {
            for &i in &d.idle_targets {
                let has = d
                    .sizes
                    .iter()
                    .any(|n| get(r, TARGETS[i].0, &format!("scale_idle_{kind}_{n}_kib")).is_some());
                if has {
                    let tls = *kind == "tls";
                    kib.push(Curve {
                        col,
                        target: i,
                        tls,
                    });
                    mib.push(Curve {
                        col: col + 1,
                        target: i,
                        tls,
                    });
                }
                col += 2;
            }
        }
        for n in &d.sizes {
            let _ = write!(blocks, "{n}");
            for (kind, _) in KINDS {
                for &i in &d.idle_targets {
                    let t = TARGETS[i].0;
                    let _ = write!(
                        blocks,
                        " {} {}",
                        cell(get(r, t, &format!("scale_idle_{kind}_{n}_kib"))),
                        cell(get(r, t, &format!("scale_idle_{kind}_{n}_mib")))
                    );
                }
            }
            blocks.push('\n');
        }
        blocks.push_str("EOD\n");
        let max = *d.sizes.last().unwrap_or(&1) as f64;
        let xr = format!(
            "unset logscale\nset xrange [0:{:.0}]\nset xtics auto\nset yrange [0:*]\n\
             set offsets 0, 0, graph 0.45, 0\nset xlabel 'idle sessions'\nset key top left\n",
            max * 1.1
        );
        panels.push(format!(
            "{xr}set title 'RSS per idle session'\nset ylabel 'KiB per session'\n{}",
            gp_curves("$idle", &kib, "")
        ));
        panels.push(format!(
            "{xr}set title 'RSS added by the idle sessions'\nset ylabel 'MiB'\n{}",
            gp_curves("$idle", &mib, "")
        ));
    }
    if !d.loops.is_empty() && !d.login_targets.is_empty() {
        blocks.push_str("$login << EOD\n");
        let (mut rate, mut p99) = (Vec::new(), Vec::new());
        let mut col = 2;
        for (kind, _) in KINDS {
            for &i in &d.login_targets {
                let has = d.loops.iter().any(|c| {
                    get(r, TARGETS[i].0, &format!("scale_login_{kind}_{c}_rate")).is_some()
                });
                if has {
                    let tls = *kind == "tls";
                    rate.push(Curve {
                        col,
                        target: i,
                        tls,
                    });
                    p99.push(Curve {
                        col: col + 1,
                        target: i,
                        tls,
                    });
                }
                col += 2;
            }
        }
        for c in &d.loops {
            let _ = write!(blocks, "{c}");
            for (kind, _) in KINDS {
                for &i in &d.login_targets {
                    let t = TARGETS[i].0;
                    let _ = write!(
                        blocks,
                        " {} {}",
                        cell(get(r, t, &format!("scale_login_{kind}_{c}_rate"))),
                        cell(get(r, t, &format!("scale_login_{kind}_{c}_p99_ms")))
                    );
                }
            }
            blocks.push('\n');
        }
        blocks.push_str("EOD\n");
        let lo = *d.loops.first().unwrap_or(&1) as f64;
        let hi = *d.loops.last().unwrap_or(&1) as f64;
        let tics: Vec<String> = d.loops.iter().map(|c| format!("'{c}' {c}")).collect();
        let xr = format!(
            "set logscale x\nset xrange [{:.3}:{:.3}]\nset xtics ({})\n\
             set xlabel 'concurrent login loops'\n",
            lo / 1.5,
            hi * 1.5,
            tics.join(", ")
        );
        panels.push(format!(
            "{xr}unset logscale y\nset yrange [0:*]\nset offsets 0, 0, graph 0.45, 0\n\
             set key top left\n\
             set title 'Logins per second'\nset ylabel 'logins/s'\n{}",
            gp_curves("$login", &rate, "")
        ));
        panels.push(format!(
            "{xr}set logscale y\nset yrange [*:*]\nset offsets 0, 0, 0, 0\nset key top left\n\
             set title 'p99 login latency (connect to the tagged OK of LOGIN)'\n\
             set ylabel 'ms (log scale)'\n{}",
            gp_curves("$login", &p99, "")
        ));
    }
    panels.retain(|p| !p.ends_with("plot \n"));
    if panels.is_empty() {
        return None;
    }
    let rows = panels.len().div_ceil(2);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "set terminal svg size 1200,{} dynamic noenhanced font 'sans,12' background rgb 'white'",
        430 * rows
    );
    let _ = writeln!(s, "set output {}", gp_quote(svg));
    s.push_str("set datafile missing '?'\nset grid\nset border 3\nset tics nomirror\n");
    s.push_str(&blocks);
    let _ = writeln!(s, "set multiplot layout {rows},2 title {}", gp_quote(title));
    for p in &panels {
        s.push_str(p);
    }
    s.push_str("unset multiplot\nset output\n");
    Some(s)
}

/// Runs gnuplot on `script`, at most 30 seconds.
fn run_gnuplot(gnuplot: &std::path::Path, script: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new(gnuplot)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", gnuplot.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write shows in gnuplot's status; the script is small.
        let _ = stdin.write_all(script.as_bytes());
    }
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("gnuplot took more than 30 s".into());
            }
            Err(e) => return Err(format!("gnuplot: {e}")),
        }
    };
    let msg = reader.join().unwrap_or_default();
    if !msg.trim().is_empty() {
        eprintln!("gnuplot: {}", msg.trim());
    }
    if status.success() {
        Ok(())
    } else {
        let first = msg
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(format!("gnuplot failed ({status}): {}", first.trim()))
    }
}

/// `cutover-load scale-report`: the `## Scale` section and its plot.
pub fn scale(a: &ScaleArgs) -> std::io::Result<()> {
    let r = read_results(&a.results)?;
    let meta = read_meta(&a.meta)?;
    let date = meta
        .iter()
        .find(|(k, _)| k == "date")
        .map_or("", |(_, v)| v.as_str());
    let plot = match &a.svg {
        None => Plot::Missing("no plot asked for".into()),
        Some(svg) => {
            let title = format!("cutover scale, {date}");
            match scale_gnuplot(&r, &svg.to_string_lossy(), &title) {
                None => Plot::Missing("nothing to plot".into()),
                Some(script) => {
                    if let Some(p) = &a.script {
                        std::fs::write(p, &script)?;
                    }
                    match run_gnuplot(&a.gnuplot, &script) {
                        Ok(()) => {
                            eprintln!("wrote {}", svg.display());
                            Plot::Link(
                                a.svg_link
                                    .clone()
                                    .unwrap_or_else(|| svg.to_string_lossy().into_owned()),
                            )
                        }
                        Err(e) => {
                            eprintln!("scale-report: {e}");
                            Plot::Missing(e)
                        }
                    }
                }
            }
        }
    };
    let md = scale_md(&r, &meta, &plot);
    println!("{md}");
    std::fs::write(&a.out, md)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(lines: &[(&str, &str, f64)]) -> Results {
        let mut r = Results::new();
        for (t, m, v) in lines {
            r.entry((t.to_string(), m.to_string()))
                .or_default()
                .push(*v);
        }
        r
    }

    #[test]
    fn table_has_a_column_and_a_ratio_per_peer() {
        let r = results(&[
            ("nginx", "login_plain_rate", 2000.0),
            ("cutover", "login_plain_rate", 4000.0),
            ("stalwart", "login_plain_rate", 5000.0),
            ("cutover", "login_plain_errors", 0.0),
        ]);
        let t = table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| workload | direct | HAProxy | nginx | cutover | Stalwart proxy | cutover/direct \
             | cutover/HAProxy | cutover/nginx | cutover/Stalwart proxy |"
        );
        assert_eq!(
            lines[1],
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        assert_eq!(
            lines[2],
            "| logins/s, plain, 200 concurrent ↑ | n/a | n/a | 2,000 | 4,000 | 5,000 | n/a | n/a \
             | 2.00x | 0.80x |"
        );
        assert_eq!(
            lines[3],
            "| &nbsp;&nbsp;errors | n/a | n/a | n/a | 0 | n/a | | | | |"
        );
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn noop_against_the_floor_relay() {
        let r = results(&[
            ("direct", "noop_p50_us", 40.0),
            ("direct", "noop_floor_p50_us", 64.0),
            ("direct", "noop_floor_cpu_us", 33.0),
            ("cutover", "noop_p50_us", 68.0),
            ("cutover", "noop_cpu_us", 37.0),
        ]);
        let c = noop_vs_floor(&r);
        assert_eq!(c.met, Some(false));
        assert_eq!(
            c.detail,
            "+28 us; the floor relay +24 us, so cutover is the floor +4 us \
             (CPU per round trip 37.0 us, the floor relay's 33.0)"
        );
        let t = table(&r);
        let names: Vec<&str> = t
            .lines()
            .skip(2)
            .map(|l| l.split(" |").next().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "| NOOP round trip p50, plain (us) ↓",
                "| &nbsp;&nbsp;server CPU per round trip (us) ↓",
                "| &nbsp;&nbsp;through the floor relay (see Settings): p50 (us) ↓",
                "| &nbsp;&nbsp;&nbsp;&nbsp;relay CPU per round trip (us) ↓",
            ]
        );
        let fast = results(&[
            ("direct", "noop_p50_us", 40.0),
            ("cutover", "noop_p50_us", 65.0),
        ]);
        let c = noop_vs_floor(&fast);
        assert_eq!((c.met, c.detail.as_str()), (Some(true), "+25 us"));
        assert_eq!(noop_vs_floor(&results(&[])).met, None);
    }

    #[test]
    fn pinned_and_storm_rows() {
        let r = results(&[
            ("cutover", "login_plain_rate", 4000.0),
            ("cutover", "login_plain_pinned_rate", 3000.0),
            ("haproxy", "login_plain_pinned_rate", 2000.0),
            ("cutover", "login_plain_pinned_errors", 0.0),
            ("cutover", "storm_noop_p99_us", 900.0),
            ("cutover", "storm_noop_p50_us", 100.0),
            ("cutover", "storm_rate", 2500.0),
        ]);
        let t = table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            &lines[2..],
            [
                "| logins/s, plain, 200 concurrent ↑ | n/a | n/a | n/a | 4,000 | n/a | n/a | n/a \
                 | n/a | n/a |",
                "| logins/s, plain, 200 concurrent, proxy pinned to CPU 1 ↑ | n/a | 2,000 | n/a \
                 | 3,000 | n/a | n/a | 1.50x | n/a | n/a |",
                "| &nbsp;&nbsp;errors | n/a | n/a | n/a | 0 | n/a | | | | |",
                "| NOOP p99 of 50 sessions during a TLS login storm (us) ↓ | n/a | n/a | n/a | 900 \
                 | n/a | n/a | n/a | n/a | n/a |",
                "| &nbsp;&nbsp;NOOP p50 (us) ↓ | n/a | n/a | n/a | 100 | n/a | n/a | n/a | n/a \
                 | n/a |",
                "| &nbsp;&nbsp;the storm: TLS logins/s, 200 concurrent ↑ | n/a | n/a | n/a | 2,500 \
                 | n/a | n/a | n/a | n/a | n/a |",
            ]
        );
        let storm = checks(&r)
            .into_iter()
            .find(|c| c.name.contains("storm"))
            .expect("a storm target");
        assert_eq!(storm.met, Some(true));
        assert_eq!(storm.detail, "900 us (p50 100 us) with 2,500 TLS logins/s");
        let slow = results(&[("cutover", "storm_noop_p99_us", 7000.0)]);
        let storm = checks(&slow)
            .into_iter()
            .find(|c| c.name.contains("storm"))
            .expect("a storm target");
        assert_eq!(storm.met, Some(false));
    }

    #[test]
    fn cpu_split_and_capped_storm_rows() {
        let r = results(&[
            ("cutover", "login_plain_cpu_us", 80.0),
            ("cutover", "login_plain_cpu_user_us", 14.0),
            ("cutover", "login_plain_cpu_sys_us", 66.0),
            ("cutover", "storm_capped_noop_p99_us", 4000.0),
            ("cutover", "storm_capped_rate", 799.0),
            ("_", "storm_cap", 800.0),
        ]);
        let t = table(&r);
        let names: Vec<&str> = t
            .lines()
            .skip(2)
            .map(|l| l.split(" |").next().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "| &nbsp;&nbsp;server CPU per login (us) ↓",
                "| &nbsp;&nbsp;&nbsp;&nbsp;of which user space (us) ↓",
                "| &nbsp;&nbsp;&nbsp;&nbsp;of which kernel, system time (us) ↓",
                "| NOOP p99 of 50 sessions during a TLS login storm at 800 TLS logins/s (us) ↓",
                "| &nbsp;&nbsp;the storm: TLS logins/s achieved (cap 800, up to 200 concurrent) ↑",
            ]
        );
        let capped = checks(&r)
            .into_iter()
            .find(|c| c.name.contains("capped"))
            .expect("a capped storm target");
        assert_eq!(capped.met, Some(true));
        assert_eq!(
            capped.detail,
            "4,000 us (p50 n/a us) with 799 TLS logins/s (cap 800)"
        );
    }

    fn scale_results() -> Results {
        let mut v = vec![
            ("_", "nofile", 20000.0),
            ("_", "scale_idle_na", 16000.0),
            ("haproxy", "scale_idle_plain_2000_kib", 3.0),
            ("haproxy", "scale_idle_plain_2000_mib", 5.9),
            ("haproxy", "scale_idle_plain_9500_kib", 3.3),
            ("haproxy", "scale_idle_plain_9500_mib", 30.6),
            ("cutover", "scale_idle_plain_2000_kib", 4.0),
            ("cutover", "scale_idle_plain_9500_kib", 3.6),
            ("cutover", "scale_idle_plain_9500_errors", 2.0),
            ("cutover", "scale_idle_tls_2000_kib", 11.0),
        ];
        for (t, base) in [("direct", 20000.0), ("cutover", 10000.0)] {
            for (c, f) in [(1u32, 0.3), (50, 0.9), (200, 1.0), (1000, 0.97)] {
                v.push((t, leak(format!("scale_login_plain_{c}_rate")), base * f));
                v.push((
                    t,
                    leak(format!("scale_login_plain_{c}_p99_ms")),
                    f64::from(c) / 10.0,
                ));
            }
        }
        results(&v)
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    #[test]
    fn scale_section_tables() {
        let r = scale_results();
        let meta = vec![
            ("date".to_string(), "today".to_string()),
            ("mode".to_string(), "quick".to_string()),
            ("git".to_string(), "abc".to_string()),
            (
                "scale_setting".to_string(),
                "Idle: fresh proxies.".to_string(),
            ),
        ];
        let md = scale_md(&r, &meta, &Plot::Link("bench/scale.svg".into()));
        assert!(md.starts_with("## Scale\n\n"), "{md}");
        assert!(md.contains("`bench/compare.sh --quick` on today (source abc)"));
        assert!(md.contains("](bench/scale.svg)\n"));
        assert!(md.contains("- Idle: fresh proxies.\n"));
        assert!(
            md.contains(
                "| idle sessions | HAProxy plain | cutover plain | HAProxy TLS | cutover TLS |\n\
             |---:|---:|---:|---:|---:|\n\
             | 2,000 | 3.0 (5.9 MiB) | 4.0 | n/a | 11.0 |\n\
             | 9,500 | 3.3 (30.6 MiB) | 3.6 (2 failed) | n/a | n/a |\n\
             | 16,000 | n/a | n/a | n/a | n/a |\n"
            ),
            "{md}"
        );
        assert!(md.contains(
            "16,000: not measured: a proxy holds two descriptors per session (the client's and \
             the backend's), about 32,000 in one process, and the limit per process here is 20,000"
        ));
        assert!(md.contains("9,500 is the largest size measured"));
        assert!(
            md.contains("HAProxy plain 3.0 -> 3.3 KiB (+10%); cutover plain 4.0 -> 3.6 KiB (-10%)")
        );
        assert!(
            md.contains(
                "| login loops | direct logins/s | p99 (ms) | cutover logins/s | p99 (ms) |\n\
             |---:|---:|---:|---:|---:|\n\
             | 1 | 6,000 | 0.10 | 3,000 | 0.10 |\n"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "Highest rate: direct 20,000/s at 200 loops, 95% of it from 200 loops on; cutover \
             10,000/s at 200 loops, 95% of it from 200 loops on."
            ),
            "{md}"
        );
        assert!(
            !md.contains("implicit TLS 1.3"),
            "no TLS login table without TLS data"
        );
    }

    #[test]
    fn scale_plot_script() {
        let r = scale_results();
        let gp = scale_gnuplot(&r, "/tmp/it's.svg", "t").expect("a script");
        assert!(gp.contains("set output '/tmp/it''s.svg'\n"), "{gp}");
        assert!(gp.contains("set multiplot layout 2,2 title 't'\n"));
        assert!(
            gp.contains("$idle << EOD\n2000 3.000 5.900 4.000 ? ? ? 11.000 ?\n"),
            "{gp}"
        );
        assert!(gp.contains("$idle using 1:2 with linespoints"));
        // HAProxy has no TLS idle figure: no curve for it.
        assert!(!gp.contains("$idle using 1:6 "));
        assert!(gp.contains("title 'cutover TLS'"));
        assert!(gp.contains("set xtics ('1' 1, '50' 50, '200' 200, '1000' 1000)"));
        assert!(scale_gnuplot(&Results::new(), "x.svg", "t").is_none());
    }
}

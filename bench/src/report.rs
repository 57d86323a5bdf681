//! The report step of `compare.sh`: medians, ratios, the targets of issue 7, and
//! `BENCHMARKS.md`.
//!
//! Input: a results file with one measurement per line, `target<TAB>metric<TAB>value`
//! (repeated runs give several lines; the median is reported), and a meta file with
//! `key<TAB>value` lines (machine, versions, settings). A hand-written section of an
//! existing `BENCHMARKS.md` that starts with a `## Findings` heading is kept at the end.

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

/// One target of issue 7 and whether this run met it.
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
    out
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
        let name = match m.name.strip_prefix("  ") {
            Some(sub) => format!("&nbsp;&nbsp;{sub}"),
            None => m.name.to_string(),
        };
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
    targets.push_str("| target (issue 7) | this run | met? |\n|---|---|---|\n");
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
             of the proxy's processes per operation: much less sensitive to such noise than rates.",
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
}

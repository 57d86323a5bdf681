//! The fuzz targets without a fuzzer: replays every seed in `fuzz/corpus/<target>/` and
//! every reproducer in `fuzz/regressions/<target>/` through the matching
//! `cutover::fuzzing` entry point, then a few thousand deterministic pseudo-random inputs
//! per target (seeds mutated with the target's dictionary, extra read boundaries, random
//! bytes), so `cargo test` on the stable toolchain covers what `fuzz/run.sh` does.
//!
//! A failing input is written to `target/tmp/fuzz-failures/<target>/` and printed escaped;
//! move it to `fuzz/regressions/<target>/` once the bug is understood, and it is replayed
//! here for good. `CUTOVER_FUZZ_ITERATIONS` (per target, default 3000) and
//! `CUTOVER_FUZZ_SEED` explore further: `CUTOVER_FUZZ_ITERATIONS=100000 cargo test
//! --release --test fuzz_corpus`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use cutover::fuzzing::{self, Rng, SEPARATOR, TARGETS};

const DEFAULT_ITERATIONS: usize = 3000;
/// Base of the pseudo-random streams (each target mixes in its name).
const DEFAULT_SEED: u64 = 0x5eed_f022_c0de_0001;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted by name (none if the directory is absent).
fn files(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn entry(target: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no entry point named {target}"))
}

/// The dictionary a target is fuzzed with (`fuzz/dict/*.dict`, libFuzzer syntax).
fn dictionary(target: &str) -> Vec<Vec<u8>> {
    let name = match target.split('_').next() {
        Some("imap") => "imap",
        Some("pop3") => "pop3",
        Some("smtp") => "smtp",
        Some("proxy") => "proxy",
        Some("oauth") => "oauth",
        Some("boundary") => "boundary",
        _ => "yaml",
    };
    let path = fuzz_dir().join("dict").join(format!("{name}.dict"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|line| {
            let start = line.find('"')?;
            let end = line.rfind('"')?;
            (end > start).then(|| unescape(&line[start + 1..end]))
        })
        .collect()
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            if b[i + 1] == b'x' && i + 4 <= b.len() {
                if let Some(v) = s
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i + 1]);
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// One input: usually a seed mutated a few times (bytes flipped, inserted or removed,
/// dictionary words and read boundaries inserted, ranges duplicated, another seed spliced
/// in, the settings byte changed), sometimes plain random bytes.
fn generate(rng: &mut Rng, seeds: &[Vec<u8>], dict: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(10) == 0 {
        return (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect();
    }
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(10) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next_u64() as u8;
            }
            1 => data.insert(at, rng.next_u64() as u8),
            2 if !data.is_empty() => {
                let i = rng.below(data.len());
                let n = 1 + rng.below((data.len() - i).min(16));
                data.drain(i..i + n);
            }
            3 | 4 if !dict.is_empty() => {
                let word = &dict[rng.below(dict.len())];
                data.splice(at..at, word.iter().copied());
            }
            5 => data.insert(at, SEPARATOR),
            6 if !data.is_empty() => {
                let i = rng.below(data.len());
                let n = 1 + rng.below((data.len() - i).min(64));
                let copy: Vec<u8> = data[i..i + n].to_vec();
                for _ in 0..1 + rng.below(4) {
                    data.splice(at..at, copy.iter().copied());
                }
            }
            7 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            8 if !data.is_empty() => data[0] = rng.next_u64() as u8,
            _ => data.truncate(at),
        }
    }
    data.truncate(4096);
    data
}

fn escaped(data: &[u8]) -> String {
    data.iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

/// Runs one input; on a panic, saves it and fails with where it came from.
fn run_one(target: &str, f: fn(&[u8]), data: &[u8], origin: &str) {
    if catch_unwind(AssertUnwindSafe(|| f(data))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-failures")
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("{hash:016x}"));
    let _ = std::fs::write(&path, data);
    panic!(
        "fuzz target {target} panicked on {origin} (the panic message is above); \
         input saved to {}: \"{}\"",
        path.display(),
        escaped(data)
    );
}

fn run_target(target: &str) {
    let f = entry(target);
    let corpus = files("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ has no seeds (run fuzz/seeds.py)"
    );
    let regressions = files("regressions", target);
    for (path, data) in corpus.iter().chain(&regressions) {
        run_one(target, f, data, &path.display().to_string());
    }

    let iterations = std::env::var("CUTOVER_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let base_seed: u64 = std::env::var("CUTOVER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    // Each target gets its own stream, stable across runs.
    let seed = target.bytes().fold(base_seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut rng = Rng(seed);
    let seeds: Vec<Vec<u8>> = corpus
        .into_iter()
        .chain(regressions)
        .map(|(_, d)| d)
        .collect();
    let dict = dictionary(target);
    for i in 0..iterations {
        let data = generate(&mut rng, &seeds, &dict);
        run_one(
            target,
            f,
            &data,
            &format!("generated input {i} (seed {seed:#x})"),
        );
    }
}

#[test]
fn split_round_trips() {
    let chunks = vec![
        b"a\xffb".to_vec(),
        b"\xff".to_vec(),
        Vec::new(),
        b"c".to_vec(),
    ];
    assert_eq!(fuzzing::split(&fuzzing::join(&chunks)), chunks);
}

#[test]
fn every_directory_names_a_target() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for e in entries {
            let e = e.expect("readable directory entry");
            if e.path().is_dir() {
                let name = e.file_name().into_string().expect("UTF-8 directory name");
                assert!(
                    TARGETS.iter().any(|(t, _)| *t == name),
                    "fuzz/{kind}/{name}/ matches no entry point of cutover::fuzzing"
                );
            }
        }
    }
    for (t, _) in TARGETS {
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{t}.rs"))
                .is_file(),
            "no fuzz/fuzz_targets/{t}.rs"
        );
    }
}

#[test]
fn imap_server() {
    run_target("imap_server");
}

#[test]
fn imap_backend() {
    run_target("imap_backend");
}

#[test]
fn pop3_server() {
    run_target("pop3_server");
}

#[test]
fn pop3_backend() {
    run_target("pop3_backend");
}

#[test]
fn smtp_server() {
    run_target("smtp_server");
}

#[test]
fn smtp_server_alphabet() {
    run_target("smtp_server_alphabet");
}

#[test]
fn smtp_backend() {
    run_target("smtp_backend");
}

#[test]
fn config() {
    run_target("config");
}

#[test]
fn oauth_message() {
    run_target("oauth_message");
}

#[test]
fn proxy_header() {
    run_target("proxy_header");
}

#[test]
fn boundary() {
    run_target("boundary");
}

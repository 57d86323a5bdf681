//! Micro-benchmark of the relay's boundary tracker (`cutover::proto::boundary`, issue 17):
//! what following a relayed session's lines and literals costs per byte, next to the
//! `memcpy` of the same bytes (the least the relay does with every byte it moves).
//!
//! Each workload is a typical bulk transfer of about 1 MiB, fed as the relay reads it
//! (64 KiB reads, `RELAY_BUF`; the small-line workload also in 1460-byte reads, one TCP
//! segment each):
//!
//! * `imap_fetch_literals`: FETCH responses carrying 64 KiB message literals (skipped by
//!   their count: the common case of a client downloading mail);
//! * `imap_small_lines`: `* n FETCH (UID n FLAGS (\Seen))` lines (a flag resync: every
//!   line looked at);
//! * `pop3_retr`: one RETR of a 1 MiB message of 76-character lines (every line checked for
//!   the final `.`);
//! * `smtp_data`: the client's DATA content of the same message (every line checked for
//!   the final `.`).
//!
//! Run: `cargo bench -p cutover-bench --bench boundary` (`-- --quick` for a short run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cutover::proto::boundary::{Standing, Tracker};

const MIB: usize = 1024 * 1024;
/// The relay's read size (`cutover::relay::RELAY_BUF`).
const READ: usize = 64 * 1024;

/// A message of 76-character lines, about `size` bytes, dot-stuffed where needed.
fn message(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 128);
    out.extend_from_slice(b"Subject: bench\r\nContent-Type: text/plain\r\n\r\n");
    let mut n = 0u32;
    while out.len() < size {
        let line = format!("{:074}\r\n", n.wrapping_mul(2_654_435_761));
        out.extend_from_slice(line.as_bytes());
        if n % 1000 == 0 {
            out.extend_from_slice(b"..a line that starts with a dot\r\n");
        }
        n += 1;
    }
    out
}

/// A workload: the session's setup (fed before measuring) and its bulk, and which side
/// sends the bulk.
struct Workload {
    name: &'static str,
    new: fn() -> Tracker,
    setup_client: Vec<u8>,
    setup_backend: Vec<u8>,
    bulk: Vec<u8>,
    bulk_from_client: bool,
    /// Where the session must stand after the bulk (checks the work was done).
    after: Standing,
}

fn workloads() -> Vec<Workload> {
    let msg = message(MIB);
    let mut literals = Vec::new();
    let body = vec![b'x'; 64 * 1024];
    for i in 1..=16 {
        literals.extend_from_slice(
            format!("* {i} FETCH (UID {i} BODY[] {{{}}}\r\n", body.len()).as_bytes(),
        );
        literals.extend_from_slice(&body);
        literals.extend_from_slice(b")\r\n");
    }
    literals.extend_from_slice(b"a2 OK Fetch completed.\r\n");
    let mut flags = Vec::new();
    let mut i = 1u32;
    while flags.len() < MIB {
        flags.extend_from_slice(format!("* {i} FETCH (UID {i} FLAGS (\\Seen))\r\n").as_bytes());
        i += 1;
    }
    flags.extend_from_slice(b"a3 OK Fetch completed.\r\n");
    let mut retr = b"+OK message follows\r\n".to_vec();
    retr.extend_from_slice(&msg);
    retr.extend_from_slice(b".\r\n");
    let mut data = msg.clone();
    data.extend_from_slice(b".\r\n");
    vec![
        Workload {
            name: "imap_fetch_literals",
            new: Tracker::imap,
            setup_client: b"a2 FETCH 1:16 (UID BODY[])\r\n".to_vec(),
            setup_backend: Vec::new(),
            bulk: literals,
            bulk_from_client: false,
            after: Standing::Boundary,
        },
        Workload {
            name: "imap_small_lines",
            new: Tracker::imap,
            setup_client: b"a3 FETCH 1:* (UID FLAGS)\r\n".to_vec(),
            setup_backend: Vec::new(),
            bulk: flags,
            bulk_from_client: false,
            after: Standing::Boundary,
        },
        Workload {
            name: "pop3_retr",
            new: Tracker::pop3,
            setup_client: b"RETR 1\r\n".to_vec(),
            setup_backend: Vec::new(),
            bulk: retr,
            bulk_from_client: false,
            after: Standing::Boundary,
        },
        Workload {
            name: "smtp_data",
            new: Tracker::smtp,
            setup_client: b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n".to_vec(),
            setup_backend:
                b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n".to_vec(),
            bulk: data,
            bulk_from_client: true,
            // The final reply to the DATA is still awaited.
            after: Standing::Within,
        },
    ]
}

fn run(w: &Workload, read: usize) -> Standing {
    let mut t = (w.new)();
    t.client_sent(&w.setup_client);
    t.backend_sent(&w.setup_backend);
    for chunk in w.bulk.chunks(read) {
        if w.bulk_from_client {
            t.client_sent(black_box(chunk));
        } else {
            t.backend_sent(black_box(chunk));
        }
    }
    t.standing()
}

fn copy(bulk: &[u8], read: usize, scratch: &mut [u8]) -> u8 {
    let mut x = 0u8;
    for chunk in bulk.chunks(read) {
        scratch[..chunk.len()].copy_from_slice(black_box(chunk));
        x ^= black_box(&scratch[..chunk.len()])[0];
    }
    x
}

fn boundary(c: &mut Criterion) {
    let mut scratch = vec![0u8; READ];
    let mut g = c.benchmark_group("boundary");
    for w in workloads() {
        let reads: &[usize] = if w.name == "imap_small_lines" {
            &[READ, 1460]
        } else {
            &[READ]
        };
        for &read in reads {
            assert_eq!(run(&w, read), w.after, "{}", w.name);
            let id = format!("{}/{}", w.name, read);
            g.throughput(Throughput::Bytes(w.bulk.len() as u64));
            g.bench_with_input(BenchmarkId::new("tracker", &id), &w, |b, w| {
                b.iter(|| run(w, read))
            });
            g.bench_with_input(BenchmarkId::new("memcpy", &id), &w.bulk, |b, bulk| {
                b.iter(|| copy(bulk, read, &mut scratch))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, boundary);
criterion_main!(benches);

//! Micro-benchmarks of the three pre-auth machines (`cutover::proto::{imap,pop3,smtp}`):
//! a new machine (greeting), then a typical pre-auth transcript up to the successful
//! login, the `Login` action answered with `LoginOutcome::Ok`, exactly as the session
//! driver does it (one buffer, `receive` while it consumes, every action drained).
//!
//! Each transcript is measured twice: in commands per second (`Throughput::Elements`,
//! the client commands of the transcript) and in bytes per second (`Throughput::Bytes`,
//! the client bytes). Run: `cargo bench -p cutover-bench --bench preauth`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cutover::proto::{
    imap, pop3, sasl, smtp, Action, Limits, ListenerTls, LoginOutcome, PreAuth, ServerPolicy,
};

fn policy() -> ServerPolicy {
    ServerPolicy {
        // Implicit TLS: login is allowed, as it is on 993/995/465.
        tls: ListenerTls::Implicit,
        allow_plaintext_auth: false,
        limits: Limits::default(),
        hostname: "bench.example.net".into(),
        mechanisms: Default::default(),
    }
}

/// Drives `m` through `input` to the successful login; returns the bytes sent back.
fn drive<M: PreAuth>(mut m: M, input: &[u8], caps: &Option<String>) -> usize {
    let mut rest = input;
    let mut sent = 0;
    loop {
        while let Some(action) = m.poll_action() {
            match action {
                Action::Send(bytes) => sent += bytes.len(),
                Action::Login(creds) => {
                    black_box(&creds);
                    m.login_done(LoginOutcome::Ok {
                        capabilities: caps.clone(),
                    });
                }
                Action::StartTls => m.tls_established(),
                Action::Close => panic!("machine closed the transcript"),
            }
        }
        if m.is_authenticated() {
            assert!(rest.is_empty(), "{} bytes left over", rest.len());
            return sent;
        }
        let used = m.receive(rest);
        assert!(used > 0, "machine stalled with {} bytes left", rest.len());
        rest = &rest[used..];
    }
}

struct Transcript {
    name: &'static str,
    commands: u64,
    input: Vec<u8>,
}

fn plain_b64() -> String {
    sasl::encode_base64(b"\0alice@example.net\0correct horse battery")
}

fn imap_transcripts() -> Vec<Transcript> {
    vec![
        Transcript {
            name: "capability+login_quoted",
            commands: 2,
            input: b"a1 CAPABILITY\r\na2 LOGIN \"alice@example.net\" \"correct horse battery\"\r\n"
                .to_vec(),
        },
        Transcript {
            name: "capability+login_literal",
            commands: 2,
            input: b"a1 CAPABILITY\r\na2 LOGIN {17}\r\nalice@example.net {21}\r\ncorrect horse battery\r\n"
                .to_vec(),
        },
        Transcript {
            name: "capability+login_literal_plus",
            commands: 2,
            input: b"a1 CAPABILITY\r\na2 LOGIN {17+}\r\nalice@example.net {21+}\r\ncorrect horse battery\r\n"
                .to_vec(),
        },
        Transcript {
            name: "capability+authenticate_plain_ir",
            commands: 2,
            input: format!("a1 CAPABILITY\r\na2 AUTHENTICATE PLAIN {}\r\n", plain_b64()).into_bytes(),
        },
    ]
}

fn pop3_transcripts() -> Vec<Transcript> {
    vec![
        Transcript {
            name: "capa+user+pass",
            commands: 3,
            input: b"CAPA\r\nUSER alice@example.net\r\nPASS correct horse battery\r\n".to_vec(),
        },
        Transcript {
            name: "capa+auth_plain_ir",
            commands: 2,
            input: format!("CAPA\r\nAUTH PLAIN {}\r\n", plain_b64()).into_bytes(),
        },
    ]
}

fn smtp_transcripts() -> Vec<Transcript> {
    vec![
        Transcript {
            name: "ehlo+auth_plain_ir",
            commands: 2,
            input: format!("EHLO client.example.org\r\nAUTH PLAIN {}\r\n", plain_b64())
                .into_bytes(),
        },
        Transcript {
            name: "ehlo+auth_login",
            commands: 2,
            input: format!(
                "EHLO client.example.org\r\nAUTH LOGIN\r\n{}\r\n{}\r\n",
                sasl::encode_base64(b"alice@example.net"),
                sasl::encode_base64(b"correct horse battery")
            )
            .into_bytes(),
        },
    ]
}

fn smtp_extensions() -> Vec<String> {
    [
        "SIZE 36700160",
        "8BITMIME",
        "PIPELINING",
        "SMTPUTF8",
        "CHUNKING",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn bench_group<M: PreAuth>(
    c: &mut Criterion,
    group: &str,
    transcripts: &[Transcript],
    caps: Option<String>,
    new: impl Fn() -> M,
) {
    // Check once that each transcript reaches the login, so the numbers mean something.
    for t in transcripts {
        drive(new(), &t.input, &caps);
    }
    let mut g = c.benchmark_group(group);
    for t in transcripts {
        g.throughput(Throughput::Elements(t.commands));
        g.bench_with_input(
            BenchmarkId::new("commands", t.name),
            &t.input,
            |b, input| b.iter(|| drive(new(), black_box(input), &caps)),
        );
        g.throughput(Throughput::Bytes(t.input.len() as u64));
        g.bench_with_input(BenchmarkId::new("bytes", t.name), &t.input, |b, input| {
            b.iter(|| drive(new(), black_box(input), &caps))
        });
    }
    g.finish();
}

fn preauth(c: &mut Criterion) {
    bench_group(
        c,
        "imap",
        &imap_transcripts(),
        Some("IMAP4rev1 LITERAL+ IDLE ID UIDPLUS".into()),
        || imap::ServerMachine::new(policy()),
    );
    bench_group(c, "pop3", &pop3_transcripts(), None, || {
        pop3::ServerMachine::new(policy())
    });
    bench_group(c, "smtp", &smtp_transcripts(), None, || {
        smtp::ServerMachine::new(policy(), smtp_extensions())
    });
}

criterion_group!(benches, preauth);
criterion_main!(benches);

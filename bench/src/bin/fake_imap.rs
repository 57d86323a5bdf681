//! A fast fake IMAP backend for the benchmarks: accepts any login.
//!
//! Speaks just enough IMAP for a proxy's backend login and the bench workloads: a greeting
//! with `CAPABILITY` (IMAP4rev1, AUTH=PLAIN, SASL-IR, LITERAL+, IDLE, ID), `CAPABILITY`,
//! `LOGIN` (atoms, quoted strings, synchronizing and non-synchronizing literals),
//! `AUTHENTICATE PLAIN` (with or without an initial response), `ID`, `NOOP`, `SELECT`/
//! `EXAMINE`, `FETCH`/`UID FETCH` (always one message whose body is a literal of
//! `--fetch-size` bytes), `IDLE`/`DONE`, `LOGOUT`. Anything else gets `BAD`.
//!
//! With `--legacy` it greets and answers like the older servers a migration starts from:
//! a bare `* OK ready` greeting, `CAPABILITY` offering `AUTH=PLAIN` without `SASL-IR` or
//! `LITERAL+`, and a tagged OK without a capability list after the login.
//!
//! Replies to every complete command in a read are written with one write; the FETCH
//! response is built once at start and shared. Runs on tokio's multi-threaded runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How the backend greets and answers.
struct Style {
    greeting: &'static [u8],
    caps: &'static [u8],
    logged_in: &'static [u8],
}

/// Like Dovecot: capabilities in the greeting and in the login's OK.
const MODERN: Style = Style {
    greeting:
        b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ IDLE ID] fake backend ready\r\n",
    caps: b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ IDLE ID\r\n",
    logged_in: b" OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE ID UIDPLUS] Logged in\r\n",
};

/// Like the old hosts: a bare greeting, no SASL-IR or LITERAL+, a bare OK.
const LEGACY: Style = Style {
    greeting: b"* OK ready\r\n",
    caps: b"* CAPABILITY IMAP4rev1 AUTH=PLAIN IDLE\r\n",
    logged_in: b" OK Logged in\r\n",
};
/// Largest command (line plus literals) accepted.
const MAX_COMMAND: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "cutover-fake-imap",
    about = "Fast fake IMAP backend (accepts any login)"
)]
struct Args {
    /// Plaintext listener.
    #[arg(long, default_value = "127.0.0.2:10143")]
    listen: SocketAddr,
    /// Implicit-TLS listener (needs --cert and --key).
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Size of the literal a FETCH returns, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    fetch_size: usize,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Greet and answer like an older server (see the module documentation).
    #[arg(long)]
    legacy: bool,
}

struct Shared {
    fetch: Vec<u8>,
    style: &'static Style,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> std::io::Result<()> {
    let mut fetch = format!("* 1 FETCH (BODY[] {{{}}}\r\n", args.fetch_size).into_bytes();
    // Body: lines of 'x', like a message, CRLF every 78 bytes.
    fetch.extend((0..args.fetch_size).map(|i| match i % 80 {
        78 => b'\r',
        79 => b'\n',
        _ => b'x',
    }));
    fetch.extend_from_slice(b")\r\n");
    let style = if args.legacy { &LEGACY } else { &MODERN };
    let shared = Arc::new(Shared { fetch, style });
    let plain = cutover_bench::listen(args.listen)?;
    eprintln!("fake-imap: plain on {}", plain.local_addr()?);
    if let Some(addr) = args.tls_listen {
        let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
            return Err(std::io::Error::other("--tls-listen needs --cert and --key"));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(cutover_bench::server_config(cert, key)?);
        let tls = cutover_bench::listen(addr)?;
        eprintln!("fake-imap: TLS on {}", tls.local_addr()?);
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = tls.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(tcp).await {
                        let _ = serve(s, &shared).await;
                    }
                });
            }
        });
    }
    loop {
        let Ok((tcp, _)) = plain.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve(tcp, &shared).await;
        });
    }
}

enum State {
    Command,
    /// `AUTHENTICATE PLAIN` without initial response: the next line is the response.
    Sasl(Vec<u8>),
    /// In IDLE: `DONE` ends it.
    Idle(Vec<u8>),
}

enum Framed {
    /// A complete command of this many bytes (line(s) and literals).
    Complete(usize),
    /// More bytes needed.
    Partial,
}

/// Finds the end of the first command in `buf`, following literals. Sends a `+` for each
/// synchronizing literal announced (counted in `conts`, per command).
fn frame(buf: &[u8], conts: &mut usize, out: &mut Vec<u8>) -> Framed {
    let mut at = 0;
    let mut sync_seen = 0;
    loop {
        let Some(lf) = buf[at..].iter().position(|&b| b == b'\n') else {
            return Framed::Partial;
        };
        let line_end = at + lf;
        let line = &buf[at..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match cutover_bench::literal_len(line) {
            None => return Framed::Complete(line_end + 1),
            Some(n) => {
                if !line.ends_with(b"+}") {
                    sync_seen += 1;
                    if sync_seen > *conts {
                        out.extend_from_slice(b"+ Ready for literal data\r\n");
                        *conts += 1;
                    }
                }
                at = line_end + 1 + n;
                if at > buf.len() {
                    return Framed::Partial;
                }
            }
        }
    }
}

/// What to do after the replies in `out` are written.
enum After {
    Continue,
    Fetch(Vec<u8>),
    Close,
}

fn command(cmd: &[u8], style: &Style, state: &mut State, out: &mut Vec<u8>) -> After {
    let first = cmd.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    let mut words = first.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let tag = words.next().unwrap_or(b"*").to_vec();
    let mut verb = words.next().unwrap_or_default().to_ascii_uppercase();
    if verb == b"UID" {
        verb = words.next().unwrap_or_default().to_ascii_uppercase();
    }
    let reply = |out: &mut Vec<u8>, text: &[u8]| {
        out.extend_from_slice(&tag);
        out.push(b' ');
        out.extend_from_slice(text);
    };
    match verb.as_slice() {
        b"CAPABILITY" => {
            out.extend_from_slice(style.caps);
            reply(out, b"OK CAPABILITY completed\r\n");
        }
        b"LOGIN" => {
            out.extend_from_slice(&tag);
            out.extend_from_slice(style.logged_in);
        }
        b"AUTHENTICATE" => {
            if words.nth(1).is_some() {
                out.extend_from_slice(&tag);
                out.extend_from_slice(style.logged_in);
            } else {
                out.extend_from_slice(b"+ \r\n");
                *state = State::Sasl(tag);
            }
        }
        b"ID" => {
            out.extend_from_slice(b"* ID NIL\r\n");
            reply(out, b"OK ID completed\r\n");
        }
        b"NOOP" | b"CHECK" => reply(out, b"OK NOOP completed\r\n"),
        b"SELECT" | b"EXAMINE" => {
            out.extend_from_slice(
                b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 1 EXISTS\r\n\
                  * 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 2] next\r\n",
            );
            reply(out, b"OK [READ-WRITE] SELECT completed\r\n");
        }
        b"FETCH" => {
            let mut done = tag.clone();
            done.extend_from_slice(b" OK FETCH completed\r\n");
            return After::Fetch(done);
        }
        b"IDLE" => {
            out.extend_from_slice(b"+ idling\r\n");
            *state = State::Idle(tag);
        }
        b"LOGOUT" => {
            out.extend_from_slice(b"* BYE logging out\r\n");
            reply(out, b"OK LOGOUT completed\r\n");
            return After::Close;
        }
        _ => reply(out, b"BAD unknown command\r\n"),
    }
    After::Continue
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    shared: &Shared,
) -> std::io::Result<()> {
    io.write_all(shared.style.greeting).await?;
    io.flush().await?;
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut out: Vec<u8> = Vec::with_capacity(2048);
    let mut state = State::Command;
    let mut conts = 0usize;
    loop {
        // Answer every complete command buffered.
        let mut pos = 0;
        let mut close = false;
        loop {
            let rest = &buf[pos..];
            match &state {
                State::Sasl(_) | State::Idle(_) => {
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        break;
                    };
                    let line = &rest[..lf];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    match std::mem::replace(&mut state, State::Command) {
                        State::Sasl(tag) => {
                            out.extend_from_slice(&tag);
                            if line == b"*" {
                                out.extend_from_slice(b" BAD AUTHENTICATE cancelled\r\n");
                            } else {
                                out.extend_from_slice(shared.style.logged_in);
                            }
                        }
                        State::Idle(tag) => {
                            if line.eq_ignore_ascii_case(b"DONE") {
                                out.extend_from_slice(&tag);
                                out.extend_from_slice(b" OK IDLE terminated\r\n");
                            } else {
                                out.extend_from_slice(b"* BAD expected DONE\r\n");
                                state = State::Idle(tag);
                            }
                        }
                        State::Command => {}
                    }
                    pos += lf + 1;
                }
                State::Command => match frame(rest, &mut conts, &mut out) {
                    Framed::Partial => {
                        if rest.len() > MAX_COMMAND {
                            return Err(std::io::Error::other("command too long"));
                        }
                        break;
                    }
                    Framed::Complete(n) => {
                        conts = 0;
                        let after = command(&rest[..n], shared.style, &mut state, &mut out);
                        pos += n;
                        match after {
                            After::Continue => {}
                            After::Close => {
                                close = true;
                                break;
                            }
                            After::Fetch(done) => {
                                if !out.is_empty() {
                                    io.write_all(&out).await?;
                                    out.clear();
                                }
                                io.write_all(&shared.fetch).await?;
                                out.extend_from_slice(&done);
                            }
                        }
                    }
                },
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            io.write_all(&out).await?;
            out.clear();
        }
        io.flush().await?;
        if close {
            let _ = io.shutdown().await;
            return Ok(());
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let n = io.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
    }
}

//! Zero-downtime binary upgrades: the running process hands its listening sockets to a
//! new one over a Unix socket (`upgrade.socket`), the new one starts accepting on the
//! same kernel sockets, and only then the old one stops accepting and drains its relayed
//! sessions. The accept queues belong to the sockets, not to a process: no connection
//! attempt is refused during the hand-over (HAProxy's `-x` and nginx's binary upgrade
//! work the same way).
//!
//! The exchange, on one connection to the old process's socket:
//!
//! ```text
//! new: TAKEOVER\n
//! old: {"names":["imap","imap","imaps","@metrics"]}\n + those descriptors (SCM_RIGHTS),
//!      in batches, then END\n
//! new: (serves on them) ACCEPTING\n
//! old: DRAINING <pid>\n   (and stops accepting, drains, exits)
//! ```
//!
//! `PID\n` asks which process serves now (`cutover upgrade` waits for it to change). The
//! new process takes over the Unix socket too, so the next upgrade asks it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use tokio_util::sync::CancellationToken;

use crate::server::{Inherited, Running};

/// The name of the upgrade socket itself in a hand-over.
const UPGRADE_SOCKET: &str = "@upgrade";
/// The name of the old process's standard error in a hand-over (the new one logs there).
const STDERR: &str = "@stderr";
/// Descriptors per message (the kernel takes at most 253).
const BATCH: usize = 200;
/// Longest wait for the other side at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The socket, or the exchange on it.
    #[error("upgrade socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The other side said something unexpected.
    #[error("upgrade socket {path}: unexpected answer {answer:?}")]
    Protocol {
        /// The socket's path.
        path: PathBuf,
        /// What it said.
        answer: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> UpgradeError + '_ {
    move |source| UpgradeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The old process's side: answers on `path` until `stop`; a completed take-over cancels
/// `taken_over` (the caller then drains and exits). `listener`: the socket inherited at
/// the previous upgrade, if any; else `path` is bound (a stale file there is replaced
/// when nobody answers on it).
pub fn serve(
    path: PathBuf,
    listener: Option<UnixListener>,
    running: Running,
    taken_over: CancellationToken,
) -> Result<(), UpgradeError> {
    let listener = match listener {
        Some(l) => l,
        None => bind(&path)?,
    };
    let copy = listener.try_clone().map_err(io(&path))?;
    std::thread::Builder::new()
        .name("cutover-upgrade".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if taken_over.is_cancelled() {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(STEP_TIMEOUT));
                match answer(conn, &running, &copy) {
                    Ok(true) => {
                        taken_over.cancel();
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "upgrade hand-over failed; still serving"),
                }
            }
        })
        .map_err(io(&path))?;
    Ok(())
}

fn bind(path: &Path) -> Result<UnixListener, UpgradeError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(io(path)(e));
            }
            // Left by a process that is gone.
            std::fs::remove_file(path).map_err(io(path))?;
            UnixListener::bind(path).map_err(io(path))
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// One request on the old process's socket; true when the take-over is complete.
fn answer(mut conn: UnixStream, running: &Running, own: &UnixListener) -> std::io::Result<bool> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    match line.trim() {
        "PID" => {
            writeln!(conn, "{}", std::process::id())?;
            Ok(false)
        }
        "TAKEOVER" => {
            let mut sockets: Vec<(String, OwnedFd)> = Vec::new();
            for (name, socks) in running.sockets()? {
                for s in socks {
                    sockets.push((name.clone(), OwnedFd::from(s)));
                }
            }
            sockets.push((UPGRADE_SOCKET.into(), OwnedFd::from(own.try_clone()?)));
            {
                use std::os::fd::AsFd;
                sockets.push((
                    STDERR.into(),
                    std::io::stderr().as_fd().try_clone_to_owned()?,
                ));
            }
            for batch in sockets.chunks(BATCH) {
                let names: Vec<&str> = batch.iter().map(|(n, _)| n.as_str()).collect();
                let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
                let header = serde_json::json!({ "names": names }).to_string() + "\n";
                conn.send_with_fd(header.as_bytes(), &fds)?;
            }
            conn.write_all(b"END\n")?;
            tracing::info!(
                sockets = sockets.len(),
                "upgrade: sockets handed over; waiting for the new process to accept"
            );
            let mut ack = String::new();
            reader.read_line(&mut ack)?;
            if ack.trim() != "ACCEPTING" {
                return Err(std::io::Error::other(format!(
                    "the new process said {ack:?}"
                )));
            }
            writeln!(conn, "DRAINING {}", std::process::id())?;
            tracing::info!("upgrade: the new process accepts; draining");
            Ok(true)
        }
        other => {
            writeln!(conn, "ERR unknown request {other:?}")?;
            Ok(false)
        }
    }
}

/// What the new process receives: the listening sockets, the upgrade socket, the old
/// process's standard error, and the connection to finish on ([`finish_takeover`]).
pub type TakeOver = (Inherited, Option<UnixListener>, Option<OwnedFd>, UnixStream);

/// The new process's side, before it starts: takes the listening sockets from the process
/// serving on `path`.
pub fn take_over(path: &Path) -> Result<TakeOver, UpgradeError> {
    let conn = UnixStream::connect(path).map_err(io(path))?;
    conn.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io(path))?;
    (&conn).write_all(b"TAKEOVER\n").map_err(io(path))?;
    let mut inherited = Inherited::new();
    let mut upgrade_socket = None;
    let mut stderr = None;
    // Bytes after the last complete line; descriptors arrive with the header lines.
    let mut pending: Vec<u8> = Vec::new();
    let mut names: std::collections::VecDeque<String> = Default::default();
    let mut fds_in: Vec<OwnedFd> = Vec::new();
    loop {
        if let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            if text == "END" {
                break;
            }
            let header: serde_json::Value =
                serde_json::from_str(&text).map_err(|_| UpgradeError::Protocol {
                    path: path.to_path_buf(),
                    answer: text.clone(),
                })?;
            let batch = header["names"].as_array().cloned().unwrap_or_default();
            names.extend(batch.iter().filter_map(|n| n.as_str().map(str::to_string)));
            continue;
        }
        let mut buf = [0u8; 65536];
        let mut fds = [0 as RawFd; 253];
        let (n, nfds) = conn.recv_with_fd(&mut buf, &mut fds).map_err(io(path))?;
        for fd in &fds[..nfds] {
            // SAFETY: the kernel just created these descriptors in this process for us
            // (SCM_RIGHTS); nothing else owns them.
            #[allow(unsafe_code)]
            fds_in.push(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
        if n == 0 {
            return Err(UpgradeError::Protocol {
                path: path.to_path_buf(),
                answer: "(closed)".into(),
            });
        }
        pending.extend_from_slice(&buf[..n]);
    }
    if names.len() != fds_in.len() {
        return Err(UpgradeError::Protocol {
            path: path.to_path_buf(),
            answer: format!("{} names for {} sockets", names.len(), fds_in.len()),
        });
    }
    for (name, fd) in names.into_iter().zip(fds_in) {
        if name == UPGRADE_SOCKET {
            upgrade_socket = Some(UnixListener::from(fd));
        } else if name == STDERR {
            stderr = Some(fd);
        } else {
            inherited
                .entry(name)
                .or_default()
                .push(std::net::TcpListener::from(fd));
        }
    }
    Ok((inherited, upgrade_socket, stderr, conn))
}

/// The new process serves: tells the old one, which stops accepting and drains. Returns
/// the old process's pid.
pub fn finish_takeover(path: &Path, mut conn: UnixStream) -> Result<u32, UpgradeError> {
    conn.write_all(b"ACCEPTING\n").map_err(io(path))?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .map_err(io(path))?;
    answer
        .trim()
        .strip_prefix("DRAINING ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| UpgradeError::Protocol {
            path: path.to_path_buf(),
            answer: answer.trim().to_string(),
        })
}

/// The pid of the process serving on `path`.
pub fn serving_pid(path: &Path) -> Result<u32, UpgradeError> {
    let mut conn = UnixStream::connect(path).map_err(io(path))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io(path))?;
    conn.write_all(b"PID\n").map_err(io(path))?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok();
    let first = answer.lines().next().unwrap_or_default().trim().to_string();
    first.parse().map_err(|_| UpgradeError::Protocol {
        path: path.to_path_buf(),
        answer: first,
    })
}

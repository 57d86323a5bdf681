//! The relay: after login, bytes flow both ways unchanged until both sides are done.
//!
//! Memory is the point of this module. Most relayed sessions are idle (IMAP IDLE all day),
//! so an idle session holds no buffer at all: each direction reads into a per-thread
//! scratch buffer and writes straight on; only when the writer cannot take everything
//! does the rest move into a heap buffer owned by the session, freed as soon as it drains.
//! A direction with bytes pending does not read (backpressure). EOF on one side shuts
//! down the write half of the other (for TLS: close_notify), so half-closed sessions end
//! cleanly; a peer that closes TLS without close_notify counts as a normal EOF. Content
//! is never logged.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read per direction and per wake-up; also the most a session ever buffers per
/// direction (only while its writer is slower than its reader). 64 KiB: a big FETCH
/// literal moves in a quarter of the system calls 16 KiB reads take; the buffer is one per
/// worker thread, not per session.
pub const RELAY_BUF: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; RELAY_BUF]);
}

/// A writer that can be told which bytes are its last before the close.
///
/// When the backend answers a client's `LOGOUT`/`QUIT` and closes at once, its goodbye and
/// its EOF usually arrive together; written as they come, the goodbye goes out in one
/// segment and the close's FIN in another, each acknowledged. A writer that holds the last
/// bytes back (TCP_CORK) lets the close carry them with the FIN: half the packets at the end
/// of every session. Writers that cannot just write.
pub trait FinalWrite: AsyncWrite + Unpin {
    /// Prepares for a last write: the close that follows sends it.
    fn hold_for_close(&mut self) {}
}

impl FinalWrite for tokio::io::DuplexStream {}

#[derive(Debug)]
struct Direction {
    /// Bytes read but not yet written, and how much of them is written.
    pending: Option<(Box<[u8]>, usize)>,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader reached EOF or failed.
    read_done: bool,
    /// Shut the writer down after the reader's EOF (else the owner of the relay does it).
    shutdown_on_eof: bool,
    done: bool,
    bytes: u64,
    /// The last bytes read (at most TAIL), to recognize a client's goodbye.
    tail: [u8; TAIL],
    tail_len: usize,
}

/// How many trailing bytes of the client's stream are kept.
const TAIL: usize = 32;

impl Direction {
    fn new(shutdown_on_eof: bool) -> Self {
        Direction {
            pending: None,
            unflushed: false,
            read_done: false,
            shutdown_on_eof,
            done: false,
            bytes: 0,
            // A line end first, so the client's first line counts as complete.
            tail: {
                let mut t = [0u8; TAIL];
                t[0] = b'\n';
                t
            },
            tail_len: 1,
        }
    }

    fn remember_tail(&mut self, data: &[u8]) {
        if data.len() >= TAIL {
            self.tail.copy_from_slice(&data[data.len() - TAIL..]);
            self.tail_len = TAIL;
        } else {
            let keep = (TAIL - data.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + data.len()].copy_from_slice(data);
            self.tail_len = keep + data.len();
        }
    }

    /// The last complete line read, without its line end (if it fits in the tail).
    fn last_line(&self) -> Option<&[u8]> {
        let t = &self.tail[..self.tail_len];
        let t = t.strip_suffix(b"\n")?;
        let t = t.strip_suffix(b"\r").unwrap_or(t);
        let start = t.iter().rposition(|b| *b == b'\n').map(|p| p + 1)?;
        Some(&t[start..])
    }
}

impl Direction {
    /// Moves bytes from `r` to `w`. `closing`: `r` is expected to end now (the client said
    /// goodbye); a read that finds its EOF right behind the data holds the data for the
    /// close.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        closing: bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: FinalWrite,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Drain what is pending first.
            if let Some((buf, written)) = &mut self.pending {
                while *written < buf.len() {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[*written..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *written += n;
                    self.bytes += n as u64;
                    self.unflushed = true;
                }
                self.pending = None;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                if self.shutdown_on_eof {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with(|scratch| -> Poll<io::Result<()>> {
                let mut scratch = scratch.borrow_mut();
                let mut rb = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.read_done = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => {
                        self.read_done = true;
                        Poll::Ready(Err(e))
                    }
                    Poll::Ready(Ok(())) => {
                        if rb.filled().is_empty() {
                            self.read_done = true;
                            return Poll::Ready(Ok(()));
                        }
                        if closing && rb.remaining() > 0 {
                            // Is the EOF right behind? (Pending costs no system call
                            // here: the read above left the readiness cleared.)
                            let before = rb.filled().len();
                            if let Poll::Ready(Ok(())) = Pin::new(&mut *r).poll_read(cx, &mut rb) {
                                if rb.filled().len() == before {
                                    self.read_done = true;
                                    w.hold_for_close();
                                }
                            }
                        }
                        let data = rb.filled();
                        self.remember_tail(data);
                        let mut off = 0;
                        while off < data.len() {
                            match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                                Poll::Ready(Ok(0)) => {
                                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                                }
                                Poll::Ready(Ok(n)) => off += n,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => break,
                            }
                        }
                        self.bytes += off as u64;
                        self.unflushed |= off > 0;
                        if off < data.len() {
                            self.pending = Some((data[off..].into(), 0));
                        }
                        Poll::Ready(Ok(()))
                    }
                }
            });
            match step {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A bidirectional relay between a client and a backend. Poll it (it is a future) until
/// it completes; the byte counts stay readable if it is dropped early (kick, shutdown).
///
/// The client's EOF is passed on to the backend at once (half-close). The backend's EOF
/// ends the relay without closing the client: the owner closes it, after a delay when
/// many sessions of that backend end together (see `control::limits::Disconnects`).
pub struct Relay<'a, C, B> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Direction,
    down: Direction,
    backend_first: Option<bool>,
}

impl<'a, C, B> Relay<'a, C, B>
where
    C: AsyncRead + FinalWrite,
    B: AsyncRead + FinalWrite,
{
    /// A relay over two connected streams.
    pub fn new(client: &'a mut C, backend: &'a mut B) -> Self {
        Relay {
            client,
            backend,
            up: Direction::new(true),
            down: Direction::new(false),
            backend_first: None,
        }
    }

    /// True if the backend's side ended (EOF or error) while the client's was still open.
    pub fn backend_ended_first(&self) -> bool {
        self.backend_first == Some(true)
    }

    /// True if the last line the client sent was a goodbye (`tag LOGOUT`, `QUIT`): then a
    /// backend that closes first is doing what it was asked, not dying.
    pub fn client_said_goodbye(&self) -> bool {
        let Some(line) = self.up.last_line() else {
            return false;
        };
        line.eq_ignore_ascii_case(b"QUIT")
            || (line.len() > 7 && line[line.len() - 7..].eq_ignore_ascii_case(b" LOGOUT"))
    }

    /// Bytes written to the backend so far.
    pub fn bytes_up(&self) -> u64 {
        self.up.bytes
    }

    /// Bytes written to the client so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.bytes
    }

    /// True if neither direction holds a buffer (the idle state).
    pub fn is_idle(&self) -> bool {
        self.up.pending.is_none() && self.down.pending.is_none()
    }
}

impl<C, B> Future for Relay<'_, C, B>
where
    C: AsyncRead + FinalWrite,
    B: AsyncRead + FinalWrite,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let up = this.up.poll(cx, this.client, this.backend, false);
        let closing = this.client_said_goodbye();
        let down = this.down.poll(cx, this.backend, this.client, closing);
        if this.backend_first.is_none() && (this.up.read_done || this.down.read_done) {
            this.backend_first = Some(this.down.read_done && !this.up.read_done);
        }
        let (up, down) = (up?, down?);
        // Done when the backend has nothing more to say: either both directions are
        // finished, or the backend ended first (the owner decides when to close the client).
        if down.is_ready() && (up.is_ready() || this.backend_first == Some(true)) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn recognizes_a_goodbye_as_the_last_line() {
        let mut d = Direction::new(true);
        assert_eq!(d.last_line(), None);
        d.remember_tail(b"a1 SELECT INBOX\r\n");
        assert_eq!(d.last_line(), Some(&b"a1 SELECT INBOX"[..]));
        d.remember_tail(b"a2 LOG");
        assert_eq!(d.last_line(), None, "incomplete line");
        d.remember_tail(b"OUT\r\n");
        assert_eq!(d.last_line(), Some(&b"a2 LOGOUT"[..]));
        d.remember_tail(&[b'x'; 100]);
        d.remember_tail(b"\r\nQUIT\r\n");
        assert_eq!(d.last_line(), Some(&b"QUIT"[..]));
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_backpressure() {
        let (mut client_app, mut client_proxy) = tokio::io::duplex(1024);
        let (mut backend_proxy, mut backend_app) = tokio::io::duplex(1024);
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let expect = big.clone();
        let task = tokio::spawn(async move {
            let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy);
            (&mut relay).await.unwrap();
            let result = (relay.bytes_up(), relay.bytes_down(), relay.is_idle());
            assert!(!relay.backend_ended_first(), "the client half-closed first");
            drop(relay);
            client_proxy.shutdown().await.unwrap();
            result
        });
        let writer = tokio::spawn(async move {
            client_app.write_all(b"a1 NOOP\r\n").await.unwrap();
            client_app.shutdown().await.unwrap(); // half-close
            let mut got = Vec::new();
            client_app.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut req = Vec::new();
        backend_app.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"a1 NOOP\r\n");
        backend_app.write_all(&big).await.unwrap();
        backend_app.shutdown().await.unwrap();
        let (up, down, idle) = task.await.unwrap();
        assert_eq!((up, down, idle), (9, 200_000, true));
        // The relay leaves closing the client to its owner: dropping the proxy side ends it.
        assert_eq!(writer.await.unwrap(), expect);
    }
}

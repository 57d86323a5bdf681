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
//!
//! A relay may follow the session with a [`Tracker`] (fed every byte it moves, in order):
//! when the backend's side ends first, [`Relay::backend_end`] says how (EOF, reset,
//! timeout) and whether the client stands at a response boundary, where its owner can say
//! the protocol's goodbye before closing it.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Protocol;
use crate::metrics as m;
pub use crate::proto::boundary::{Standing, Tracker};

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
    /// How the reader failed (None: EOF, or still reading).
    read_error: Option<io::ErrorKind>,
    /// How the writer failed.
    write_error: Option<io::ErrorKind>,
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
            read_error: None,
            write_error: None,
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
    /// Moves bytes from `r` to `w`, showing each read to `tracker` (as the client's or the
    /// backend's, per `from`). `closing`: `r` is expected to end now (the client said
    /// goodbye); a read that finds its EOF right behind the data holds the data for the
    /// close. An error is recorded as the reader's or the writer's.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        closing: bool,
        tracker: &mut Option<Tracker>,
        from: Source,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: FinalWrite,
    {
        let polled = self.poll_inner(cx, r, w, closing, tracker, from);
        if let Poll::Ready(Err(e)) = &polled {
            if self.read_error.is_none() {
                self.write_error.get_or_insert(e.kind());
            }
        }
        polled
    }

    fn poll_inner<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        closing: bool,
        tracker: &mut Option<Tracker>,
        from: Source,
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
            let step = self.forward_one_read(cx, r, w, closing, tracker, from);
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

    /// Reads once from `r` into the thread's buffer, shows the bytes to `tracker` and
    /// writes what `w` takes; the rest stays pending in the session. `Ready(Ok)`: go on.
    fn forward_one_read<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        closing: bool,
        tracker: &mut Option<Tracker>,
        from: Source,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: FinalWrite,
    {
        SCRATCH.with(|scratch| {
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
                    self.read_error = Some(e.kind());
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
                    match (tracker.as_mut(), from) {
                        (Some(t), Source::Client) => t.client_sent(data),
                        (Some(t), Source::Backend) => t.backend_sent(data),
                        (None, _) => {}
                    }
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
        })
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
    tracker: Option<Tracker>,
}

/// Whose bytes a direction reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Client,
    Backend,
}

/// The tracker for a session of `protocol`.
pub fn tracker(protocol: Protocol) -> Tracker {
    match protocol {
        Protocol::Imap => Tracker::imap(),
        Protocol::Pop3 => Tracker::pop3(),
        Protocol::Smtp => Tracker::smtp(),
    }
}

/// How the backend's side of a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// It closed (FIN, or TLS close_notify or none).
    Eof,
    /// It was reset (or a write found it gone).
    Reset,
    /// The kernel gave up on it (retransmissions or keepalives unanswered).
    Timeout,
    /// Any other error (TLS, ...).
    Error,
}

impl EndReason {
    fn of(kind: Option<io::ErrorKind>) -> EndReason {
        use io::ErrorKind::*;
        match kind {
            None => EndReason::Eof,
            Some(ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected) => {
                EndReason::Reset
            }
            Some(TimedOut) => EndReason::Timeout,
            Some(_) => EndReason::Error,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Eof => "eof",
            EndReason::Reset => "reset",
            EndReason::Timeout => "timeout",
            EndReason::Error => "error",
        }
    }
}

/// The `reason` values of `cutover_backend_disconnects_total`.
pub const DISCONNECT_REASONS: [&str; 5] = ["eof", "reset", "timeout", "error", "goodbye"];

/// A backend connection that ended while its client was still there (and had not said
/// LOGOUT or QUIT): the backend died, or closed after a goodbye of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendEnd {
    /// How the connection ended.
    pub reason: EndReason,
    /// Where the client stood when it ended (None: nothing was tracked).
    pub standing: Option<Standing>,
    goodbye: Option<&'static [u8]>,
}

impl BackendEnd {
    /// What to tell the client before closing it: the protocol's goodbye when it stands
    /// at a boundary (never inside a response, nor after the backend's own goodbye).
    pub fn goodbye(&self) -> Option<&'static [u8]> {
        self.goodbye
    }

    /// The backend said its own goodbye (IMAP BYE, SMTP 421, POP3 -ERR) before closing:
    /// an end it chose (idle timeout, shutdown), not a death.
    pub fn backend_said_goodbye(&self) -> bool {
        self.standing == Some(Standing::BackendGoodbye)
    }

    /// The `reason` label: `goodbye` when the backend said its own, else how it ended.
    pub fn label(&self) -> &'static str {
        if self.backend_said_goodbye() {
            "goodbye"
        } else {
            self.reason.as_str()
        }
    }

    /// Counts it (`cutover_backend_disconnects_total`) and logs it.
    pub fn record(&self, pool: &str, protocol: Protocol) {
        let goodbye = match self.standing {
            Some(Standing::Boundary) if self.goodbye.is_some() => "sent",
            Some(Standing::BackendGoodbye) => "the backend's",
            Some(Standing::Within) => "none: inside a response",
            Some(Standing::Unknown) => "none: stream not followed",
            _ => "none",
        };
        tracing::info!(
            reason = self.label(),
            goodbye,
            "the backend connection ended with the client still there"
        );
        metrics::counter!(m::BACKEND_DISCONNECTS, "pool" => pool.to_string(), "protocol" => protocol.as_str(), "reason" => self.label())
            .increment(1);
    }
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
            tracker: None,
        }
    }

    /// Follows the session with `tracker` (already fed whatever was exchanged before the
    /// relay started), for [`Relay::backend_end`].
    pub fn tracking(mut self, tracker: Tracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// Tells the tracker of bytes relayed before the relay started: the backend's that
    /// followed its login reply, and the client's pipelined behind its login.
    pub fn already_relayed(&mut self, from_backend: &[u8], from_client: &[u8]) {
        if let Some(t) = self.tracker.as_mut() {
            t.backend_sent(from_backend);
            t.client_sent(from_client);
        }
    }

    /// How the backend's side ended, if it ended first with the client still there: its
    /// EOF or read error came first, or writing the client's bytes to it failed. None when
    /// the client ended first, or its side failed.
    pub fn backend_end(&self) -> Option<BackendEnd> {
        if self.up.read_done {
            return None;
        }
        let reason = if self.down.read_done {
            EndReason::of(self.down.read_error)
        } else if self.up.write_error.is_some() {
            EndReason::of(self.up.write_error)
        } else {
            return None;
        };
        if self.down.pending.is_some() {
            // Bytes the tracker saw never reached the client (a failed write to the
            // backend ended the relay first): the client stands wherever they stop.
            return Some(BackendEnd {
                reason,
                standing: Some(Standing::Within),
                goodbye: None,
            });
        }
        let standing = self.tracker.as_ref().map(Tracker::standing);
        Some(BackendEnd {
            reason,
            standing,
            goodbye: self.tracker.as_ref().and_then(Tracker::goodbye),
        })
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
        let up = this.up.poll(
            cx,
            this.client,
            this.backend,
            false,
            &mut this.tracker,
            Source::Client,
        );
        let closing = this.client_said_goodbye();
        let down = this.down.poll(
            cx,
            this.backend,
            this.client,
            closing,
            &mut this.tracker,
            Source::Backend,
        );
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
    use std::time::Duration;
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

    /// A backend stream whose reads fail with `kind` once `data` is read.
    struct Failing {
        data: Vec<u8>,
        kind: io::ErrorKind,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.data.is_empty() {
                return Poll::Ready(Err(self.kind.into()));
            }
            let n = self.data.len().min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl FinalWrite for Failing {}

    #[tokio::test]
    async fn a_backend_that_fails_says_how_and_where_the_client_stands() {
        /// What the backend sent, how its reads then fail, what the relay makes of it.
        type Case = (
            &'static [u8],
            io::ErrorKind,
            EndReason,
            Option<&'static [u8]>,
        );
        let cases: [Case; 4] = [
            (
                b"* 1 EXISTS\r\n",
                io::ErrorKind::TimedOut,
                EndReason::Timeout,
                Some(crate::proto::boundary::IMAP_GOODBYE),
            ),
            (
                b"* 1 FETCH (BODY[] {9}\r\nabc",
                io::ErrorKind::ConnectionReset,
                EndReason::Reset,
                None,
            ),
            (
                b"* 1 EXI",
                io::ErrorKind::InvalidData,
                EndReason::Error,
                None,
            ),
            (
                b"* BYE going\r\n",
                io::ErrorKind::BrokenPipe,
                EndReason::Reset,
                None,
            ),
        ];
        for (sent, kind, reason, goodbye) in cases {
            let (mut client_app, mut client_proxy) = tokio::io::duplex(1024);
            let mut backend = Failing {
                data: sent.to_vec(),
                kind,
            };
            let mut relay = Relay::new(&mut client_proxy, &mut backend).tracking(Tracker::imap());
            assert!((&mut relay).await.is_err());
            let end = relay.backend_end().expect("the backend ended first");
            assert_eq!((end.reason, end.goodbye()), (reason, goodbye), "{sent:?}");
            drop(relay);
            drop(client_proxy);
            let mut got = Vec::new();
            client_app.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, sent, "everything read was relayed");
        }
    }

    #[tokio::test]
    async fn a_closing_backend_is_an_end_unless_the_client_left_first() {
        // The backend closes at a boundary: EOF, the goodbye is due.
        let (client_app, mut client_proxy) = tokio::io::duplex(1024);
        let (mut backend_proxy, mut backend_app) = tokio::io::duplex(1024);
        backend_app.write_all(b"+OK 2 200\r\n").await.unwrap();
        drop(backend_app);
        let mut tracker = Tracker::pop3();
        tracker.client_sent(b"STAT\r\n");
        let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy).tracking(tracker);
        (&mut relay).await.unwrap();
        let end = relay.backend_end().unwrap();
        assert_eq!(end.reason, EndReason::Eof);
        assert_eq!(end.label(), "eof");
        assert_eq!(end.goodbye(), Some(crate::proto::boundary::POP3_GOODBYE));
        drop(relay);
        drop(client_app);
        // The client closes first, then the backend: no backend end.
        let (mut backend_proxy, backend_app) = tokio::io::duplex(1024);
        let (client_app, mut client_proxy) = tokio::io::duplex(1024);
        drop(client_app);
        let relay = Relay::new(&mut client_proxy, &mut backend_proxy).tracking(Tracker::smtp());
        let mut relay = std::pin::pin!(relay);
        let _ = tokio::time::timeout(Duration::from_millis(100), relay.as_mut()).await;
        drop(backend_app);
        let _ = relay.as_mut().await;
        assert_eq!(relay.backend_end(), None);
    }
}

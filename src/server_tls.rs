//! Server-side TLS for client connections that holds no buffer while the session is idle.
//!
//! rustls' buffered connection keeps a 4 KiB receive buffer for as long as the connection
//! lives (plus queues for plaintext and records), which is most of what an idle TLS
//! session costs. [`ServerTls`] drives rustls' unbuffered API instead: TLS records are read
//! into a per-thread scratch buffer and processed there; only a partial record, decrypted
//! bytes the reader had no room for, or encrypted bytes the socket did not take stay with
//! the connection, each in a vector that is freed again once it is empty.
//!
//! The stream reads like tokio-rustls' did for the relay: EOF at the client's
//! `close_notify`, and also at a TCP close without one (the relay's own end of the session
//! tells truncation apart where it matters: a half-written command reaches the backend as
//! such). A client that keeps sending after its `close_notify` is not read any further.
//!
//! Once a TLS 1.3 handshake is done, rustls hands the records over to
//! [`crate::tls_records::Records`] (keys, sequence numbers and what key updates need), and
//! the rustls connection object is dropped: an idle TLS 1.3 session keeps only that. TLS
//! 1.2 sessions stay with rustls.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls_records::{self, Opened, Records};

/// The largest TLS record on the wire: 16 KiB of payload, the header and the largest
/// expansion TLS 1.2 allows (TLS 1.3 needs less).
const MAX_RECORD: usize = 5 + 16384 + 2048;
/// Plaintext encrypted per write call: four full records.
const MAX_WRITE: usize = 4 * 16384;
/// Room in the write buffer for one call's records: their plaintext and overhead (a key
/// update first, up to five records), and the lead (see [`lead_for`]).
const SEAL_ROOM: usize = MAX_WRITE + 256 + PAGE;
/// The distance [`lead_for`] keeps between plaintext and its copy in the records.
const PAGE: usize = 4096;
/// Bytes read from the socket per read during the handshake.
const HANDSHAKE_READ: usize = 4096;

thread_local! {
    /// Where records are read and processed: a leftover partial record, then a read.
    static READ_SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; PAGE + 2 * MAX_RECORD]);
    /// Where plaintext is encrypted before the socket takes it.
    static WRITE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Who protects the records.
enum Conn {
    /// rustls: the handshake, and TLS 1.2 sessions after it.
    Rustls(Box<UnbufferedServerConnection>),
    /// TLS 1.3 after the handshake (`tls_records`): keys and sequence numbers only.
    Records(Box<Records>),
    /// Lost while changing hands (cannot happen with a config `tls_records::enable`d).
    Gone,
}

/// A TLS connection with a client, after its handshake.
pub struct ServerTls {
    tcp: TcpStream,
    conn: Conn,
    /// TLS bytes received and not processed yet (a partial record). Empty while idle.
    incoming: Vec<u8>,
    /// Encrypted bytes the socket has not taken yet, and how many of them it has.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted bytes the reader had no room for, and how many of them were read.
    plaintext: Vec<u8>,
    taken: usize,
    /// The client's side ended (`close_notify`, or TCP EOF).
    read_closed: bool,
    /// Our `close_notify` is queued.
    close_queued: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Where in a buffer (at `buf`) records begin whose plaintext is copied from or to `data`.
///
/// Sealing copies the plaintext behind each record's five-byte header; opening copies it
/// out from there into the reader's buffer. glibc's `memcpy` (`rep movsb` above 2 KiB on
/// CPUs that announce fast string moves) slows to a twentieth of its speed on some of them
/// (measured: AMD EPYC under KVM, glibc 2.36) when the destination lies 1-31 bytes past the
/// source modulo the page size: two buffers of the same size allocated one after the other
/// are about that far apart, plus the header (BENCHMARKS.md, R5). Starting the records at
/// the right offset puts the first record's plaintext half a page from the other side of
/// the copy; the records behind it drift by their 22 bytes of overhead each, nowhere near
/// the bad distances.
fn lead_for(buf: *const u8, data: *const u8) -> usize {
    let plaintext = (buf as usize).wrapping_add(tls_records::HEADER);
    let distance = plaintext.wrapping_sub(data as usize) % PAGE;
    (PAGE + PAGE / 2 - distance) % PAGE
}

/// Drops a vector's memory when it is empty, so an idle connection keeps none.
fn release_if_empty(v: &mut Vec<u8>) {
    if v.is_empty() && v.capacity() > 0 {
        *v = Vec::new();
    }
}

/// What processing the records at hand came to.
enum Processed {
    /// Every complete record is processed; more bytes are needed.
    NeedInput,
    /// The handshake is done and nothing else is waiting.
    Traffic,
    /// The client sent `close_notify` (or the connection is closed both ways).
    PeerClosed,
}

/// Where the states that carry bytes put them.
struct Kept<'a> {
    outgoing: &'a mut Vec<u8>,
    plaintext: &'a mut Vec<u8>,
}

impl Kept<'_> {
    /// Takes the bytes of a state that carries some: decrypted application data (to
    /// `into` as far as it has room, the rest kept) or a handshake message to send (queued
    /// in `outgoing`, sent before anything that follows).
    fn take<Data>(
        self,
        state: ConnectionState<'_, '_, Data>,
        mut into: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<()> {
        match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let mut payload = record.map_err(tls_error)?.payload;
                    if let Some(buf) = into.as_deref_mut() {
                        let n = payload.len().min(buf.remaining());
                        buf.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    self.plaintext.extend_from_slice(payload);
                }
                Ok(())
            }
            ConnectionState::EncodeTlsData(mut data) => {
                let at = self.outgoing.len();
                let mut room = HANDSHAKE_READ;
                loop {
                    self.outgoing.resize(at + room, 0);
                    match data.encode(&mut self.outgoing[at..]) {
                        Ok(n) => {
                            self.outgoing.truncate(at + n);
                            return Ok(());
                        }
                        Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                        Err(e) => {
                            self.outgoing.truncate(at);
                            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                        }
                    }
                }
            }
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                Ok(())
            }
            // Early data is never accepted (`max_early_data_size` is 0); states added to
            // rustls later are not expected here.
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected TLS state",
            )),
        }
    }
}

impl ServerTls {
    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<ServerTls> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut tls = ServerTls {
            tcp,
            conn: Conn::Rustls(Box::new(conn)),
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            plaintext: Vec::new(),
            taken: 0,
            read_closed: false,
            close_queued: false,
        };
        std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
        tls.hand_over()?;
        Ok(tls)
    }

    /// Hands a TLS 1.3 connection's records from rustls to [`Records`].
    fn hand_over(&mut self) -> io::Result<()> {
        let Conn::Rustls(conn) = &self.conn else {
            return Ok(());
        };
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
            || !self.outgoing.is_empty()
        {
            return Ok(());
        }
        let Conn::Rustls(conn) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Ok(());
        };
        let (extracted, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
        let records = Records::new(extracted, kernel).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "TLS 1.3 record keys unusable")
        })?;
        self.conn = Conn::Records(Box::new(records));
        Ok(())
    }

    /// The negotiated protocol version.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        match &self.conn {
            Conn::Rustls(conn) => conn.protocol_version(),
            Conn::Records(_) => Some(rustls::ProtocolVersion::TLSv1_3),
            Conn::Gone => None,
        }
    }

    /// The rustls connection, while it has the records.
    fn rustls(&mut self) -> io::Result<&mut UnbufferedServerConnection> {
        match &mut self.conn {
            Conn::Rustls(conn) => Ok(conn),
            _ => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            let mut input = std::mem::take(&mut self.incoming);
            let processed = self.process(&mut input, None);
            self.incoming = input;
            let (processed, used) = processed?;
            self.incoming.drain(..used);
            match processed {
                // TLS 1.3 lets the server send before the client's Finished: the
                // handshake is over when that has arrived.
                Processed::Traffic if self.rustls()?.is_handshaking() => {}
                Processed::Traffic => {
                    // Tickets and anything else queued after the handshake go out first.
                    if self.outgoing.is_empty() {
                        release_if_empty(&mut self.incoming);
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                Processed::PeerClosed => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Processed::NeedInput => {}
            }
            if !self.outgoing.is_empty() {
                continue;
            }
            if self.incoming.len() >= 2 * MAX_RECORD + 65536 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake message too large",
                )));
            }
            let have = self.incoming.len();
            self.incoming.resize(have + HANDSHAKE_READ, 0);
            let mut rb = ReadBuf::new(&mut self.incoming[have..]);
            let polled = Pin::new(&mut self.tcp).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            self.incoming.truncate(have + n);
            ready!(polled)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Processes the complete records at the front of `input`: handshake messages are
    /// answered into `outgoing`, application data goes to `into` as far as it has room,
    /// then to `plaintext`. Returns what that came to and how many bytes were consumed
    /// (the rest is a partial record).
    fn process(
        &mut self,
        input: &mut [u8],
        mut into: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Processed, usize)> {
        let conn = match &mut self.conn {
            Conn::Rustls(conn) => conn,
            Conn::Records(records) => {
                return open_records(
                    records,
                    input,
                    into,
                    &mut self.plaintext,
                    &mut self.outgoing,
                )
            }
            Conn::Gone => return Err(io::ErrorKind::BrokenPipe.into()),
        };
        let mut start = 0;
        loop {
            let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut input[start..]);
            let state = state.map_err(tls_error)?;
            let step = match state {
                ConnectionState::BlockedHandshake => Some(Processed::NeedInput),
                ConnectionState::WriteTraffic(_) => Some(Processed::Traffic),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    Some(Processed::PeerClosed)
                }
                other => {
                    let kept = Kept {
                        outgoing: &mut self.outgoing,
                        plaintext: &mut self.plaintext,
                    };
                    kept.take(other, into.as_deref_mut())?;
                    None
                }
            };
            start += discard;
            if let Some(done) = step {
                return Ok((done, start));
            }
        }
    }

    /// Sends what is queued in `outgoing`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.clear();
        self.sent = 0;
        release_if_empty(&mut self.outgoing);
        Poll::Ready(Ok(()))
    }

    /// Moves decrypted bytes kept from earlier reads into `buf`.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.taken >= self.plaintext.len() {
            return false;
        }
        let n = (self.plaintext.len() - self.taken).min(buf.remaining());
        buf.put_slice(&self.plaintext[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.plaintext.len() {
            self.plaintext.clear();
            self.taken = 0;
            release_if_empty(&mut self.plaintext);
        }
        true
    }

    /// Encrypts `data` (at most [`MAX_WRITE`] of it) and sends it; what the socket does not
    /// take is kept in `outgoing`. Returns the plaintext bytes taken.
    fn encrypt(&mut self, cx: &mut Context<'_>, data: &[u8]) -> io::Result<usize> {
        let data = &data[..data.len().min(MAX_WRITE)];
        WRITE_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (lead, written) = match &mut self.conn {
                Conn::Records(records) => {
                    if self.close_queued {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    }
                    scratch.clear();
                    scratch.reserve(SEAL_ROOM);
                    let lead = lead_for(scratch.as_ptr(), data.as_ptr());
                    scratch.resize(lead, 0);
                    records
                        .seal(data, &mut scratch)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    (lead, scratch.len())
                }
                Conn::Rustls(_) => (0, self.encrypt_rustls(data, &mut scratch)?),
                Conn::Gone => return Err(io::ErrorKind::BrokenPipe.into()),
            };
            // Whatever is queued goes before this record.
            let mut off = lead;
            if self.outgoing.is_empty() {
                while off < written {
                    match Pin::new(&mut self.tcp).poll_write(cx, &scratch[off..written]) {
                        Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => off += n,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => break,
                    }
                }
            }
            if off < written {
                if self.outgoing.is_empty() {
                    // The socket is full: the session keeps this buffer (no copy) and the
                    // thread makes itself a new one on its next write.
                    scratch.truncate(written);
                    std::mem::swap(&mut self.outgoing, &mut *scratch);
                    self.sent = off;
                } else {
                    self.outgoing.extend_from_slice(&scratch[off..written]);
                }
            }
            if scratch.len() > 2 * MAX_WRITE {
                *scratch = Vec::new();
            }
            Ok(data.len())
        })
    }

    /// Encrypts `data` with rustls into `scratch`; returns the bytes written there.
    fn encrypt_rustls(&mut self, data: &[u8], scratch: &mut Vec<u8>) -> io::Result<usize> {
        let mut empty: [u8; 0] = [];
        loop {
            let Conn::Rustls(conn) = &mut self.conn else {
                return Err(io::ErrorKind::BrokenPipe.into());
            };
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut empty);
            match state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    if self.close_queued {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    }
                    return loop {
                        match traffic.encrypt(data, &mut scratch[..]) {
                            Ok(n) => break Ok(n),
                            Err(EncryptError::InsufficientSize(s)) => {
                                scratch.resize(s.required_size, 0)
                            }
                            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                        }
                    };
                }
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed | ConnectionState::BlockedHandshake => {
                    return Err(io::ErrorKind::BrokenPipe.into())
                }
                // Post-handshake messages (a key update's answer, tickets) are queued
                // first.
                other => Kept {
                    outgoing: &mut self.outgoing,
                    plaintext: &mut self.plaintext,
                }
                .take(other, None)?,
            }
        }
    }

    /// Reads from the socket into the scratch buffer (behind any partial record kept),
    /// processes the records there, and keeps what is left.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        READ_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let have = self.incoming.len();
            if scratch.len() < PAGE + have + MAX_RECORD {
                scratch.resize(PAGE + have + MAX_RECORD, 0);
            }
            // The records start where their payload is far (modulo a page) from where it
            // is copied to: the reader's buffer (see `lead_for`).
            let to = buf.filled().as_ptr().wrapping_add(buf.filled().len());
            let lead = lead_for(scratch.as_ptr(), to);
            let scratch = &mut scratch[lead..];
            scratch[..have].copy_from_slice(&self.incoming);
            let mut rb = ReadBuf::new(&mut scratch[have..]);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.read_closed = true;
                self.incoming = Vec::new();
                return Poll::Ready(Ok(()));
            }
            let (processed, used) = self.process(&mut scratch[..have + n], Some(buf))?;
            // Only a partial record is left: keep exactly that.
            self.incoming.clear();
            self.incoming.extend_from_slice(&scratch[used..have + n]);
            if self.incoming.len() * 2 < self.incoming.capacity() {
                self.incoming.shrink_to_fit();
            }
            if let Processed::PeerClosed = processed {
                self.read_closed = true;
            }
            Poll::Ready(Ok(()))
        })
    }
}

/// Opens the complete records at the front of `input` with [`Records`]: application data
/// goes to `into` as far as it has room, then to `plaintext`. A refused record queues its
/// alert in `outgoing` and fails the read.
fn open_records(
    records: &mut Records,
    input: &mut [u8],
    mut into: Option<&mut ReadBuf<'_>>,
    plaintext: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
) -> io::Result<(Processed, usize)> {
    let mut start = 0;
    loop {
        match records.open(&mut input[start..]) {
            Ok(None) => return Ok((Processed::NeedInput, start)),
            Ok(Some((Opened::Data(range), wire))) => {
                let mut payload = &input[start + range.start..start + range.end];
                if let Some(buf) = into.as_deref_mut() {
                    let n = payload.len().min(buf.remaining());
                    buf.put_slice(&payload[..n]);
                    payload = &payload[n..];
                }
                plaintext.extend_from_slice(payload);
                start += wire;
            }
            Ok(Some((Opened::CloseNotify, wire))) => {
                return Ok((Processed::PeerClosed, start + wire))
            }
            Ok(Some((Opened::Nothing, wire))) => start += wire,
            Err(e) => {
                if let Some(alert) = e.alert {
                    let _ = records.seal_alert(alert, outgoing);
                }
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

impl AsyncRead for ServerTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.take_plaintext(buf) || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            // Anything a read made rustls answer (a key update) goes out first; a socket
            // that takes nothing now does not hold the read up.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            let before = buf.filled().len();
            ready!(this.poll_receive(cx, buf))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for ServerTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        Poll::Ready(this.encrypt(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            ready!(this.poll_send(cx))?;
            let mut empty: [u8; 0] = [];
            loop {
                let conn = match &mut this.conn {
                    Conn::Rustls(conn) => conn,
                    Conn::Records(records) => {
                        let _ = records.seal_alert(tls_records::CLOSE_NOTIFY, &mut this.outgoing);
                        break;
                    }
                    Conn::Gone => break,
                };
                let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut empty);
                match state {
                    Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                        let mut alert = [0u8; 64];
                        if let Ok(n) = traffic.queue_close_notify(&mut alert) {
                            this.outgoing.extend_from_slice(&alert[..n]);
                        }
                        break;
                    }
                    Ok(ConnectionState::PeerClosed) => this.read_closed = true,
                    // Closed, or failed: nothing to say.
                    Ok(ConnectionState::Closed | ConnectionState::BlockedHandshake) | Err(_) => {
                        break
                    }
                    Ok(other) => Kept {
                        outgoing: &mut this.outgoing,
                        plaintext: &mut this.plaintext,
                    }
                    .take(other, None)?,
                }
            }
            this.close_queued = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        crate::tls::provider()
    }

    fn server_config() -> Arc<ServerConfig> {
        server_config_with(|_| {})
    }

    fn server_config_with(change: impl FnOnce(&mut ServerConfig)) -> Arc<ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let certs = crate::tls::load_certs(&dir.join("proxy.pem")).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("proxy-key.pem")).unwrap();
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let mut cfg = cfg;
        crate::tls_records::enable(&mut cfg);
        change(&mut cfg);
        Arc::new(cfg)
    }

    fn client_config(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(&dir.join("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // For the tests that write the client's records themselves.
        cfg.enable_secret_extraction = true;
        Arc::new(cfg)
    }

    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (ServerTls, tokio_rustls::client::TlsStream<TcpStream>) {
        pair_with(versions, server_config()).await
    }

    async fn pair_with(
        versions: &[&'static rustls::SupportedProtocolVersion],
        server_cfg: Arc<ServerConfig>,
    ) -> (ServerTls, tokio_rustls::client::TlsStream<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(versions));
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = ServerTls::accept(server_cfg, tcp).await.unwrap();
        (server, client.await.unwrap())
    }

    #[tokio::test]
    async fn carries_bytes_both_ways_and_keeps_no_buffer_while_idle() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let (mut server, mut client) = pair(versions).await;
            assert_eq!(server.protocol_version(), Some(versions[0].version));
            // TLS 1.3 records are ours after the handshake; TLS 1.2 stays with rustls.
            let ours = matches!(server.conn, Conn::Records(_));
            assert_eq!(
                ours,
                versions[0].version == rustls::ProtocolVersion::TLSv1_3
            );
            client.write_all(b"a1 NOOP\r\n").await.unwrap();
            client.flush().await.unwrap();
            let mut line = [0u8; 9];
            server.read_exact(&mut line).await.unwrap();
            assert_eq!(&line, b"a1 NOOP\r\n");
            // Idle: nothing kept.
            assert_eq!(server.incoming.capacity(), 0);
            assert_eq!(server.outgoing.capacity(), 0);
            assert_eq!(server.plaintext.capacity(), 0);

            // A megabyte each way, in pieces that do not line up with records.
            let big: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
            let expect = big.clone();
            let writer = tokio::spawn(async move {
                for piece in big.chunks(10_007) {
                    server.write_all(piece).await.unwrap();
                }
                server.flush().await.unwrap();
                server
            });
            let mut got = vec![0u8; expect.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == expect, "server -> client bytes differ");
            let mut server = writer.await.unwrap();

            let up = expect.clone();
            let sender = tokio::spawn(async move {
                client.write_all(&up).await.unwrap();
                client.flush().await.unwrap();
                client
            });
            let mut got = vec![0u8; expect.len()];
            let mut off = 0;
            while off < got.len() {
                // A small reader: records are larger than its buffer.
                let end = (off + 1000).min(got.len());
                let n = server.read(&mut got[off..end]).await.unwrap();
                assert!(n > 0);
                off += n;
            }
            assert!(got == expect, "client -> server bytes differ");
            let mut client = sender.await.unwrap();

            // The client's close_notify is an EOF; ours reaches the client as one.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn records_start_half_a_page_from_the_plaintext_they_copy() {
        for buf in [0usize, 1, 4095, 4096, 65_552, 0x7f00_1234_5678] {
            for data in [0usize, 5, 16, 4091, 65_536, 0x7f00_1234_0010] {
                let lead = lead_for(buf as *const u8, data as *const u8);
                assert!(lead < PAGE);
                let plaintext = buf + lead + tls_records::HEADER;
                assert_eq!(
                    plaintext.wrapping_sub(data) % PAGE,
                    PAGE / 2,
                    "{buf} {data}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_full_socket_keeps_the_records_in_order_and_frees_them_once_sent() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        // Sixteen megabytes in writes of four records: far more than the socket buffers
        // hold while the client reads nothing, so writes find the socket full.
        let big: Vec<u8> = (0..16 * 1_048_576u32).map(|i| (i % 253) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            let mut queued_behind_a_full_socket = false;
            for piece in big.chunks(MAX_WRITE) {
                server.write_all(piece).await.unwrap();
                queued_behind_a_full_socket |= !server.outgoing.is_empty();
            }
            server.flush().await.unwrap();
            assert!(queued_behind_a_full_socket, "the socket never filled");
            // Sent: the session holds no buffer.
            assert_eq!(server.outgoing.capacity(), 0);
            server
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut got = vec![0u8; expect.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == expect, "server -> client bytes differ");
        let mut server = writer.await.unwrap();
        // And the next write, from a fresh buffer, arrives whole.
        server.write_all(b"* OK after\r\n").await.unwrap();
        server.flush().await.unwrap();
        let mut line = [0u8; 12];
        client.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"* OK after\r\n");
    }

    #[tokio::test]
    async fn a_tcp_close_without_close_notify_is_an_eof() {
        // No tickets: the client's socket must hold nothing unread, or closing it resets.
        let cfg = server_config_with(|c| c.send_tls13_tickets = 0);
        let (mut server, client) = pair_with(&[&rustls::version::TLS13], cfg).await;
        let (tcp, _) = client.into_inner();
        drop(tcp);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_fails_it() {
        let server_cfg = server_config();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"a1 LOGIN user pass\r\n").await.unwrap();
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
        });
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(ServerTls::accept(server_cfg, tcp).await.is_err());
        client.await.unwrap();
    }

    /// A client that offers only `suite`.
    async fn pair_with_suite(
        suite: rustls::SupportedCipherSuite,
    ) -> (ServerTls, tokio_rustls::client::TlsStream<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = (*provider()).clone();
        p.cipher_suites = vec![suite];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(&dir.join("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(p))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await.unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = ServerTls::accept(server_config(), tcp).await.unwrap();
        (server, client.await.unwrap())
    }

    /// Sends `n` bytes each way and checks them.
    async fn exchange(
        server: &mut ServerTls,
        client: &mut tokio_rustls::client::TlsStream<TcpStream>,
        n: usize,
    ) {
        let down: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
        let up: Vec<u8> = (0..n).map(|i| (i % 241) as u8).collect();
        let (r, ()) = tokio::join!(
            async {
                server.write_all(&down).await.unwrap();
                server.flush().await.unwrap();
                let mut got = vec![0u8; n];
                server.read_exact(&mut got).await.unwrap();
                got
            },
            async {
                let mut got = vec![0u8; n];
                client.read_exact(&mut got).await.unwrap();
                assert!(got == down, "server -> client bytes differ");
                client.write_all(&up).await.unwrap();
                client.flush().await.unwrap();
            }
        );
        assert!(r == up, "client -> server bytes differ");
    }

    #[tokio::test]
    async fn every_tls13_suite_and_key_updates_both_ways() {
        let suites = provider().cipher_suites.clone();
        let tls13: Vec<_> = suites.into_iter().filter(|s| s.tls13().is_some()).collect();
        assert_eq!(tls13.len(), 3);
        for suite in tls13 {
            let (mut server, mut client) = pair_with_suite(suite).await;
            assert!(matches!(server.conn, Conn::Records(_)), "{suite:?}");
            exchange(&mut server, &mut client, 70_000).await;
            // We update our keys and ask the client to update its own: it must read our
            // next records with its next keys, and we must read its.
            for _ in 0..3 {
                let Conn::Records(records) = &mut server.conn else {
                    unreachable!()
                };
                records.request_key_update(&mut server.outgoing).unwrap();
                exchange(&mut server, &mut client, 20_000).await;
            }
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    /// Writes `bytes` on the client's TCP socket under its TLS and returns how the server's
    /// read ended and what the client read after it.
    async fn server_reads_raw(bytes: &[u8]) -> (io::Error, String) {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13]).await;
        assert!(matches!(server.conn, Conn::Records(_)));
        client.get_mut().0.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let err = server.read(&mut buf).await.unwrap_err();
        let _ = server.flush().await;
        drop(server);
        let seen = match client.read(&mut buf).await {
            Ok(n) => format!("read {n}"),
            Err(e) => e.to_string(),
        };
        (err, seen)
    }

    #[tokio::test]
    async fn bad_records_after_the_handshake_fail_with_the_right_alert() {
        // A record that does not authenticate.
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend([7u8; 40]);
        let (err, seen) = server_reads_raw(&forged).await;
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("authenticate"), "{err}");
        assert!(seen.contains("BadRecordMac"), "{seen}");
        // A record longer than TLS 1.3 allows.
        let (err, seen) = server_reads_raw(&[23, 3, 3, 0x48, 0x01]).await;
        assert!(err.to_string().contains("too long"), "{err}");
        assert!(seen.contains("RecordOverflow"), "{seen}");
        // An unprotected alert after the handshake.
        let (err, seen) = server_reads_raw(&[21, 3, 3, 0, 2, 2, 40]).await;
        assert!(err.to_string().contains("unprotected"), "{err}");
        assert!(seen.contains("UnexpectedMessage"), "{seen}");
    }

    /// A TLS 1.3 connection whose records are ours, and the client's end of them (no
    /// tickets: the client gives up its keys before it would have read them, and its
    /// sequence numbers must match ours).
    async fn records_and_peer() -> (ServerTls, crate::tls_records::Peer) {
        let cfg = server_config_with(|c| c.send_tls13_tickets = 0);
        let (server, client) = pair_with(&[&rustls::version::TLS13], cfg).await;
        assert!(matches!(server.conn, Conn::Records(_)));
        let (_tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().unwrap();
        (server, crate::tls_records::Peer::new(secrets))
    }

    /// The server's TLS 1.3 records (after the handshake).
    fn records_of(server: &mut ServerTls) -> &mut Records {
        let Conn::Records(records) = &mut server.conn else {
            panic!("not a TLS 1.3 connection whose records are ours")
        };
        records
    }

    /// Opens one record with the server's records: its data as text, or what it was.
    fn open_one(
        server: &mut ServerTls,
        mut wire: Vec<u8>,
    ) -> Result<String, crate::tls_records::RecordError> {
        let (opened, used) = records_of(server).open(&mut wire)?.expect("a whole record");
        assert_eq!(used, wire.len());
        Ok(match opened {
            Opened::Data(r) => String::from_utf8_lossy(&wire[r]).into_owned(),
            other => format!("{other:?}"),
        })
    }

    #[tokio::test]
    async fn a_key_update_split_over_records_counts_once_whole() {
        use crate::tls_records::{APPLICATION_DATA, BAD_RECORD_MAC, HANDSHAKE, KEY_UPDATE};
        let (mut server, mut client) = records_and_peer().await;
        let hello = client.record(APPLICATION_DATA, b"a1 NOOP\r\n");
        assert_eq!(open_one(&mut server, hello).unwrap(), "a1 NOOP\r\n");
        // KeyUpdate(update_requested) in three records (RFC 8446 section 5.1 allows it):
        // each piece opens under the client's old key (nothing changed before the message
        // was whole); after the last, the old key opens nothing more.
        let pieces: [&[u8]; 3] = [&[KEY_UPDATE], &[0, 0], &[1, 1]];
        for (i, piece) in pieces.into_iter().enumerate() {
            let r = client.record(HANDSHAKE, piece);
            assert_eq!(open_one(&mut server, r).unwrap(), "Nothing", "piece {i}");
        }
        let stale = client.record(APPLICATION_DATA, b"a2 NOOP\r\n");
        let err = open_one(&mut server, stale).unwrap_err();
        assert_eq!(err.alert, Some(BAD_RECORD_MAC), "{err}");
        // The client asked for ours: it leads our next records, under our current key.
        let (mut server, mut client) = records_and_peer().await;
        let whole = client.record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1]);
        assert_eq!(open_one(&mut server, whole).unwrap(), "Nothing");
        let mut out = Vec::new();
        records_of(&mut server)
            .seal(b"a2 OK\r\n", &mut out)
            .unwrap();
        let (ty, update, used) = client.open(&mut out);
        assert_eq!((ty, update), (HANDSHAKE, vec![KEY_UPDATE, 0, 0, 1, 0]));
        assert!(out.len() > used, "data follows the key update");
    }

    #[tokio::test]
    async fn handshake_records_that_break_the_rules_are_refused() {
        use crate::tls_records::*;
        /// Records (content type, content) the client sends, the alert owed, and a word
        /// of the error.
        type Case = (&'static [(u8, &'static [u8])], u8, &'static str);
        let cases: [Case; 6] = [
            // Data between the pieces of a KeyUpdate.
            (
                &[(HANDSHAKE, &[KEY_UPDATE, 0]), (APPLICATION_DATA, b"x")],
                UNEXPECTED_MESSAGE,
                "interrupted",
            ),
            // More after the KeyUpdate in its last record.
            (
                &[(HANDSHAKE, &[KEY_UPDATE, 0, 0]), (HANDSHAKE, &[1, 0, 22])],
                UNEXPECTED_MESSAGE,
                "after the handshake",
            ),
            // Another handshake message (a client Certificate nobody asked for).
            (
                &[(HANDSHAKE, &[11, 0])],
                UNEXPECTED_MESSAGE,
                "after the handshake",
            ),
            (&[(HANDSHAKE, &[])], UNEXPECTED_MESSAGE, "empty"),
            (
                &[(HANDSHAKE, &[KEY_UPDATE, 0, 0, 2])],
                DECODE_ERROR,
                "length",
            ),
            (
                &[(HANDSHAKE, &[KEY_UPDATE, 0]), (HANDSHAKE, &[0, 1, 2])],
                ILLEGAL_PARAMETER,
                "request",
            ),
        ];
        for (records, alert, what) in cases {
            let (mut server, mut client) = records_and_peer().await;
            let mut last = Ok(String::new());
            for (ty, data) in records {
                last = open_one(&mut server, client.record(*ty, data));
                if last.is_err() {
                    break;
                }
            }
            let err = last.expect_err(what);
            assert_eq!(err.alert, Some(alert), "{what}: {err}");
            assert!(err.what.contains(what), "{what}: {err}");
        }
    }
}

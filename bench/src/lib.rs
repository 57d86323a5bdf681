//! Shared pieces of the cutover benchmark tools (issue 7).
//!
//! * `cutover-fake-imap` (`src/bin/fake_imap.rs`): a small, fast IMAP backend that accepts
//!   any login; it is what every proxy under test relays to.
//! * `cutover-load` (`src/bin/load.rs`): the load generator (modes `login`, `throughput`,
//!   `idle`, `noop`, `storm`) and the `report` and `scale-report` steps that turn a run's
//!   results into `BENCHMARKS.md` and its `## Scale` section (with a gnuplot plot).
//! * `benches/preauth.rs`: criterion micro-benchmarks of the sans-IO pre-auth machines.
//!
//! `bench/compare.sh` runs all of it against the fake backend directly, HAProxy, nginx's
//! mail proxy and cutover, on loopback only.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

pub mod report;

/// Listen backlog for the fake backend: tokio's default of 128 stalls bursts of connects.
pub const BACKLOG: u32 = 4096;

/// A byte stream, plain or TLS, behind one type.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The ring provider, as cutover uses it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| other(format!("{}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| other(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(other(format!("{}: no certificate", path.display())));
    }
    Ok(certs)
}

/// Client TLS for the load generator: trusts only `ca`, TLS 1.3 only, and no session
/// resumption, so every connection pays a full handshake and runs are comparable.
///
/// With `cache_chain` the certificate chain is verified against the CA (webpki) the first
/// time a given chain is seen for a given name, and later connections presenting exactly
/// the same DER bytes reuse that result, as a browser's verification cache would; the
/// handshake signature (`CertificateVerify`, proof that the server holds the key) is still
/// checked on every connection. This keeps the load generator's CPU per handshake low,
/// so that it, not the proxy, is less often the limit on two cores.
pub fn client_config(ca: &Path, cache_chain: bool) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(other)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(other)?;
    let mut cfg = if cache_chain {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(other)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CachingVerifier {
                inner,
                verified: std::sync::Mutex::new(Vec::new()),
            }))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A chain (end entity, intermediates) and the name it was verified for.
type VerifiedChain = (Vec<u8>, Vec<Vec<u8>>, String);

/// webpki verification with a cache of chains already verified (see [`client_config`]).
#[derive(Debug)]
struct CachingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verified: std::sync::Mutex<Vec<VerifiedChain>>,
}

impl rustls::client::danger::ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        let same = |(ee, im, n): &VerifiedChain| {
            ee.as_slice() == end_entity.as_ref()
                && n.as_str() == name.as_ref()
                && im.len() == intermediates.len()
                && im
                    .iter()
                    .zip(intermediates)
                    .all(|(a, b)| a.as_slice() == b.as_ref())
        };
        if let Ok(v) = self.verified.lock() {
            if v.iter().any(same) {
                return Ok(rustls::client::danger::ServerCertVerified::assertion());
            }
        }
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Ok(mut v) = self.verified.lock() {
            if v.len() < 16 {
                v.push((
                    end_entity.to_vec(),
                    intermediates.iter().map(|c| c.to_vec()).collect(),
                    name.into_owned(),
                ));
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server TLS for the fake backend's implicit-TLS listener (rustls defaults, ring).
pub fn server_config(cert: &Path, key: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(cert)?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| other(format!("{}: {e}", key.display())))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(other)?;
    Ok(Arc::new(cfg))
}

/// Binds a listener with a backlog of [`BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

/// A client connection with a read buffer: line reads, literal skips, writes that flush.
pub struct Conn {
    io: Box<dyn Io>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Wraps a stream with a read buffer of `cap` bytes.
    pub fn new(io: Box<dyn Io>, cap: usize) -> Conn {
        Conn {
            io,
            buf: vec![0; cap].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(other("line longer than the read buffer"));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// The next line without its CRLF.
    pub async fn line(&mut self) -> io::Result<&[u8]> {
        let mut scanned = 0;
        loop {
            let avail = &self.buf[self.start + scanned..self.end];
            if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                let s = self.start;
                let e = s + scanned + i;
                self.start = e + 1;
                let line = &self.buf[s..e];
                return Ok(line.strip_suffix(b"\r").unwrap_or(line));
            }
            // `fill` may move the unread bytes to the front; `scanned` is relative to them.
            scanned = self.end - self.start;
            self.fill().await?;
        }
    }

    /// Consumes `n` bytes (a literal's data) without keeping them.
    pub async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let have = (self.end - self.start).min(n);
            self.start += have;
            n -= have;
            if n == 0 {
                return Ok(());
            }
            self.start = 0;
            self.end = 0;
            self.fill().await?;
        }
    }

    /// Writes and flushes (a TLS stream only sends on flush).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// Reads lines until the tagged reply for `tag`; true if it is `OK`. Literals
    /// announced at the end of untagged lines are skipped; their sizes are added to
    /// `literal_bytes`.
    pub async fn tagged(&mut self, tag: &[u8], literal_bytes: &mut u64) -> io::Result<bool> {
        loop {
            let line = self.line().await?;
            if line.len() > tag.len() && line.starts_with(tag) && line[tag.len()] == b' ' {
                let rest = &line[tag.len() + 1..];
                return Ok(rest.len() >= 2 && rest[..2].eq_ignore_ascii_case(b"OK"));
            }
            if let Some(n) = literal_len(line) {
                *literal_bytes += n as u64;
                self.skip(n).await?;
            }
        }
    }

    /// Reads until end of stream (bounded by the caller's timeout).
    pub async fn until_eof(&mut self) -> io::Result<()> {
        loop {
            self.start = 0;
            self.end = 0;
            match self.io.read(&mut self.buf[..]).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a TLS close_notify / TCP FIN.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

/// `{123}` or `{123+}` at the end of a line.
pub fn literal_len(line: &[u8]) -> Option<usize> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Percentile of sorted microsecond samples (nearest rank).
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// A duration as whole microseconds, saturating.
pub fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// Sum of `VmRSS` (KiB) of the given processes.
pub fn rss_kib(pids: &[u32]) -> io::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .ok_or_else(|| other(format!("no VmRSS for pid {pid}")))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| other(format!("bad VmRSS line for pid {pid}")))?;
        total += kib;
    }
    Ok(total)
}

/// CPU time (user + system) this process has used, in clock ticks of /proc (`CLK_TCK`).
pub fn self_cpu_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_markers() {
        assert_eq!(literal_len(b"* 1 FETCH (BODY[] {1048576}"), Some(1048576));
        assert_eq!(literal_len(b"a LOGIN {5+}"), Some(5));
        assert_eq!(literal_len(b"a OK done"), None);
        assert_eq!(literal_len(b"{}"), None);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
    }
}

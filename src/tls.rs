//! TLS, both ways: the server side for clients (certificates chosen by SNI) and the client
//! side for backends (verified against a pool's `ca` or the system roots, failing closed).
//!
//! The crypto provider ([`provider`]) is rustls' ring with aws-lc-rs' key exchanges; every
//! config is built explicitly with it, so no process-wide default has to be installed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::config::{CertFiles, Host, ServerAddr};

/// A TLS setting that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file is missing or holds no certificate.
    #[error("{0}: cannot read certificates: {1}")]
    Certificate(PathBuf, String),
    /// A key file is missing, holds no key, or the key does not fit the certificate.
    #[error("{0}: cannot use private key: {1}")]
    Key(PathBuf, String),
    /// A CA bundle is missing or empty.
    #[error("{0}: cannot read CA certificates: {1}")]
    Ca(PathBuf, String),
    /// The system has no usable root certificates.
    #[error("no system root certificates found")]
    NoSystemRoots,
    /// rustls refused the settings.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider of every TLS config: ring, with aws-lc-rs' key exchanges.
///
/// Measured per TLS 1.3 server handshake with an ECDSA P-256 certificate
/// (`cargo bench -p cutover-bench --bench handshake`; BENCHMARKS.md, R3):
/// ring alone spends 68 µs of its 118 on the X25519 exchange (portable 64-bit code);
/// aws-lc's X25519 is ADX/BMI2 assembly and takes 37, but aws-lc-rs' key schedule and
/// record keys cost more than ring's (95 µs in all) and its AES-GCM keys hold ~250 bytes
/// more per idle session. Taking the key exchanges from aws-lc-rs and the rest from ring
/// gives 87 µs and ring's memory. aws-lc-rs' list also puts the post-quantum
/// X25519MLKEM768 hybrid first for clients that offer it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(base_provider())
}

/// [`provider`], unwrapped.
fn base_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = rustls::crypto::aws_lc_rs::default_provider().kx_groups;
    p
}

/// Session tickets sent after a TLS 1.3 handshake, unless the client asks for more.
pub const TICKETS_PER_HANDSHAKE: usize = 1;

/// The most tickets a client may ask for (RFC 9149 `ticket_request`).
pub const MAX_TICKETS_PER_HANDSHAKE: usize = 4;

/// The process's session-ticket keys: stateless tickets, encrypted under keys that
/// rotate every six hours, shared by every worker and kept across reloads. A client that
/// reconnects resumes on any worker, a handshake takes no shared lock and the proxy keeps
/// no per-session state (rustls' default is a 256-entry cache behind one mutex, which a
/// few hundred logins a second turn over before any client comes back).
fn ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let made = rustls::crypto::ring::Ticketer::new()?;
    Ok(TICKETER.get_or_init(|| made).clone())
}

/// The provider for client connections: the same suites, AES-128-GCM with SHA-256 first.
///
/// The providers list AES-256-GCM with SHA-384 first. Its SHA-384 has no instructions of
/// its own on x86-64 (SHA-NI covers SHA-256 only): hashing the handshake took 7 % of the
/// proxy's CPU per TLS login, and AES-256 takes 14 rounds per block where AES-128 takes
/// 10. AES-128 matches the 128-bit strength of the X25519 and P-256 key exchanges. The
/// server's order decides (`ignore_client_order`); every suite stays available.
fn server_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    };
    let mut p = base_provider();
    let first = [
        TLS13_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    // Stable: the others keep their order.
    p.cipher_suites.sort_by_key(|s| !first.contains(&s.suite()));
    p
}

/// Makes this build's provider the process-wide default (for libraries that build their
/// own TLS configs from it, like redis' client). A default already set stays.
pub fn install_default_provider() {
    let _ = base_provider().install_default();
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Certificate(path.into(), e.to_string()))?
        .collect();
    let certs = certs.map_err(|e| TlsError::Certificate(path.into(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate(
            path.into(),
            "no certificate in file".into(),
        ));
    }
    Ok(certs)
}

fn load_key(
    files: &CertFiles,
    certs: Vec<CertificateDer<'static>>,
) -> Result<CertifiedKey, TlsError> {
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    Ok(ck)
}

/// Serves one of several certificates: the first whose names cover the client's SNI,
/// else the first one (the default).
pub struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SniResolver({} certificates)", self.keys.len())
    }
}

impl SniResolver {
    /// Loads every certificate/key pair; fails on the first that does not load.
    pub fn load(files: &[CertFiles]) -> Result<SniResolver, TlsError> {
        let mut keys = Vec::new();
        for f in files {
            let certs = load_certs(&f.cert)?;
            keys.push(Arc::new(load_key(f, certs)?));
        }
        Ok(SniResolver { keys })
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let first = self.keys.first()?;
        if self.keys.len() == 1 {
            return Some(first.clone());
        }
        let Some(name) = sni.and_then(|s| ServerName::try_from(s.to_string()).ok()) else {
            return Some(first.clone());
        };
        for ck in &self.keys {
            let Some(leaf) = ck.cert.first() else {
                continue;
            };
            if let Ok(ee) = webpki::EndEntityCert::try_from(leaf) {
                if ee.verify_is_valid_for_subject_name(&name).is_ok() {
                    return Some(ck.clone());
                }
            }
        }
        Some(first.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// Builds the server-side configuration for client connections.
pub fn server_config(files: &[CertFiles]) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = SniResolver::load(files)?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(server_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.ignore_client_order = true;
    cfg.ticketer = ticketer()?;
    cfg.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    cfg.max_tls13_tickets = MAX_TICKETS_PER_HANDSHAKE;
    crate::tls_records::enable(&mut cfg);
    Ok(Arc::new(cfg))
}

/// Builds the client-side configuration for one pool protocol: trusts only `ca` when
/// given, else the system roots.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| TlsError::Ca(path.into(), e.to_string()))?;
            for c in certs {
                let c = c.map_err(|e| TlsError::Ca(path.into(), e.to_string()))?;
                roots
                    .add(c)
                    .map_err(|e| TlsError::Ca(path.into(), e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(TlsError::Ca(path.into(), "no certificate in file".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The name a backend's certificate must be valid for: the configured `server_name`, else
/// the server's host (name or IP address).
pub fn backend_name(
    server_name: Option<&str>,
    addr: &ServerAddr,
) -> Result<ServerName<'static>, String> {
    if let Some(n) = server_name {
        return ServerName::try_from(n.to_string()).map_err(|e| format!("{n:?}: {e}"));
    }
    match &addr.host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(n) => ServerName::try_from(n.clone()).map_err(|e| format!("{n:?}: {e}")),
    }
}

/// The negotiated protocol version as a short label (`TLSv1.3`), for logs and metrics.
pub fn version_label(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(_) => "other",
        None => "none",
    }
}

/// A slot for one client TLS handshake on this thread (a worker runs its sessions on
/// one thread). A handshake holds its slot until it finishes; the others wait, so the
/// handshakes runnable on a worker at any moment are at most `per_worker`, and a
/// logged-in session whose socket turns ready waits behind at most that many handshake
/// steps (key exchange and signature, a few hundred microseconds each) instead of every
/// handshake of a login storm. A change of `per_worker` (a reload) takes effect for
/// handshakes that start after it.
pub async fn handshake_slot(per_worker: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
    use std::cell::RefCell;
    use tokio::sync::Semaphore;
    thread_local! {
        static SLOTS: RefCell<Option<(usize, Arc<Semaphore>)>> = const { RefCell::new(None) };
    }
    let per_worker = per_worker.max(1);
    let slots = SLOTS.with(|cell| {
        let mut cell = cell.borrow_mut();
        match &*cell {
            Some((n, s)) if *n == per_worker => s.clone(),
            _ => {
                let s = Arc::new(Semaphore::new(per_worker));
                *cell = Some((per_worker, s.clone()));
                s
            }
        }
    });
    // Never closed: the semaphore lives in this thread's slot.
    slots.acquire_owned().await.ok()
}

/// The not-after time (Unix seconds) of the first certificate in a PEM file, read from
/// its DER encoding (TBSCertificate.validity.notAfter).
pub fn not_after(path: &Path) -> Option<i64> {
    let cert = load_certs(path).ok()?.into_iter().next()?;
    der_not_after(cert.as_ref())
}

/// One DER TLV: (tag, content, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, mut rest) = rest.split_first()?;
    let len = if len0 < 0x80 {
        len0 as usize
    } else {
        let n = (len0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut l = 0usize;
        for &b in &rest[..n] {
            l = (l << 8) | b as usize;
        }
        rest = &rest[n..];
        l
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn der_not_after(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = der_next(der)?; // Certificate SEQUENCE
    let (_, mut tbs, _) = der_next(cert)?; // TBSCertificate SEQUENCE
    let (tag, _, rest) = der_next(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // explicit version
    }
    let (_, _, rest) = der_next(tbs)?; // serialNumber
    let (_, _, rest) = der_next(rest)?; // signature
    let (_, _, rest) = der_next(rest)?; // issuer
    let (_, validity, _) = der_next(rest)?;
    let (_, _, rest) = der_next(validity)?; // notBefore
    let (tag, time, _) = der_next(rest)?; // notAfter
    let t = std::str::from_utf8(time).ok()?;
    let full = match tag {
        0x17 if t.len() == 13 => {
            // UTCTime YYMMDDHHMMSSZ: 50..99 -> 19xx
            let yy: i64 = t[..2].parse().ok()?;
            format!("{}{}", if yy >= 50 { "19" } else { "20" }, t)
        }
        0x18 if t.len() == 15 => t.to_string(),
        _ => return None,
    };
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    crate::config::rfc3339::parse(&rfc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_aes_128_with_sha_256_first_and_every_suite_stays() {
        let p = server_provider();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let mut ours: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        let mut all: Vec<_> = base_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        ours.sort_by_key(|s| u16::from(*s));
        all.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, all);
        // TLS 1.2 clients get AES-128-GCM before AES-256-GCM too.
        let pos = |suite| p.cipher_suites.iter().position(|s| s.suite() == suite);
        assert!(
            pos(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
                < pos(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
        );
    }

    #[test]
    fn reads_certificate_expiry() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/proxy.pem");
        let t = not_after(&path).expect("demo certificate parses");
        // Made in 2026 for 20 years.
        assert!(
            t > crate::config::rfc3339::parse("2045-01-01T00:00:00Z").unwrap(),
            "{t}"
        );
        assert!(
            t < crate::config::rfc3339::parse("2047-01-01T00:00:00Z").unwrap(),
            "{t}"
        );
        assert_eq!(der_not_after(b"\x30\x03\x02\x01"), None);
    }

    use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};
    use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
    use rustls::NamedGroup;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A client's session cache that counts the tickets it is given.
    #[derive(Debug)]
    struct CountingStore {
        inner: ClientSessionMemoryCache,
        tickets: AtomicUsize,
    }

    impl ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
            self.inner.set_kx_hint(name, group)
        }
        fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
            self.inner.kx_hint(name)
        }
        fn set_tls12_session(&self, name: ServerName<'static>, v: Tls12ClientSessionValue) {
            self.inner.set_tls12_session(name, v)
        }
        fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
            self.inner.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &ServerName<'static>) {
            self.inner.remove_tls12_session(name)
        }
        fn insert_tls13_ticket(&self, name: ServerName<'static>, v: Tls13ClientSessionValue) {
            self.tickets.fetch_add(1, Ordering::SeqCst);
            self.inner.insert_tls13_ticket(name, v)
        }
        fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(name)
        }
    }

    /// Runs one in-memory handshake; returns how it went for the client.
    fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> rustls::HandshakeKind {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                break;
            }
        }
        c.handshake_kind().unwrap()
    }

    #[test]
    fn one_ticket_per_handshake_and_it_resumes_after_a_reload() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let files = [CertFiles {
            cert: dir.join("proxy.pem"),
            key: dir.join("proxy-key.pem"),
        }];
        let before = server_config(&files).unwrap();
        // A reload builds a new config: the ticket keys are the process's, not the config's.
        let after = server_config(&files).unwrap();
        let store = Arc::new(CountingStore {
            inner: ClientSessionMemoryCache::new(8),
            tickets: AtomicUsize::new(0),
        });
        let mut client = (*client_config(Some(&dir.join("ca.pem"))).unwrap()).clone();
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);

        assert_eq!(handshake(&before, &client), rustls::HandshakeKind::Full);
        assert_eq!(store.tickets.load(Ordering::SeqCst), TICKETS_PER_HANDSHAKE);
        assert_eq!(handshake(&after, &client), rustls::HandshakeKind::Resumed);
    }
}

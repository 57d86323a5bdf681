//! Micro-benchmark of a TLS 1.3 server handshake: the CPU the proxy's side of one full
//! handshake costs (ECDSA P-256 certificate, X25519 from the client, no resumption, one
//! ticket), with cutover's crypto provider (`cutover::tls::provider`: ring with
//! aws-lc-rs' key exchanges) next to ring alone and aws-lc-rs alone. Only the server's
//! calls are timed; the client (ring, like `cutover-load`) runs in between, untimed.
//!
//! Run: `cargo bench -p cutover-bench --bench handshake` (`-- --quick` for a short run).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use cutover::config::CertFiles;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

fn certs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs")
}

/// A server config as cutover builds one, with another provider.
fn server_with(mut provider: CryptoProvider) -> Arc<ServerConfig> {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    let chain = CertificateDer::pem_file_iter(certs().join("proxy.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(certs().join("proxy-key.pem")).unwrap();
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    cfg.ignore_client_order = true;
    cfg.send_tls13_tickets = 1;
    Arc::new(cfg)
}

fn client() -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// One full handshake; returns the time spent in the server's calls.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Duration {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let started = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut spent = started.elapsed();
    while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let started = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        spent += started.elapsed();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    spent
}

fn bench(c: &mut Criterion) {
    let files = [CertFiles {
        cert: certs().join("proxy.pem"),
        key: certs().join("proxy-key.pem"),
    }];
    let servers = [
        ("cutover", cutover::tls::server_config(&files).unwrap()),
        (
            "ring",
            server_with(rustls::crypto::ring::default_provider()),
        ),
        (
            "aws-lc-rs",
            server_with(rustls::crypto::aws_lc_rs::default_provider()),
        ),
    ];
    let client = client();
    let mut group = c.benchmark_group("tls13_server_handshake");
    for (name, server) in &servers {
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| handshake(server, &client)).sum())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

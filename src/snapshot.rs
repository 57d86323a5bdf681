//! A validated configuration together with what is derived from it (TLS configurations):
//! what a session holds from accept to close. Reloads build a new snapshot and swap it.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::ClientConfig;
use rustls::server::ServerConfig;

use crate::config::{Config, Protocol};
use crate::proto::BackendTls;
use crate::tls::{self, TlsError};

/// A configuration ready to serve.
#[derive(Debug)]
pub struct Snapshot {
    /// The configuration.
    pub config: Config,
    /// Server TLS for clients, when any certificate is configured.
    pub server_tls: Option<Arc<ServerConfig>>,
    /// Client TLS per (pool, protocol) whose servers use TLS.
    pub backend_tls: BTreeMap<(String, Protocol), Arc<ClientConfig>>,
    /// Not-after time (Unix seconds) of each served certificate, by file name.
    pub cert_not_after: Vec<(String, i64)>,
}

impl Snapshot {
    /// Loads certificates, keys and CA bundles: everything that can fail before serving.
    pub fn build(config: Config) -> Result<Snapshot, TlsError> {
        let server_tls = if config.certificates.is_empty() {
            None
        } else {
            Some(tls::server_config(&config.certificates)?)
        };
        let mut backend_tls = BTreeMap::new();
        for (name, pool) in &config.pools {
            for (proto, pp) in &pool.protocols {
                if pp.tls != BackendTls::None {
                    backend_tls.insert(
                        (name.clone(), *proto),
                        tls::client_config(pp.ca.as_deref())?,
                    );
                }
            }
        }
        let cert_not_after = config
            .certificates
            .iter()
            .filter_map(|c| {
                let name = c.cert.file_name()?.to_string_lossy().into_owned();
                Some((name, tls::not_after(&c.cert)?))
            })
            .collect();
        Ok(Snapshot {
            config,
            server_tls,
            backend_tls,
            cert_not_after,
        })
    }
}

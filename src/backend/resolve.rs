//! Name resolution for backend host names: hickory's async resolver (TTL-aware cache,
//! bounded timeouts, never blocks a worker thread). IP literals never reach it.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use crate::config::Host;

/// Resolves backend hosts.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// The system's resolver configuration (/etc/resolv.conf, /etc/hosts), or a default
    /// if it cannot be read, with short timeouts.
    pub fn from_system() -> Resolver {
        let builder = match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read system resolver configuration; using defaults");
                TokioResolver::builder_with_config(
                    ResolverConfig::default(),
                    TokioConnectionProvider::default(),
                )
            }
        };
        let mut builder = builder;
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Always;
        Resolver {
            inner: builder.build(),
        }
    }

    /// All addresses of a host, in the resolver's order.
    pub async fn resolve(&self, host: &Host) -> Result<Vec<IpAddr>, String> {
        match host {
            Host::Ip(ip) => Ok(vec![*ip]),
            Host::Name(name) => {
                let lookup = self
                    .inner
                    .lookup_ip(name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    Err(format!("{name}: no addresses"))
                } else {
                    Ok(ips)
                }
            }
        }
    }
}

//! Name resolution for backend host names: hickory's async resolver (TTL-aware cache,
//! bounded timeouts, never blocks a worker thread). IP literals never reach it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use crate::config::Host;

/// Resolves backend hosts. Remembers the last good answer per name so that a name that
/// stops resolving keeps working on its last addresses until their TTL plus a grace
/// period has passed (a DNS outage must not take the backends with it).
#[derive(Clone)]
pub struct Resolver {
    /// Swapped whole when `dns.servers` changes on reload (every clone sees it).
    inner: Arc<std::sync::RwLock<TokioResolver>>,
    last_good: Arc<Mutex<HashMap<String, LastGood>>>,
}

/// How long a lookup may take before the last good answer is used instead.
const STALE_AFTER: Duration = Duration::from_millis(1500);

/// The last successful answer for a name, and until when its TTL ran.
type LastGood = (Vec<IpAddr>, Instant);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// The system's resolver configuration (/etc/resolv.conf, /etc/hosts), or a default
    /// if it cannot be read, with short timeouts.
    pub fn from_system() -> Resolver {
        Resolver::new(&[])
    }

    /// A resolver asking `servers` (ip:port) when given, else the system's configuration.
    pub fn new(servers: &[std::net::SocketAddr]) -> Resolver {
        Resolver {
            inner: Arc::new(std::sync::RwLock::new(Resolver::build(servers))),
            last_good: Arc::default(),
        }
    }

    /// Asks `servers` from now on (the system's configuration when empty); the last good
    /// answers are kept.
    pub fn set_servers(&self, servers: &[std::net::SocketAddr]) {
        let fresh = Resolver::build(servers);
        match self.inner.write() {
            Ok(mut g) => *g = fresh,
            Err(p) => *p.into_inner() = fresh,
        }
    }

    fn build(servers: &[std::net::SocketAddr]) -> TokioResolver {
        if !servers.is_empty() {
            use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup};
            let mut group = NameServerConfigGroup::new();
            for s in servers {
                group.push(NameServerConfig::new(
                    *s,
                    hickory_resolver::proto::xfer::Protocol::Udp,
                ));
                group.push(NameServerConfig::new(
                    *s,
                    hickory_resolver::proto::xfer::Protocol::Tcp,
                ));
            }
            let config = ResolverConfig::from_parts(None, vec![], group);
            let mut builder =
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
            let opts: &mut ResolverOpts = builder.options_mut();
            opts.timeout = Duration::from_secs(2);
            opts.attempts = 2;
            opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
            return builder.build();
        }
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
        builder.build()
    }

    /// All addresses of a host, in the resolver's order. If the lookup fails, the last
    /// good addresses are used while `now` is within their TTL plus `grace`.
    pub async fn resolve(&self, host: &Host, grace: Duration) -> Result<Vec<IpAddr>, String> {
        let name = match host {
            Host::Ip(ip) => return Ok(vec![*ip]),
            Host::Name(name) => name,
        };
        // With a last good answer at hand, a slow DNS is not waited for long: the stale
        // addresses are served after STALE_AFTER (RFC 8767 suggests 1.8 s), so a DNS outage
        // does not stall every login by the resolver's full timeouts.
        let have_stale = self
            .last_good
            .lock()
            .map(|m| m.contains_key(name))
            .unwrap_or(false);
        let inner = match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let lookup = if have_stale {
            match tokio::time::timeout(STALE_AFTER, inner.lookup_ip(name.as_str())).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("DNS did not answer in time".to_string()),
            }
        } else {
            inner
                .lookup_ip(name.as_str())
                .await
                .map_err(|e| e.to_string())
        };
        match lookup {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if !ips.is_empty() {
                    if let Ok(mut m) = self.last_good.lock() {
                        m.insert(name.clone(), (ips.clone(), lookup.valid_until()));
                    }
                    return Ok(ips);
                }
                self.fallback(name, grace, "no addresses".into())
            }
            Err(e) => self.fallback(name, grace, e),
        }
    }

    fn fallback(&self, name: &str, grace: Duration, error: String) -> Result<Vec<IpAddr>, String> {
        let remembered = self
            .last_good
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned());
        match remembered {
            Some((ips, valid_until)) if Instant::now() <= valid_until + grace => {
                tracing::warn!(host = name, %error, "DNS lookup failed; using the last good addresses");
                Ok(ips)
            }
            _ => Err(format!("{name}: {error}")),
        }
    }

    /// Seeds the last-good table (for tests of the grace logic).
    #[doc(hidden)]
    pub fn remember(&self, name: &str, ips: Vec<IpAddr>, valid_until: Instant) {
        if let Ok(mut m) = self.last_good.lock() {
            m.insert(name.to_string(), (ips, valid_until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_last_addresses_for_the_grace_period() {
        let r = Resolver::from_system();
        let host = Host::Name("no-such-host.invalid".into());
        assert!(r.resolve(&host, Duration::from_secs(60)).await.is_err());
        let ip: IpAddr = "127.0.0.42".parse().unwrap();
        r.remember("no-such-host.invalid", vec![ip], Instant::now());
        assert_eq!(
            r.resolve(&host, Duration::from_secs(60)).await.unwrap(),
            vec![ip]
        );
        r.remember(
            "no-such-host.invalid",
            vec![ip],
            Instant::now() - Duration::from_secs(120),
        );
        assert!(
            r.resolve(&host, Duration::from_secs(60)).await.is_err(),
            "past TTL + grace"
        );
        // IP literals never reach DNS.
        assert_eq!(
            r.resolve(&Host::Ip(ip), Duration::ZERO).await.unwrap(),
            vec![ip]
        );
    }
}

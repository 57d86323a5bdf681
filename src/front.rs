//! The front of a connection from a load balancer: the PROXY protocol header, read
//! without taking a byte past it (what follows, a TLS ClientHello or the client's first
//! command, stays in the socket for the session). The header's meaning is
//! [`crate::proto::proxy`]'s; this is the thin socket side.

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{ProxyMode, ProxyProtocol};
use crate::proto::proxy::{self, Parsed};

/// Where a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The client's address: the PROXY header's when a balancer sent one, else the
    /// connection's own. Limits, throttles, the bridge, logs and backends all use it.
    pub client: SocketAddr,
    /// The balancer that relayed the connection, when it sent a header.
    pub via: Option<Box<Via>>,
}

impl Origin {
    /// A connection straight from the client.
    pub fn direct(client: SocketAddr) -> Origin {
        Origin { client, via: None }
    }
}

/// What a balancer said about the connection it relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// The balancer's own address.
    pub balancer: SocketAddr,
    /// The client spoke TLS to the balancer (v2 `PP2_TYPE_SSL`), and which version.
    pub client_tls: Option<String>,
    /// The host name the client asked the balancer for (v2 `PP2_TYPE_AUTHORITY`).
    pub authority: Option<String>,
}

/// Why a connection was closed at its front (the `reason` of
/// `cutover_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontRefusal {
    /// A listener that requires a header, reached from an untrusted network.
    Untrusted,
    /// No header from a trusted network where one is required.
    Missing,
    /// A malformed, oversized or unusable header.
    Invalid,
    /// The header did not arrive within `proxy_protocol.timeout`.
    Timeout,
}

impl FrontRefusal {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontRefusal::Untrusted => "proxy_untrusted",
            FrontRefusal::Missing => "proxy_missing",
            FrontRefusal::Invalid => "proxy_invalid",
            FrontRefusal::Timeout => "proxy_timeout",
        }
    }
}

/// Finds out where a connection to a listener in `mode` comes from. `conn_peer` is the
/// connection's own address. A header is read only from trusted networks; a listener
/// that requires one closes connections from anywhere else. In `optional` mode a trusted
/// source that sends nothing within the timeout (or something else first) is a direct
/// client.
pub async fn origin(
    tcp: &mut TcpStream,
    conn_peer: SocketAddr,
    mode: ProxyMode,
    settings: &ProxyProtocol,
) -> Result<Origin, FrontRefusal> {
    let trusted = settings.trusts(conn_peer.ip());
    let required = match (mode, trusted) {
        (ProxyMode::Off, _) | (ProxyMode::Optional, false) => return Ok(Origin::direct(conn_peer)),
        (ProxyMode::Required, false) => return Err(FrontRefusal::Untrusted),
        (ProxyMode::Required, true) => true,
        (ProxyMode::Optional, true) => false,
    };
    let header = match tokio::time::timeout(settings.timeout, read_header(tcp)).await {
        Ok(Ok(header)) => header,
        Ok(Err(refusal)) => return Err(refusal),
        Err(_) if required => return Err(FrontRefusal::Timeout),
        Err(_) => None,
    };
    let Some(header) = header else {
        return if required {
            Err(FrontRefusal::Missing)
        } else {
            Ok(Origin::direct(conn_peer))
        };
    };
    Ok(Origin {
        client: header.client.map_or(conn_peer, unmap),
        via: Some(Box::new(Via {
            balancer: conn_peer,
            client_tls: header.client_tls,
            authority: header.authority,
        })),
    })
}

/// Reads a header if the connection starts with one: peeks first, so that a connection
/// that does not leaves its bytes in place, and reads no further than the header's end.
async fn read_header(tcp: &mut TcpStream) -> Result<Option<proxy::Header>, FrontRefusal> {
    let mut peeked = [0u8; 256];
    let n = tcp
        .peek(&mut peeked)
        .await
        .map_err(|_| FrontRefusal::Invalid)?;
    if n == 0 {
        return Err(FrontRefusal::Missing);
    }
    let header = match proxy::parse(&peeked[..n]) {
        Parsed::NotProxy => return Ok(None),
        Parsed::Invalid(why) => {
            tracing::debug!(why, "PROXY header refused");
            return Err(FrontRefusal::Invalid);
        }
        Parsed::Header(h) => h,
        // A header split over segments (or longer than the peek): from here on every
        // byte read belongs to it, so read exactly what the parser asks for.
        Parsed::NeedMore(_) => return read_rest(tcp).await.map(Some),
    };
    let mut skip = vec![0u8; header.len];
    tcp.read_exact(&mut skip)
        .await
        .map_err(|_| FrontRefusal::Invalid)?;
    Ok(Some(header))
}

/// Reads a header known to be one, byte range by byte range as [`proxy::parse`] asks.
async fn read_rest(tcp: &mut TcpStream) -> Result<proxy::Header, FrontRefusal> {
    let mut acc = Vec::with_capacity(64);
    loop {
        match proxy::parse(&acc) {
            Parsed::Header(h) => return Ok(h),
            Parsed::NeedMore(total) if total > acc.len() => {
                let have = acc.len();
                acc.resize(total, 0);
                tcp.read_exact(&mut acc[have..])
                    .await
                    .map_err(|_| FrontRefusal::Invalid)?;
            }
            Parsed::NotProxy | Parsed::Invalid(_) | Parsed::NeedMore(_) => {
                return Err(FrontRefusal::Invalid)
            }
        }
    }
}

/// IPv4-mapped IPv6 client addresses are IPv4 addresses.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn settings(trusted: &str) -> ProxyProtocol {
        ProxyProtocol {
            trusted: vec![trusted.parse().unwrap()],
            timeout: Duration::from_millis(300),
        }
    }

    /// A connected pair: what the test writes arrives at the returned server side.
    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, peer) = l.accept().await.unwrap();
        (client, server, peer)
    }

    #[tokio::test]
    async fn a_header_is_read_to_its_end_and_no_further() {
        for split in [false, true] {
            let (mut c, mut s, peer) = pair().await;
            let header = proxy::v2_header(
                "192.0.2.7:40000".parse().unwrap(),
                "198.51.100.1:993".parse().unwrap(),
            );
            let mut bytes = header.clone();
            bytes.extend_from_slice(b"\x16\x03\x01");
            if split {
                // The header in pieces, the rest after a pause.
                c.write_all(&bytes[..5]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                c.write_all(&bytes[5..]).await.unwrap();
            } else {
                c.write_all(&bytes).await.unwrap();
            }
            let o = origin(&mut s, peer, ProxyMode::Required, &settings("127.0.0.0/8"))
                .await
                .unwrap();
            assert_eq!(o.client, "192.0.2.7:40000".parse().unwrap());
            assert_eq!(o.via.unwrap().balancer, peer);
            let mut rest = [0u8; 3];
            s.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"\x16\x03\x01", "split {split}");
        }
    }

    #[tokio::test]
    async fn v1_split_over_segments() {
        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"PROXY TCP4 192.0.2.9 10.0.0.1 5")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(b"555 143\r\nA1").await.unwrap();
        let o = origin(&mut s, peer, ProxyMode::Optional, &settings("127.0.0.1"))
            .await
            .unwrap();
        assert_eq!(o.client, "192.0.2.9:5555".parse().unwrap());
        let mut rest = [0u8; 2];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"A1");
    }

    #[tokio::test]
    async fn trust_modes_and_refusals() {
        // Untrusted source, header required: closed without reading.
        let (_c, mut s, peer) = pair().await;
        let r = origin(&mut s, peer, ProxyMode::Required, &settings("10.0.0.0/8")).await;
        assert_eq!(r, Err(FrontRefusal::Untrusted));
        // Untrusted source, optional: a direct client at once.
        let (_c, mut s, peer) = pair().await;
        let r = origin(&mut s, peer, ProxyMode::Optional, &settings("10.0.0.0/8")).await;
        assert_eq!(r, Ok(Origin::direct(peer)));
        // Trusted, required, silent: timeout. Optional, silent: a direct client.
        let (_c, mut s, peer) = pair().await;
        let r = origin(&mut s, peer, ProxyMode::Required, &settings("127.0.0.0/8")).await;
        assert_eq!(r, Err(FrontRefusal::Timeout));
        let (_c, mut s, peer) = pair().await;
        let r = origin(&mut s, peer, ProxyMode::Optional, &settings("127.0.0.0/8")).await;
        assert_eq!(r, Ok(Origin::direct(peer)));
        // Trusted, required, something else first: refused; optional: left in place.
        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"a1 CAPABILITY\r\n").await.unwrap();
        let r = origin(&mut s, peer, ProxyMode::Required, &settings("127.0.0.0/8")).await;
        assert_eq!(r, Err(FrontRefusal::Missing));
        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"a1 CAPABILITY\r\n").await.unwrap();
        let r = origin(&mut s, peer, ProxyMode::Optional, &settings("127.0.0.0/8")).await;
        assert_eq!(r, Ok(Origin::direct(peer)));
        let mut first = [0u8; 2];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"a1");
        // A malformed header.
        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"PROXY TCP4 garbage\r\n").await.unwrap();
        let r = origin(&mut s, peer, ProxyMode::Required, &settings("127.0.0.0/8")).await;
        assert_eq!(r, Err(FrontRefusal::Invalid));
        // A LOCAL header (the balancer's health check): the connection's own address.
        let (mut c, mut s, peer) = pair().await;
        c.write_all(&proxy::v2_local()).await.unwrap();
        let o = origin(&mut s, peer, ProxyMode::Required, &settings("127.0.0.0/8"))
            .await
            .unwrap();
        assert_eq!(o.client, peer);
        assert!(o.via.is_some());
    }
}

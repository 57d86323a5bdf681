//! The PROXY protocol (HAProxy's, version 1 text and version 2 binary), sans-IO: what a
//! load balancer puts in front of a connection to say who the client is, and the v2
//! header cutover puts in front of its own connections to backends that accept one
//! (Dovecot's `haproxy = yes`). Parsing is the `ppp` crate's; this module decides what a
//! header means here and bounds it.
//!
//! The driver peeks at the first bytes of a connection and asks [`parse`]: not a header
//! (serve the bytes as the protocol), more bytes needed, a header of exactly `len` bytes
//! (read and drop exactly those, so what follows, a TLS ClientHello for instance, stays
//! in the socket), or an invalid one (close).

use std::net::{IpAddr, SocketAddr};

use ppp::v2;

/// The version 1 signature.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The version 2 signature.
const V2_PREFIX: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, CRLF included (the specification's bound).
pub const MAX_V1: usize = 107;
/// Longest version 2 header accepted: the fixed 16 bytes, addresses and TLVs. Balancers
/// send a few dozen bytes of TLVs; anything near 64 KiB is an attack on memory.
pub const MAX_V2: usize = 16 + 2048;
/// Longest SNI (authority) kept from a header.
const MAX_AUTHORITY: usize = 255;

/// What a header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header occupies at the front of the connection.
    pub len: usize,
    /// The client's address; `None` for a v2 `LOCAL` header (the balancer's own health
    /// check) or an `UNKNOWN` / unspecified one: the connection's own address stands.
    pub client: Option<SocketAddr>,
    /// The address the client connected to (the balancer's), when given.
    pub destination: Option<SocketAddr>,
    /// v2 `PP2_TYPE_SSL`: the client spoke TLS to the balancer, and which version.
    pub client_tls: Option<String>,
    /// v2 `PP2_TYPE_AUTHORITY`: the host name the client asked for (SNI), sanitised.
    pub authority: Option<String>,
}

/// What the front of a connection holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a PROXY header.
    NotProxy,
    /// The start of one: at least this many bytes are needed in all.
    NeedMore(usize),
    /// A complete header.
    Header(Header),
    /// A header that is malformed, too long or unusable: the connection is closed.
    Invalid(&'static str),
}

/// Whether `input` starts (or may start, if it is short) like a PROXY header.
pub fn looks_like_header(input: &[u8]) -> bool {
    let starts = |prefix: &[u8]| {
        let n = input.len().min(prefix.len());
        n > 0 && input[..n] == prefix[..n]
    };
    starts(V1_PREFIX) || starts(V2_PREFIX)
}

/// For a connection that must not carry a header (a listener that accepts them, reached
/// from an untrusted network): `Some(true)` if `input` starts with a header's signature,
/// `Some(false)` if it cannot, `None` while it is a shorter prefix of one.
pub fn screen(input: &[u8]) -> Option<bool> {
    for prefix in [V1_PREFIX, V2_PREFIX] {
        let n = input.len().min(prefix.len());
        if n > 0 && input[..n] == prefix[..n] {
            return (n == prefix.len()).then_some(true);
        }
    }
    Some(false)
}

/// Reads the header at the front of `input`, if there is one.
pub fn parse(input: &[u8]) -> Parsed {
    if input.is_empty() {
        return Parsed::NeedMore(1);
    }
    let n = input.len().min(V2_PREFIX.len());
    if input[..n] == V2_PREFIX[..n] {
        return parse_v2(input);
    }
    let n = input.len().min(V1_PREFIX.len());
    if input[..n] == V1_PREFIX[..n] {
        return parse_v1(input);
    }
    Parsed::NotProxy
}

fn parse_v1(input: &[u8]) -> Parsed {
    let window = &input[..input.len().min(MAX_V1)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= MAX_V1 {
            Parsed::Invalid("PROXY v1 header longer than 107 bytes")
        } else {
            Parsed::NeedMore(input.len() + 1)
        };
    };
    let line = &input[..=lf];
    let Ok(header) = ppp::v1::Header::try_from(line) else {
        return Parsed::Invalid("malformed PROXY v1 header");
    };
    let client = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some((
            SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        )),
        ppp::v1::Addresses::Tcp6(a) => Some((
            SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        )),
        ppp::v1::Addresses::Unknown => None,
    };
    Parsed::Header(Header {
        len: line.len(),
        client: client.map(|c| c.0),
        destination: client.map(|c| c.1),
        client_tls: None,
        authority: None,
    })
}

fn parse_v2(input: &[u8]) -> Parsed {
    if input.len() < 16 {
        return Parsed::NeedMore(16);
    }
    let declared = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let len = 16 + declared;
    if len > MAX_V2 {
        return Parsed::Invalid("PROXY v2 header too long");
    }
    if input.len() < len {
        return Parsed::NeedMore(len);
    }
    let header = match v2::Header::try_from(&input[..len]) {
        Ok(h) => h,
        Err(_) => return Parsed::Invalid("malformed PROXY v2 header"),
    };
    if header.protocol == v2::Protocol::Datagram {
        return Parsed::Invalid("PROXY v2 header for a datagram connection");
    }
    let addresses = match (header.command, header.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
            SocketAddr::new(IpAddr::V4(a.source_address), a.source_port),
            SocketAddr::new(IpAddr::V4(a.destination_address), a.destination_port),
        )),
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
            SocketAddr::new(IpAddr::V6(a.source_address), a.source_port),
            SocketAddr::new(IpAddr::V6(a.destination_address), a.destination_port),
        )),
        // UNIX sockets and unspecified families carry no address usable here.
        (v2::Command::Proxy, _) => None,
    };
    let (client_tls, authority) = tlvs(&header);
    Parsed::Header(Header {
        len,
        client: addresses.map(|a| a.0),
        destination: addresses.map(|a| a.1),
        client_tls,
        authority,
    })
}

/// The TLVs that matter: the client's TLS (`PP2_TYPE_SSL` with its `PP2_SUBTYPE_SSL_VERSION`)
/// and the authority (SNI). Unknown and malformed TLVs are ignored.
fn tlvs(header: &v2::Header<'_>) -> (Option<String>, Option<String>) {
    let mut client_tls = None;
    let mut authority = None;
    for tlv in header.tlvs().map_while(Result::ok) {
        match tlv.kind {
            k if k == v2::Type::Authority as u8 => {
                authority = Some(super::text::sanitize(&tlv.value, MAX_AUTHORITY));
            }
            k if k == v2::Type::SSL as u8 => client_tls = ssl_tlv(&tlv.value),
            _ => {}
        }
    }
    (client_tls, authority.filter(|a| !a.is_empty()))
}

/// `PP2_TYPE_SSL`: a `client` flags byte (bit 0: the client used TLS), a 4-byte `verify`,
/// then sub-TLVs. Returns the TLS version (or `"TLS"`) when the client used TLS.
fn ssl_tlv(value: &[u8]) -> Option<String> {
    let (&client, rest) = value.split_first()?;
    if client & 0x01 == 0 {
        return None;
    }
    let mut subs = rest.get(4..).unwrap_or_default();
    while let [kind, hi, lo, more @ ..] = subs {
        let n = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(body) = more.get(..n) else { break };
        if *kind == v2::Type::SSLVersion as u8 {
            return Some(super::text::sanitize(body, 32));
        }
        subs = &more[n..];
    }
    Some("TLS".into())
}

/// A v2 `PROXY` header telling a backend that `client` connected to `destination`.
pub fn v2_header(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (client, destination) = same_family(client, destination);
    let built = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, destination),
    )
    .build();
    built.unwrap_or_else(|_| v2_local())
}

/// A v2 `LOCAL` header: the proxy's own connection (a health probe), no client address.
pub fn v2_local() -> Vec<u8> {
    let mut out = V2_PREFIX.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

/// A v2 header carries one address family: an IPv4 client reaching an IPv6 backend is
/// written as IPv4-mapped IPv6 (and an IPv4-mapped one back as IPv4).
fn same_family(client: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    };
    let (c, d) = (v4(client), v4(destination));
    if c.is_ipv4() == d.is_ipv4() {
        (c, d)
    } else {
        (v6(c), v6(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn not_a_header() {
        assert_eq!(parse(b"a1 LOGIN joe pw\r\n"), Parsed::NotProxy);
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Parsed::NotProxy); // a ClientHello
        assert_eq!(parse(b"EHLO x\r\n"), Parsed::NotProxy);
        assert!(!looks_like_header(b"a1 LOGIN"));
        assert!(looks_like_header(b"PRO"));
        assert!(looks_like_header(b"\r\n\r\n"));
        assert_eq!(screen(b"a1 LOGIN"), Some(false));
        assert_eq!(screen(b"PR1 LOGIN"), Some(false));
        assert_eq!(screen(b"PROX"), None);
        assert_eq!(screen(b"\r\n\r\n"), None);
        assert_eq!(screen(b"PROXY TCP4"), Some(true));
        assert_eq!(screen(V2_PREFIX), Some(true));
    }

    #[test]
    fn v1_headers() {
        let input = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 993\r\n\x16\x03";
        let Parsed::Header(h) = parse(input) else {
            panic!("{:?}", parse(input))
        };
        assert_eq!(h.len, input.len() - 2, "the ClientHello stays");
        assert_eq!(h.client, Some(addr("192.0.2.7:40000")));
        assert_eq!(h.destination, Some(addr("198.51.100.1:993")));
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        let Parsed::Header(h) = parse(v6) else {
            panic!()
        };
        assert_eq!(h.client, Some(addr("[2001:db8::1]:1")));
        let Parsed::Header(h) = parse(b"PROXY UNKNOWN\r\n") else {
            panic!()
        };
        assert_eq!(h.client, None);
        // Every prefix of a header asks for more; none is taken for something else.
        for cut in 0..input.len() - 2 {
            assert!(
                matches!(parse(&input[..cut]), Parsed::NeedMore(_)),
                "cut {cut}"
            );
        }
        assert!(matches!(
            parse(b"PROXY TCP4 nonsense\r\n"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(&[b"PROXY ".as_slice(), &[b'1'; 200]].concat()),
            Parsed::Invalid(_)
        ));
    }

    #[test]
    fn v2_round_trip_and_local() {
        let h = v2_header(addr("192.0.2.7:40000"), addr("198.51.100.1:143"));
        let mut input = h.clone();
        input.extend_from_slice(b"* OK");
        let Parsed::Header(p) = parse(&input) else {
            panic!("{:?}", parse(&input))
        };
        assert_eq!(p.len, h.len());
        assert_eq!(p.client, Some(addr("192.0.2.7:40000")));
        assert_eq!(p.destination, Some(addr("198.51.100.1:143")));
        for cut in 0..h.len() {
            assert!(matches!(parse(&h[..cut]), Parsed::NeedMore(_)), "cut {cut}");
        }
        let local = v2_local();
        let Parsed::Header(p) = parse(&local) else {
            panic!()
        };
        assert_eq!((p.len, p.client), (16, None));
        // Mixed families become IPv6 on the wire.
        let h = v2_header(addr("192.0.2.7:1"), addr("[2001:db8::2]:143"));
        let Parsed::Header(p) = parse(&h) else {
            panic!()
        };
        assert_eq!(p.client, Some(addr("[::ffff:192.0.2.7]:1")));
    }

    #[test]
    fn v2_tlvs_that_matter_and_bounds() {
        let ssl = [&[0x01u8, 0, 0, 0, 0][..], &[0x21, 0, 7], b"TLSv1.3"].concat();
        let built = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (addr("192.0.2.7:1"), addr("198.51.100.1:993")),
        )
        .write_tlv(v2::Type::Authority, b"imap.example.net\r\n")
        .unwrap()
        .write_tlv(v2::Type::SSL, &ssl)
        .unwrap()
        .write_tlv(0xE0u8, b"ignored")
        .unwrap()
        .build()
        .unwrap();
        let Parsed::Header(p) = parse(&built) else {
            panic!()
        };
        assert_eq!(p.authority.as_deref(), Some("imap.example.net"));
        assert_eq!(p.client_tls.as_deref(), Some("TLSv1.3"));
        // A declared length past the bound is refused before anything is read.
        let mut huge = V2_PREFIX.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Parsed::Invalid(_)));
        // A bad version or command is invalid, not "not a header".
        let mut bad = V2_PREFIX.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0x00, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(parse(&bad), Parsed::Invalid(_)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = crate::fuzzing::Rng(0x5eed_0f09_9909);
        for _ in 0..20_000 {
            let mut input = match rng.below(3) {
                0 => V2_PREFIX.to_vec(),
                1 => V1_PREFIX.to_vec(),
                _ => Vec::new(),
            };
            for _ in 0..rng.below(80) {
                input.push(rng.next_u64() as u8);
            }
            if let Parsed::Header(h) = parse(&input) {
                assert!(h.len <= input.len());
            }
        }
    }
}

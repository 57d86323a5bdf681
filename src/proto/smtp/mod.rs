//! SMTP submission before authentication, sans-IO (RFC 5321, 3207, 4954, 4616, 2034,
//! 3463, 2920).
//!
//! Two machines live here:
//!
//! * [`ServerMachine`] talks to the *client* as a submission server would, from the
//!   greeting to the `235` that ends a successful `AUTH` (then the driver relays bytes);
//! * [`BackendMachine`] talks to one *backend* as a client would: greeting, `EHLO`,
//!   `STARTTLS` when the pool requires it, `XCLIENT` when asked and offered, then the
//!   `AUTH` replay (or nothing for the legacy pop-before-smtp hosts, or `QUIT` for a probe).
//!
//! Neither touches a socket or a clock; both follow the input contract of
//! [`crate::proto`]: they consume from the front of the driver's buffer, never past the
//! end of the first complete command (client side) or of the reply that ends the login
//! (backend side), so pipelined bytes stay with the driver.
//!
//! # Extensions
//! The client is shown the intersection of what the backends support and what a proxy can
//! pass through unchanged ([`ALLOWED_EXTENSIONS`], see [`filter_extensions`] and
//! [`intersect_extensions`]). `AUTH`, `STARTTLS`, `XCLIENT` and the like from a backend
//! are never echoed: they describe the backend's session, not the client's.
//!
//! # Files
//! * `server.rs`: [`ServerMachine`] (client side); its state diagram and the choices made
//!   where the RFCs leave one are in the type's documentation;
//! * `client.rs`: [`BackendMachine`] (backend side), likewise;
//! * `reply.rs`: the bounded multi-line reply parser used by the backend side;
//! * `fuzz.rs`: [`fuzz_server`] and [`fuzz_backend`], invariant-checking fuzz bodies that
//!   a stable test runs on thousands of deterministic inputs.

mod client;
mod fuzz;
mod reply;
mod server;

pub use client::BackendMachine;
pub use fuzz::{fuzz_backend, fuzz_server};
pub use server::ServerMachine;

/// The EHLO keywords a client may be shown: extensions that change nothing about the
/// session the proxy itself runs and that the relay passes through untouched.
pub const ALLOWED_EXTENSIONS: &[&str] = &[
    "SIZE",
    "8BITMIME",
    "PIPELINING",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "DSN",
    "CHUNKING",
    "BINARYMIME",
];

/// Longest EHLO keyword line (keyword and parameters) kept from a backend.
const MAX_EXTENSION_LEN: usize = 256;

/// Splits an EHLO line into its upper-cased keyword and its parameters (single-spaced).
/// `None` for an empty line or one with anything but printable ASCII.
pub(crate) fn normalize_keyword(line: &str) -> Option<(String, String)> {
    let line = line.trim_matches([' ', '\t']);
    if line.is_empty()
        || line.len() > MAX_EXTENSION_LEN
        || !line
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    {
        return None;
    }
    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    let keyword = words.next()?.to_ascii_uppercase();
    let params = words.collect::<Vec<_>>().join(" ");
    Some((keyword, params))
}

fn join_keyword(keyword: &str, params: &str) -> String {
    if params.is_empty() {
        keyword.to_owned()
    } else {
        format!("{keyword} {params}")
    }
}

/// Keeps the EHLO keywords (with their parameters) that are in [`ALLOWED_EXTENSIONS`],
/// normalized: keyword upper-cased, parameters single-spaced, the first occurrence of each
/// keyword only. Anything else (AUTH, STARTTLS, XCLIENT, vendor extensions, lines with
/// control characters or longer than 256 bytes) is dropped.
pub fn filter_extensions(ehlo_keywords: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for line in ehlo_keywords {
        let Some((keyword, params)) = normalize_keyword(line) else {
            continue;
        };
        if !ALLOWED_EXTENSIONS.contains(&keyword.as_str()) || seen.contains(&keyword) {
            continue;
        }
        out.push(join_keyword(&keyword, &params));
        seen.push(keyword);
    }
    out
}

/// What every backend of a pool supports, for a pool whose servers differ: the filtered
/// keywords (see [`filter_extensions`]) present in every list, in the first list's order
/// and with its parameters, except `SIZE`, which gets the smallest fixed limit any backend
/// declares (`SIZE`, `SIZE 0` or an unreadable value mean "no fixed limit", RFC 1870).
/// No lists, no extensions.
pub fn intersect_extensions<L: AsRef<[String]>>(lists: &[L]) -> Vec<String> {
    let filtered: Vec<Vec<(String, String)>> = lists
        .iter()
        .map(|l| {
            filter_extensions(l.as_ref())
                .iter()
                .filter_map(|k| normalize_keyword(k))
                .collect()
        })
        .collect();
    let Some((first, rest)) = filtered.split_first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (keyword, params) in first {
        let others: Option<Vec<&String>> = rest
            .iter()
            .map(|l| l.iter().find(|(k, _)| k == keyword).map(|(_, p)| p))
            .collect();
        let Some(others) = others else {
            continue;
        };
        if keyword == "SIZE" {
            let limit = std::iter::once(params)
                .chain(others)
                .filter_map(|p| p.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .min();
            match limit {
                Some(n) => out.push(format!("SIZE {n}")),
                None => out.push(join_keyword(keyword, params)),
            }
        } else {
            out.push(join_keyword(keyword, params));
        }
    }
    out
}

/// If `text` starts with an enhanced status code (RFC 3463 `class.subject.detail`, then a
/// space or the end), its class digit and the length of the code.
pub(crate) fn enhanced_code(text: &str) -> Option<(u8, usize)> {
    let code = text.split(' ').next()?;
    let mut parts = code.split('.');
    let (Some(class), Some(subject), Some(detail), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !matches!(class, "2" | "4" | "5") || !digits(subject, 3) || !digits(detail, 3) {
        return None;
    }
    Some((class.as_bytes()[0] - b'0', code.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn filter_keeps_the_allow_list_only() {
        let got = filter_extensions(&strings(&[
            "PIPELINING",
            "size   10240000",
            "VRFY",
            "ETRN",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "AUTH=PLAIN LOGIN",
            "XCLIENT ADDR NAME",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
            "binarymime",
            "SIZE 1",
            "DSN\r\nAUTH PLAIN",
            "",
            "  ",
        ]));
        assert_eq!(
            got,
            strings(&[
                "PIPELINING",
                "SIZE 10240000",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING",
                "BINARYMIME",
            ])
        );
        let long = format!("SIZE {}", "9".repeat(300));
        assert!(filter_extensions(&[long]).is_empty());
    }

    #[test]
    fn intersection_takes_common_keywords_and_smallest_size() {
        let a = strings(&["SIZE 20000000", "PIPELINING", "8BITMIME", "DSN", "STARTTLS"]);
        let b = strings(&["PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8"]);
        let c = strings(&["8BITMIME", "SIZE", "PIPELINING", "CHUNKING"]);
        assert_eq!(
            intersect_extensions(&[a.clone(), b.clone(), c]),
            strings(&["SIZE 10240000", "PIPELINING", "8BITMIME"])
        );
        assert_eq!(
            intersect_extensions(&[strings(&["SIZE 0"]), strings(&["SIZE"])]),
            strings(&["SIZE 0"])
        );
        assert_eq!(
            intersect_extensions(std::slice::from_ref(&a)),
            filter_extensions(&a)
        );
        assert!(intersect_extensions::<Vec<String>>(&[]).is_empty());
        assert!(intersect_extensions(&[a, Vec::new()]).is_empty());
    }

    #[test]
    fn text_helpers() {
        assert_eq!(enhanced_code("5.7.8 Error"), Some((5, 5)));
        assert_eq!(enhanced_code("4.7.0"), Some((4, 5)));
        assert_eq!(enhanced_code("5.7.80 x"), Some((5, 6)));
        assert_eq!(enhanced_code("5.7 x"), None);
        assert_eq!(enhanced_code("3.7.8 x"), None);
        assert_eq!(enhanced_code("5.7.8.1 x"), None);
        assert_eq!(enhanced_code("Error 5.7.8"), None);
        assert_eq!(enhanced_code(""), None);
    }
}

//! The one sanitiser for text that comes from a peer and goes into a reply line or a log:
//! backend rejection texts, capability lists, refusal reasons, host names.

/// Makes peer text safe to put on one protocol line (IMAP, POP3 or SMTP) or in a log:
/// printable ASCII only (every other byte, CR, LF and 8-bit bytes included, becomes a
/// space), runs of spaces collapsed to one, trimmed, at most `max` bytes.
pub fn sanitize(raw: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    let mut space = false;
    for &b in raw {
        if b == b' ' || !b.is_ascii_graphic() {
            space = !out.is_empty();
            continue;
        }
        let extra = usize::from(space) + 1;
        if out.len() + extra > max {
            break;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(char::from(b));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_every_protocol() {
        assert_eq!(sanitize(b"  plain text  ", 100), "plain text");
        assert_eq!(sanitize(b"a\r\nA1 OK injected", 100), "a A1 OK injected");
        assert_eq!(sanitize(b"tab\tand\x00nul", 100), "tab and nul");
        assert_eq!(sanitize("caf\u{e9} ok".as_bytes(), 100), "caf ok");
        assert_eq!(sanitize(b"a    b", 100), "a b");
        assert_eq!(sanitize(b"", 100), "");
        assert_eq!(sanitize(b"\r\n", 100), "");
    }

    #[test]
    fn bounded() {
        assert_eq!(sanitize(b"abc def ghi", 7), "abc def");
        assert_eq!(sanitize(b"abc def ghi", 8), "abc def");
        assert_eq!(sanitize(b"abc def ghi", 9), "abc def g");
        assert_eq!(sanitize(b"abc def ghi", 11), "abc def ghi");
        assert_eq!(sanitize(b"abcdef", 3), "abc");
        assert_eq!(sanitize(b"abc def", 0), "");
        for max in 0..40 {
            assert!(sanitize(b"[AUTHENTICATIONFAILED] Authentication failed.", max).len() <= max);
        }
    }
}

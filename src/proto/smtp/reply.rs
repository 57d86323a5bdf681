//! Bounded parsing of SMTP replies (RFC 5321 section 4.2), for the backend side.
//!
//! A reply is one or more lines `ddd-text` ... `ddd text` (or a bare `ddd`), all with the
//! same code. Lines end with LF, an optional CR before it is dropped: backends are trusted
//! not to smuggle, and old ones do send bare LF. Everything is bounded: a line longer than
//! [`MAX_REPLY_LINE`] or a reply longer than [`MAX_REPLY`] is an error, never a wait.

/// Longest reply line accepted, line end included (RFC 5321 asks for 512; real servers
/// send longer EHLO and error lines).
pub(crate) const MAX_REPLY_LINE: usize = 4096;
/// Longest whole reply accepted (a very long EHLO list fits many times over).
pub(crate) const MAX_REPLY: usize = 64 * 1024;

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The three-digit code.
    pub(crate) code: u16,
    /// The text of each line after the code and its separator (lossy UTF-8, CR dropped).
    pub(crate) lines: Vec<String>,
}

impl Reply {
    /// The reply's text on one line: the lines joined by a space.
    pub(crate) fn text(&self) -> String {
        self.lines.join(" ")
    }
}

/// Why the front of the input is not a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyError {
    /// A complete line that is not `ddd`, `ddd text` or `ddd-text`, or a code that
    /// changes inside a multi-line reply.
    Malformed,
    /// A line or the reply is over its bound.
    TooLong,
}

/// Parses the reply at the front of `input`: `Ok(None)` while incomplete, else the reply
/// and the number of bytes it spans (through its last LF).
pub(crate) fn parse_reply(input: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let rest = &input[pos..];
        let window = &rest[..rest.len().min(MAX_REPLY_LINE)];
        let Some(lf) = window.iter().position(|b| *b == b'\n') else {
            if rest.len() >= MAX_REPLY_LINE || input.len() >= MAX_REPLY {
                return Err(ReplyError::TooLong);
            }
            return Ok(None);
        };
        let mut line = &rest[..lf];
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        pos += lf + 1;
        if pos > MAX_REPLY {
            return Err(ReplyError::TooLong);
        }
        let (this_code, last, text) = parse_line(line).ok_or(ReplyError::Malformed)?;
        if *code.get_or_insert(this_code) != this_code {
            return Err(ReplyError::Malformed);
        }
        lines.push(String::from_utf8_lossy(text).into_owned());
        if last {
            return Ok(Some((
                Reply {
                    code: this_code,
                    lines,
                },
                pos,
            )));
        }
    }
}

/// `ddd[ -]text` or `ddd`: the code, whether this is the last line, the text.
fn parse_line(line: &[u8]) -> Option<(u16, bool, &[u8])> {
    let (digits, rest) = line.split_at_checked(3)?;
    if !matches!(digits[0], b'2'..=b'5')
        || !matches!(digits[1], b'0'..=b'5')
        || !digits[2].is_ascii_digit()
    {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match rest.split_first() {
        None => Some((code, true, rest)),
        Some((b' ', text)) => Some((code, true, text)),
        Some((b'-', text)) => Some((code, false, text)),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &[u8]) -> (u16, Vec<String>, usize) {
        let (r, n) = parse_reply(input).unwrap().unwrap();
        (r.code, r.lines, n)
    }

    fn v(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn single_and_multi_line() {
        assert_eq!(ok(b"220 mx ESMTP\r\nrest"), (220, v(&["mx ESMTP"]), 14));
        assert_eq!(ok(b"250\r\n"), (250, v(&[""]), 5));
        assert_eq!(ok(b"250 \n"), (250, v(&[""]), 5));
        assert_eq!(
            ok(b"250-mx\r\n250-SIZE 10\r\n250 8BITMIME\r\n250 next\r\n"),
            (250, v(&["mx", "SIZE 10", "8BITMIME"]), 35)
        );
    }

    #[test]
    fn incomplete_waits() {
        assert_eq!(parse_reply(b""), Ok(None));
        assert_eq!(parse_reply(b"25"), Ok(None));
        assert_eq!(parse_reply(b"250-mx\r\n250 SIZ"), Ok(None));
        assert_eq!(parse_reply(b"250-mx\r\n"), Ok(None));
    }

    #[test]
    fn malformed_and_bounds() {
        for bad in [
            &b"25\r\n"[..],
            b"abc\r\n",
            b"250x\r\n",
            b"650 x\r\n",
            b"160 x\r\n",
            b"2a0 x\r\n",
            b"250-a\r\n251 b\r\n",
            b"\r\n",
        ] {
            assert_eq!(parse_reply(bad), Err(ReplyError::Malformed), "{bad:?}");
        }
        let long = vec![b'2'; MAX_REPLY_LINE];
        assert_eq!(parse_reply(&long), Err(ReplyError::TooLong));
        let mut fits = b"250 ".to_vec();
        fits.resize(MAX_REPLY_LINE - 1, b'x');
        fits.push(b'\n');
        assert!(parse_reply(&fits).unwrap().is_some());
        let mut huge = Vec::new();
        while huge.len() <= MAX_REPLY {
            huge.extend_from_slice(b"250-0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(parse_reply(&huge), Err(ReplyError::TooLong));
        assert_eq!(
            parse_reply(&huge[..MAX_REPLY - 10]),
            Ok(None),
            "just under the bound still waits"
        );
    }
}

//! Line framing, the one way every machine (both sides, all three protocols) finds the end
//! of a line in its peer's input.

/// What [`next_line`] found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// No line end within the limit yet: wait for more bytes.
    Incomplete,
    /// `limit` bytes or more without a line end.
    TooLong,
    /// A complete line.
    Complete {
        /// The line without its terminator (LF, and the CR before it if there is one: a
        /// bare LF is accepted as a terminator, as most servers do).
        content: &'a [u8],
        /// Bytes the line occupies, terminator included: what to consume.
        len: usize,
    },
}

/// Finds the first line of `input`, which may be at most `limit` bytes long (terminator
/// included). Only the first `limit` bytes are ever looked at, so the answer is the same
/// however the input was split into reads. Empty input is always incomplete, and a zero
/// limit (a misconfiguration) is taken as one byte.
pub fn next_line(input: &[u8], limit: usize) -> Line<'_> {
    if input.is_empty() {
        return Line::Incomplete;
    }
    let limit = limit.max(1);
    let window = &input[..input.len().min(limit)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let content = &input[..i];
            Line::Complete {
                content: content.strip_suffix(b"\r").unwrap_or(content),
                len: i + 1,
            }
        }
        None if input.len() >= limit => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// Whether `raw` (a complete line as [`next_line`] delimited it, terminator included) ends
/// in CRLF and holds no other CR or LF: what SMTP requires of a command line.
pub fn is_strict_crlf(raw: &[u8]) -> bool {
    raw.strip_suffix(b"\r\n")
        .is_some_and(|c| !c.contains(&b'\r') && !c.contains(&b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_bounds() {
        assert_eq!(next_line(b"", 10), Line::Incomplete);
        assert_eq!(next_line(b"", 0), Line::Incomplete);
        assert_eq!(next_line(b"abc", 10), Line::Incomplete);
        assert_eq!(
            next_line(b"abc\r\ndef", 10),
            Line::Complete {
                content: b"abc",
                len: 5
            }
        );
        assert_eq!(
            next_line(b"abc\ndef", 10),
            Line::Complete {
                content: b"abc",
                len: 4
            }
        );
        // The limit counts the terminator.
        assert_eq!(
            next_line(b"abc\r\n", 5),
            Line::Complete {
                content: b"abc",
                len: 5
            }
        );
        assert_eq!(next_line(b"abcd\r\n", 5), Line::TooLong);
        assert_eq!(next_line(b"abcde", 5), Line::TooLong);
        assert_eq!(next_line(b"abcd", 5), Line::Incomplete);
        assert_eq!(next_line(b"x", 0), Line::TooLong);
        assert_eq!(
            next_line(b"\n", 0),
            Line::Complete {
                content: b"",
                len: 1
            }
        );
    }

    #[test]
    fn the_answer_does_not_depend_on_what_follows_the_limit() {
        let input = b"0123456789\r\nmore";
        for limit in 1..input.len() + 2 {
            for end in 0..=input.len() {
                let got = next_line(&input[..end], limit);
                // More input may complete a line, never undo a TooLong or a Complete.
                if let Line::TooLong | Line::Complete { .. } = got {
                    assert_eq!(got, next_line(input, limit), "limit {limit}, end {end}");
                }
            }
        }
    }

    #[test]
    fn strict_crlf() {
        assert!(is_strict_crlf(b"EHLO x\r\n"));
        assert!(!is_strict_crlf(b"EHLO x\n"));
        assert!(!is_strict_crlf(b"EH\rLO x\r\n"));
        assert!(!is_strict_crlf(b"\r\r\n"));
    }
}

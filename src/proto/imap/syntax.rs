//! The lexical layer of IMAP shared by both machines (RFC 9051 §4 and §9, RFC 3501 §9,
//! RFC 7888 for `{n+}`): line framing, literal markers, a token reader, tag rules, the
//! encoders the backend side uses, and the sanitizing of response text.
//!
//! Framing and grammar are kept apart, as imap-codec's `Fragmentizer` does: whether a
//! line announces a literal is decided from the end of the line alone
//! ([`split_literal`]), before and whatever the token reader thinks of the rest, so the
//! bytes of a literal are always skipped or stored, never read as a command.

use std::fmt;

/// Longest tag accepted from a client.
pub(crate) const MAX_TAG_LEN: usize = 64;

/// Most tokens in one command (the longest pre-login command, ID, has at most 30 pairs
/// of strings in parentheses: 62 tokens).
pub(crate) const MAX_TOKENS: usize = 80;

/// `ASTRING-CHAR`: any CHAR except atom-specials, but `]` is allowed (RFC 9051 §9).
pub(crate) fn is_astring_char(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
}

/// A byte the token reader takes as part of an atom. Besides `ASTRING-CHAR` this accepts
/// 8-bit bytes, which RFC 3501 does not allow in atoms but which some clients send in a
/// bare password; it costs nothing, since the backend side re-encodes every value.
fn is_atom_byte(b: u8) -> bool {
    is_astring_char(b) || b >= 0x80
}

/// `tag = 1*<any ASTRING-CHAR except "+">`, at most [`MAX_TAG_LEN`] bytes.
pub(crate) fn is_valid_tag(tag: &[u8]) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.iter().all(|&b| is_astring_char(b) && b != b'+')
}

/// A literal announced at the end of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiteralSpec {
    /// Declared length, saturated at `u64::MAX` (anything that large is refused anyway).
    pub(crate) len: u64,
    /// `{n}` (true): the sender waits for a continuation request. `{n+}` (false): the
    /// data follows at once (LITERAL+ / LITERAL-).
    pub(crate) sync: bool,
}

/// Splits a line's content into the text before a trailing literal marker (`{n}` or
/// `{n+}`) and the marker itself. Lengths are parsed with checked arithmetic.
pub(crate) fn split_literal(content: &[u8]) -> (&[u8], Option<LiteralSpec>) {
    let Some(body) = content.strip_suffix(b"}") else {
        return (content, None);
    };
    let (digits_end, sync) = match body.strip_suffix(b"+") {
        Some(b) => (b.len(), false),
        None => (body.len(), true),
    };
    let digits_start = body[..digits_end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    if digits_start == digits_end || digits_start == 0 || body[digits_start - 1] != b'{' {
        return (content, None);
    }
    let len = body[digits_start..digits_end]
        .iter()
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(u64::MAX);
    (
        &content[..digits_start - 1],
        Some(LiteralSpec { len, sync }),
    )
}

/// One lexical item of a client command after the tag.
pub(crate) enum Token {
    /// An atom (also NIL, command names, mechanism names, base64 data).
    Atom(Vec<u8>),
    /// A quoted string, unescaped.
    Quoted(Vec<u8>),
    /// A literal's data.
    Literal(Vec<u8>),
    /// `(`.
    Open,
    /// `)`.
    Close,
}

impl Token {
    /// `string = quoted / literal`.
    pub(crate) fn is_string(&self) -> bool {
        matches!(self, Token::Quoted(_) | Token::Literal(_))
    }
    /// `astring = 1*ASTRING-CHAR / string`.
    pub(crate) fn is_astring(&self) -> bool {
        matches!(self, Token::Atom(_)) || self.is_string()
    }
    /// The atom `NIL`, case-insensitively.
    pub(crate) fn is_nil(&self) -> bool {
        matches!(self, Token::Atom(a) if a.eq_ignore_ascii_case(b"NIL"))
    }
    /// The bytes of an atom or string.
    pub(crate) fn bytes_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Token::Atom(v) | Token::Quoted(v) | Token::Literal(v) => Some(v),
            Token::Open | Token::Close => None,
        }
    }
}

/// Tokens may hold a password: the output shows only kinds and lengths.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Atom(v) => write!(f, "Atom({} bytes)", v.len()),
            Token::Quoted(v) => write!(f, "Quoted({} bytes)", v.len()),
            Token::Literal(v) => write!(f, "Literal({} bytes)", v.len()),
            Token::Open => f.write_str("Open"),
            Token::Close => f.write_str("Close"),
        }
    }
}

/// Reads the tokens of one piece of command text (a line, or the rest of a line after a
/// literal) and appends them to `out`.
///
/// `expect_sep` carries the spacing state from piece to piece: it is true after an atom,
/// a string or `)`, where only a space, `)` or the end may follow. `literal_follows` says
/// the piece is followed by a literal marker, which must come after a space or `(`.
/// Spacing is strict (single spaces, none inside parentheses' edges), as in RFC 9051.
/// At most [`MAX_TOKENS`] tokens are kept in `out`.
pub(crate) fn tokenize(
    text: &[u8],
    expect_sep: &mut bool,
    literal_follows: bool,
    out: &mut Vec<Token>,
) -> Result<(), &'static str> {
    let mut i = 0;
    let mut after_space = false;
    while let Some(&b) = text.get(i) {
        if out.len() >= MAX_TOKENS {
            return Err("Too many arguments");
        }
        if *expect_sep {
            match b {
                b' ' => {
                    *expect_sep = false;
                    after_space = true;
                }
                b')' => out.push(Token::Close),
                _ => return Err("Missing space between arguments"),
            }
            i += 1;
            continue;
        }
        after_space = false;
        match b {
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b')' => {
                out.push(Token::Close);
                *expect_sep = true;
                i += 1;
            }
            b'"' => {
                let (value, used) = quoted(&text[i + 1..])?;
                out.push(Token::Quoted(value));
                *expect_sep = true;
                i += 1 + used;
            }
            b if is_atom_byte(b) => {
                let len = text[i..].iter().take_while(|&&c| is_atom_byte(c)).count();
                out.push(Token::Atom(text[i..i + len].to_vec()));
                *expect_sep = true;
                i += len;
            }
            b' ' => return Err("Unexpected space"),
            _ => return Err("Invalid character"),
        }
    }
    if literal_follows {
        if *expect_sep {
            return Err("A literal must follow a space or a parenthesis");
        }
    } else if after_space {
        return Err("Trailing space");
    }
    Ok(())
}

/// Reads a quoted string whose opening quote is just before `rest`. Returns the unescaped
/// value and the bytes used, closing quote included. Only `\"` and `\\` are escapes; NUL,
/// CR and LF are refused; 8-bit bytes are allowed (RFC 9051 `QUOTED-CHAR` takes UTF-8).
///
/// The string is checked and measured first, then copied into a buffer of exactly its
/// size: memory stays proportional to the input (many short strings on a long line
/// cost no more than the line), and the value, maybe a password, is never reallocated
/// (which would leave an unwiped copy behind).
fn quoted(rest: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
    let mut i = 0;
    let mut len = 0;
    let end = loop {
        match rest.get(i) {
            None => return Err("Unterminated quoted string"),
            Some(b'"') => break i,
            Some(b'\\') => match rest.get(i + 1) {
                Some(b'"' | b'\\') => i += 2,
                _ => return Err("Invalid escape in quoted string"),
            },
            Some(0 | b'\r' | b'\n') => return Err("Invalid character in quoted string"),
            Some(_) => i += 1,
        }
        len += 1;
    };
    let mut out = Vec::with_capacity(len);
    let mut j = 0;
    while j < end {
        if rest[j] == b'\\' {
            j += 1;
        }
        out.push(rest[j]);
        j += 1;
    }
    Ok((out, end + 1))
}

/// Whether `value` can be sent as a quoted string to any IMAP4rev1 server: printable
/// ASCII only (space included).
pub(crate) fn is_quotable(value: &[u8]) -> bool {
    value.iter().all(|b| (0x20..=0x7e).contains(b))
}

/// Appends `value` as a quoted string, escaping `"` and `\`. The caller checks
/// [`is_quotable`] first.
pub(crate) fn push_quoted(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    for &b in value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Splits off the first space-separated word: `(word, rest after the space)`.
pub(crate) fn split_word(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[]),
    }
}

/// A response code at the start of `resp-text`: `[NAME args] rest`.
pub(crate) struct Code<'a> {
    /// The code's name (`AUTHENTICATIONFAILED`, `CAPABILITY`, ...), as sent.
    pub(crate) name: &'a [u8],
    /// What follows the name inside the brackets, without the separating space.
    pub(crate) args: &'a [u8],
}

/// Splits `resp-text` into its response code, if any, and the human-readable rest.
pub(crate) fn split_code(text: &[u8]) -> (Option<Code<'_>>, &[u8]) {
    let Some(inner) = text.strip_prefix(b"[") else {
        return (None, text);
    };
    let Some(close) = inner.iter().position(|&b| b == b']') else {
        return (None, text);
    };
    let (name, args) = split_word(&inner[..close]);
    let rest = &inner[close + 1..];
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    (Some(Code { name, args }), rest)
}

/// Whether a space-separated capability list contains `name` (case-insensitively).
pub(crate) fn has_cap(caps: &str, name: &str) -> bool {
    caps.split(' ').any(|c| c.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &[u8]) -> Result<Vec<String>, &'static str> {
        let mut out = Vec::new();
        let mut sep = false;
        tokenize(text, &mut sep, false, &mut out)?;
        Ok(out
            .iter()
            .map(|t| match t {
                Token::Atom(v) => format!("A:{}", String::from_utf8_lossy(v)),
                Token::Quoted(v) => format!("Q:{}", String::from_utf8_lossy(v)),
                Token::Literal(v) => format!("L:{}", String::from_utf8_lossy(v)),
                Token::Open => "(".into(),
                Token::Close => ")".into(),
            })
            .collect())
    }

    #[test]
    fn tags() {
        assert!(is_valid_tag(b"a1"));
        assert!(is_valid_tag(b"A.b-c]"));
        assert!(!is_valid_tag(b""));
        assert!(!is_valid_tag(b"+"));
        assert!(!is_valid_tag(b"a+b"));
        assert!(!is_valid_tag(b"*"));
        assert!(!is_valid_tag(b"a{1}"));
        assert!(!is_valid_tag("é".as_bytes()));
        assert!(is_valid_tag(&[b'x'; MAX_TAG_LEN]));
        assert!(!is_valid_tag(&[b'x'; MAX_TAG_LEN + 1]));
    }

    #[test]
    fn literal_markers() {
        let spec = |len, sync| Some(LiteralSpec { len, sync });
        assert_eq!(
            split_literal(b"a LOGIN {5}"),
            (&b"a LOGIN "[..], spec(5, true))
        );
        assert_eq!(
            split_literal(b"a LOGIN {5+}"),
            (&b"a LOGIN "[..], spec(5, false))
        );
        assert_eq!(split_literal(b"{0}"), (&b""[..], spec(0, true)));
        assert_eq!(
            split_literal(b"x {99999999999999999999999}"),
            (&b"x "[..], spec(u64::MAX, true))
        );
        assert_eq!(
            split_literal(b"x {4294967295}"),
            (&b"x "[..], spec(4_294_967_295, true))
        );
        for no in [
            &b"a {}"[..],
            b"a {+}",
            b"a 5}",
            b"a {5",
            b"a {5++}",
            b"a {-5}",
            b"}",
        ] {
            assert_eq!(split_literal(no), (no, None), "{no:?}");
        }
    }

    #[test]
    fn tokens() {
        assert_eq!(
            toks(b"LOGIN joe s3cret").unwrap(),
            ["A:LOGIN", "A:joe", "A:s3cret"]
        );
        assert_eq!(
            toks(br#"LOGIN "jo\"e" "a\\b c""#).unwrap(),
            ["A:LOGIN", "Q:jo\"e", r"Q:a\b c"]
        );
        assert_eq!(
            toks(br#"ID ("a" NIL "b" "")"#).unwrap(),
            ["A:ID", "(", "Q:a", "A:NIL", "Q:b", "Q:", ")"]
        );
        assert_eq!(toks(b"ID ()").unwrap(), ["A:ID", "(", ")"]);
        assert_eq!(toks(b"X a]b+=").unwrap(), ["A:X", "A:a]b+="]);
        assert!(toks(b"LOGIN  joe").is_err());
        assert!(toks(b"LOGIN joe ").is_err());
        assert!(toks(b"LOGIN \"joe").is_err());
        assert!(toks(b"LOGIN \"j\\oe\"").is_err());
        assert!(toks(b"LOGIN \"j\ro\"").is_err());
        assert!(toks(b"LOGIN j{o").is_err());
        assert!(toks(b"LOGIN \"a\"b").is_err());
        assert!(toks(b"ID ( \"a\")").is_err());
        let mut out = Vec::new();
        let mut sep = false;
        assert!(tokenize(b"LOGIN ", &mut sep, true, &mut out).is_ok());
        let mut sep = false;
        assert!(tokenize(b"LOGIN", &mut sep, true, &mut out).is_err());
        let mut sep = true;
        assert!(tokenize(b"", &mut sep, true, &mut out).is_err());
        let mut sep = true;
        assert!(tokenize(b" (", &mut sep, true, &mut out).is_ok());
    }

    #[test]
    fn token_memory_is_bounded() {
        // Quoted strings are allocated at their own size, not the rest of the line's.
        let mut line = b"ID (".to_vec();
        for _ in 0..30 {
            line.extend_from_slice(b"\"\" NIL ");
        }
        line.pop();
        line.push(b')');
        let mut out = Vec::new();
        let mut sep = false;
        tokenize(&line, &mut sep, false, &mut out).unwrap();
        assert!(out
            .iter_mut()
            .all(|t| t.bytes_mut().is_none_or(|v| v.capacity() <= 3)));
        // And their number is capped.
        let many = b"x ".repeat(MAX_TOKENS + 1);
        let mut out = Vec::new();
        let mut sep = false;
        assert_eq!(
            tokenize(&many[..many.len() - 1], &mut sep, false, &mut out),
            Err("Too many arguments")
        );
        assert_eq!(out.len(), MAX_TOKENS);
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::Quoted(b"hunter2".to_vec());
        assert_eq!(format!("{t:?}"), "Quoted(7 bytes)");
    }

    #[test]
    fn quoting() {
        let mut out = Vec::new();
        push_quoted(&mut out, br#"a"b\c d"#);
        assert_eq!(out, br#""a\"b\\c d""#);
        assert!(is_quotable(b"a b{5}\"\\"));
        assert!(!is_quotable(b"a\r\n"));
        assert!(!is_quotable("é".as_bytes()));
    }

    #[test]
    fn codes_and_text() {
        let (code, rest) = split_code(b"[AUTHENTICATIONFAILED] Bad password");
        let code = code.unwrap();
        assert_eq!(code.name, b"AUTHENTICATIONFAILED");
        assert_eq!(code.args, b"");
        assert_eq!(rest, b"Bad password");
        let (code, rest) = split_code(b"[CAPABILITY IMAP4rev1 ID] ok");
        assert_eq!(code.unwrap().args, b"IMAP4rev1 ID");
        assert_eq!(rest, b"ok");
        assert!(split_code(b"[OOPS no close").0.is_none());
        assert!(split_code(b"plain").0.is_none());
        assert!(has_cap("IMAP4rev1 auth=plain", "AUTH=PLAIN"));
        assert!(!has_cap("IMAP4rev1 AUTH=PLAINX", "AUTH=PLAIN"));
    }
}

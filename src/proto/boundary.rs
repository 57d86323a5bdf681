//! Where a relayed session stands, from its bytes alone: would a goodbye written to the
//! client now land between two responses (SMTP: and between two commands), or inside one?
//!
//! The relay feeds every byte it moves to a [`Tracker`] (client to backend with
//! [`Tracker::client_sent`], backend to client with [`Tracker::backend_sent`]). When the
//! backend's side ends with the client still there, [`Tracker::standing`] says whether the
//! client can be told: IMAP `* BYE [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`, SMTP
//! `421 4.4.2` ([`Tracker::goodbye`]). Anywhere else the client is closed without a word,
//! as before: a goodbye inside a literal or a multi-line answer would be taken as data.
//!
//! # A scanner, not a parser
//! Most relayed bytes are message contents, so the cost per byte is what matters: lines
//! are found by a word-at-a-time search for LF, IMAP literals (`{n}`, `{n+}`, `~{n}` at a
//! line end) are skipped by their count without looking at them, and of each line only its
//! first [`HEAD`] bytes (the verb, the status, the reply code) and, for IMAP, its last bytes
//! (the literal count) are kept. No allocation; a tracker is a few hundred bytes. Every
//! answer is the same however the stream was split into reads (tested at every split).
//!
//! Per protocol:
//! * **IMAP**: backend to client, lines and literals. A boundary is the start of a line
//!   outside any literal. The client's lines are only read for `COMPRESS` and `STARTTLS`:
//!   after either the stream is no longer plain text, and nothing is ever added to it.
//! * **POP3**: the client's commands are queued by the shape of their answer (`RETR`,
//!   `TOP`, `CAPA`, and `LIST`, `UIDL`, `LANG`, `AUTH` without argument answer with a
//!   multi-line `+OK` ended by a `.` line; the others with one line). A boundary is the
//!   start of a line outside a multi-line answer. An `+OK` to a command the tracker does
//!   not know might be multi-line: from then on the stream cannot be followed.
//! * **SMTP**: a boundary needs both directions between two lines, the backend's last
//!   reply complete (no `250-` continuation pending) and no mail transfer under way: after
//!   a `354` until the final reply, and while the client sends a `BDAT` chunk (skipped by
//!   its count).
//!
//! # What can fool it
//! IMAP: a `{n}` at the end of human-readable text is text in a tagged response, a
//! continuation request and an untagged `OK`/`NO`/`BAD`/`BYE` (`a NO Mailbox doesn't
//! exist: x{99}`, which some servers echo from the client's command); in an untagged data
//! response whose text ends that way (none in the RFCs' grammar) it is taken as a
//! literal, and the stream is followed again from the next line end past the count.
//! Only the client's own session is affected, and only when its backend dies: the worst
//! is a goodbye inside a response, or none. The client's lines are scanned without
//! regard to its literals (a line of an appended message that reads `x COMPRESS` makes
//! the session opaque: no goodbye, the safe side), and a `COMPRESS` whose tag is longer
//! than about 20 characters is not seen. POP3 and SMTP have no literals; their commands
//! and replies are delimited by lines.

/// Most bytes kept from the start of a line: enough for an IMAP tag and verb
/// (`a0001 COMPRESS`) or `BDAT <size> LAST`. The directions that carry the bulk keep
/// only what they look at (a status, a reply code, `* BYE`, a lone `.`).
pub const HEAD: usize = 32;
/// Bytes kept from the end of each IMAP line: a literal marker `{<20 digits>+}` and CR.
const TAIL: usize = 24;
/// Most POP3 commands in flight (sent, not answered) the tracker follows.
const MAX_QUEUED: u8 = 32;

/// The IMAP goodbye when the backend connection is lost.
pub const IMAP_GOODBYE: &[u8] =
    b"* BYE [UNAVAILABLE] Lost the connection to the mail server, please reconnect\r\n";
/// The POP3 goodbye when the backend connection is lost.
pub const POP3_GOODBYE: &[u8] =
    b"-ERR [SYS/TEMP] Lost the connection to the mail server, please reconnect\r\n";
/// The SMTP goodbye when the backend connection is lost.
pub const SMTP_GOODBYE: &[u8] =
    b"421 4.4.2 Lost the connection to the mail server, try again later\r\n";

/// Where the session stands, for a goodbye.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Between two responses (SMTP: and between two commands, no mail transfer under
    /// way): a goodbye lands cleanly.
    Boundary,
    /// At a boundary, and the backend's last words were a goodbye of its own (IMAP
    /// `* BYE`, SMTP `421`, POP3 an `-ERR` nobody asked for): the client has heard one.
    BackendGoodbye,
    /// Inside a response (a partial line, a literal, a multi-line answer, a multi-line
    /// reply) or, SMTP, inside a command line, a DATA or a BDAT chunk.
    Within,
    /// The stream cannot be followed: COMPRESS or STARTTLS after login, an answer of
    /// unknown shape, a literal too large to count, too many POP3 commands in flight.
    Unknown,
}

/// Follows one relayed session's bytes in both directions; see the module documentation.
#[derive(Debug, Clone)]
pub enum Tracker {
    /// IMAP.
    Imap(Imap),
    /// POP3.
    Pop3(Pop3),
    /// SMTP submission.
    Smtp(Smtp),
}

impl Tracker {
    /// A tracker for a fresh IMAP session (after the login's tagged OK).
    pub fn imap() -> Tracker {
        Tracker::Imap(Imap::default())
    }

    /// A tracker for a fresh POP3 session (after the login's `+OK`).
    pub fn pop3() -> Tracker {
        Tracker::Pop3(Pop3::default())
    }

    /// A tracker for a fresh SMTP session (after the `235`, or the bridged EHLO).
    pub fn smtp() -> Tracker {
        Tracker::Smtp(Smtp::default())
    }

    /// Bytes the client sent (toward the backend), in order.
    pub fn client_sent(&mut self, data: &[u8]) {
        match self {
            Tracker::Imap(t) => t.client_sent(data),
            Tracker::Pop3(t) => t.client_sent(data),
            Tracker::Smtp(t) => t.client_sent(data),
        }
    }

    /// Bytes the backend sent (toward the client), in order.
    pub fn backend_sent(&mut self, data: &[u8]) {
        match self {
            Tracker::Imap(t) => t.backend_sent(data),
            Tracker::Pop3(t) => t.backend_sent(data),
            Tracker::Smtp(t) => t.backend_sent(data),
        }
    }

    /// Where the session stands now.
    pub fn standing(&self) -> Standing {
        match self {
            Tracker::Imap(t) => t.standing(),
            Tracker::Pop3(t) => t.standing(),
            Tracker::Smtp(t) => t.standing(),
        }
    }

    /// The protocol's goodbye for a lost backend, if the session stands at a boundary
    /// (and the backend did not say its own).
    pub fn goodbye(&self) -> Option<&'static [u8]> {
        if self.standing() != Standing::Boundary {
            return None;
        }
        Some(match self {
            Tracker::Imap(_) => IMAP_GOODBYE,
            Tracker::Pop3(_) => POP3_GOODBYE,
            Tracker::Smtp(_) => SMTP_GOODBYE,
        })
    }
}

/// The first LF in `data`, eight bytes at a time (the "has a zero byte" bit trick on
/// `word ^ LF...`); the borrow that can mark bytes above the first match does not matter,
/// only the lowest match is used.
fn find_lf(data: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const LFS: u64 = ONES * b'\n' as u64;
    let mut words = data.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        let x = w ^ LFS;
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| at + p)
}

/// What the end of an IMAP line announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// Nothing: the line ends here.
    None,
    /// A literal of this many bytes follows, then the rest of the line.
    Literal(u64),
    /// A count too large to follow (or longer than the tail holds).
    TooLarge,
}

/// The literal marker at the end of `tail` (the last bytes of a line, CR included).
fn literal_at_end(tail: &[u8], full: bool) -> Marker {
    let t = tail.strip_suffix(b"\r").unwrap_or(tail);
    let Some(t) = t.strip_suffix(b"}") else {
        return Marker::None;
    };
    let t = t.strip_suffix(b"+").unwrap_or(t);
    let digits = t.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Marker::None;
    }
    let before = &t[..t.len() - digits];
    if before.last() != Some(&b'{') {
        // Digits up to the start of a full tail: the `{` may be further back.
        return if before.is_empty() && full {
            Marker::TooLarge
        } else {
            Marker::None
        };
    }
    let mut n: u64 = 0;
    for &d in &t[t.len() - digits..] {
        let Some(m) = n
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(d - b'0')))
        else {
            return Marker::TooLarge;
        };
        n = m;
    }
    Marker::Literal(n)
}

/// Splits one direction of a stream into lines (LF-terminated; the CR before it is kept as
/// text), keeping the first `H` bytes of each; with a tail (`T` > 0, IMAP from the
/// backend), also the literals announced at line ends. Sized per direction: a tracker
/// lives as long as its session.
#[derive(Debug, Clone)]
struct Lines<const H: usize, const T: usize> {
    /// A byte of the current line was consumed.
    started: bool,
    /// The current line ended with the last byte consumed.
    ended: bool,
    /// The first bytes of the line's text (literals and LFs left out), up to `head_cap`:
    /// what the protocol looks at (a status needs 4 bytes, a BDAT size more).
    head: [u8; H],
    head_len: u8,
    head_cap: u8,
    /// The head size from the next line on.
    head_next: u8,
    /// Text bytes of the line (literals and LFs left out), saturating.
    text_len: u32,
    /// IMAP: the last text bytes since the line's start or its last literal, from the
    /// reads before the current one (a line found whole in one read is looked at there).
    tail: [u8; T],
    tail_len: u8,
    /// The tail dropped bytes (it holds its last TAIL only).
    tail_full: bool,
    /// IMAP: literal bytes still to come.
    literal: u64,
    /// IMAP: the current line announced a literal already (so it is a data response).
    had_literal: bool,
    /// A literal could not be counted: the stream cannot be followed any more.
    lost: bool,
}

/// The backend's side of an IMAP session: a short head (`* BYE`), literals followed.
type ImapResponses = Lines<8, TAIL>;
/// Commands, in full enough for a tag and verb or `BDAT <size>`.
type Commands = Lines<HEAD, 0>;
/// POP3 and SMTP answers: a status or a reply code, a lone `.`.
type Answers = Lines<8, 0>;

impl<const H: usize, const T: usize> Lines<H, T> {
    /// Follows IMAP literals announced at line ends.
    const LITERALS: bool = T > 0;

    fn new() -> Self {
        Lines {
            started: false,
            ended: false,
            head: [0; H],
            head_len: 0,
            head_cap: H as u8,
            head_next: H as u8,
            text_len: 0,
            tail: [0; T],
            tail_len: 0,
            tail_full: false,
            literal: 0,
            had_literal: false,
            lost: false,
        }
    }

    /// Between two lines (none started, or the last one ended), outside any literal.
    fn at_start(&self) -> bool {
        self.literal == 0 && (self.ended || !self.started)
    }

    /// The first bytes of the line (complete if it fits in the head).
    fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }

    /// Keeps `n` bytes of each line (at most `H`) from the next line on.
    fn keep_head(&mut self, n: usize) {
        self.head_next = n.min(H) as u8;
    }

    /// The head ended before the line did.
    fn cut(&self) -> bool {
        self.text_len > u32::from(self.head_cap)
    }

    /// The line's text without its CR, if it is all in the head.
    fn whole(&self) -> Option<&[u8]> {
        if self.cut() {
            return None;
        }
        let h = self.head();
        Some(h.strip_suffix(b"\r").unwrap_or(h))
    }

    /// The line is a lone `.` (the end of a POP3 multi-line answer or of SMTP DATA).
    fn is_dot(&self) -> bool {
        self.whole() == Some(b".")
    }

    /// Skips `n` bytes that belong to no line (an SMTP BDAT chunk): call at a line start.
    fn skip(data: &[u8], n: &mut u64) -> usize {
        let k = (data.len() as u64).min(*n) as usize;
        *n -= k as u64;
        k
    }

    /// Consumes the front of `data` up to the end of the current line, or all of it.
    /// Returns the bytes consumed and whether a line ended with them (its head stays
    /// readable until the next call).
    fn step(&mut self, data: &[u8]) -> (usize, bool) {
        if self.ended || !self.started {
            self.ended = false;
            self.started = false;
            self.head_cap = self.head_next;
            self.head_len = 0;
            self.text_len = 0;
            self.tail_len = 0;
            self.tail_full = false;
            self.had_literal = false;
        }
        if data.is_empty() {
            return (0, false);
        }
        self.started = true;
        if self.literal > 0 {
            let n = (data.len() as u64).min(self.literal) as usize;
            self.literal -= n as u64;
            return (n, false);
        }
        let Some(p) = find_lf(data) else {
            self.text(data);
            if Self::LITERALS {
                self.push_tail(data);
            }
            return (data.len(), false);
        };
        let seg = &data[..p];
        self.text(seg);
        if Self::LITERALS {
            let marker = if self.tail_len == 0 {
                // The text since the line's start (or its last literal) is all here.
                literal_at_end(&seg[seg.len().saturating_sub(T)..], seg.len() > T)
            } else {
                self.push_tail(seg);
                literal_at_end(&self.tail[..self.tail_len as usize], self.tail_full)
            };
            match marker {
                Marker::None => {}
                _ if !self.may_announce_literal() => {}
                Marker::Literal(n) => {
                    // The line goes on after the literal; a marker is looked for anew.
                    self.literal = n;
                    self.had_literal = true;
                    self.tail_len = 0;
                    self.tail_full = false;
                    return (p + 1, false);
                }
                Marker::TooLarge => self.lost = true,
            }
        }
        self.ended = true;
        (p + 1, true)
    }

    /// IMAP: whether the current line may announce a literal at its end. Only untagged
    /// data responses carry literals (RFC 9051 and 3501, formal syntax): a tagged
    /// response, a continuation request and an untagged status response (`OK`, `NO`,
    /// `BAD`, `BYE`) end in human-readable text, where a `{n}` (`a5 NO Mailbox doesn't
    /// exist: x{99}`, echoed from the client's command) is text. Undecided (the head too
    /// short to show the status word) counts as a data response: the literal is followed.
    fn may_announce_literal(&self) -> bool {
        if self.had_literal {
            return true;
        }
        match self.head() {
            [] => true,
            [b'*', b' ', rest @ ..] => {
                let word = first_word(rest);
                let whole = rest.len() > word.len();
                !(whole
                    && [&b"OK"[..], b"NO", b"BAD", b"BYE"]
                        .iter()
                        .any(|w| word.eq_ignore_ascii_case(w)))
            }
            [b'*', ..] => true,
            // A tag, or `+`: a tagged status response or a continuation request.
            _ => false,
        }
    }

    /// Takes text bytes of the current line (into the head while it has room).
    fn text(&mut self, seg: &[u8]) {
        let (have, cap) = (self.head_len as usize, self.head_cap as usize);
        if have < cap {
            let n = (cap - have).min(seg.len());
            if n <= 8 {
                for (d, s) in self.head[have..have + n].iter_mut().zip(seg) {
                    *d = *s;
                }
            } else {
                self.head[have..have + n].copy_from_slice(&seg[..n]);
            }
            self.head_len = (have + n) as u8;
        }
        self.text_len = self
            .text_len
            .saturating_add(u32::try_from(seg.len()).unwrap_or(u32::MAX));
    }

    fn push_tail(&mut self, seg: &[u8]) {
        let len = self.tail_len as usize;
        if seg.len() >= T {
            self.tail.copy_from_slice(&seg[seg.len() - T..]);
            self.tail_full |= seg.len() > T || len > 0;
            self.tail_len = T as u8;
        } else {
            let keep = (T - seg.len()).min(len);
            self.tail_full |= keep < len;
            self.tail.copy_within(len - keep..len, 0);
            self.tail[keep..keep + seg.len()].copy_from_slice(seg);
            self.tail_len = (keep + seg.len()) as u8;
        }
    }
}

/// The first word of `line` (up to a space or CR).
fn first_word(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\r')
        .unwrap_or(line.len());
    &line[..end]
}

/// The rest of `line` after its first word and the spaces behind it (CR left out).
fn after_first_word(line: &[u8]) -> &[u8] {
    let rest = &line[first_word(line).len()..];
    let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    &rest[start..]
}

/// `word` is `name` (ASCII case-insensitively), or could be when `cut` (the head ended
/// inside the word).
fn word_is(word: &[u8], name: &[u8], cut: bool) -> bool {
    if cut && !word.is_empty() && word.len() < name.len() {
        return name[..word.len()].eq_ignore_ascii_case(word);
    }
    word.eq_ignore_ascii_case(name)
}

/// IMAP: see the module documentation.
#[derive(Debug, Clone)]
pub struct Imap {
    down: ImapResponses,
    up: Commands,
    /// The backend's last response was an untagged BYE.
    bye: bool,
    /// The client asked for COMPRESS or STARTTLS.
    opaque: bool,
}

impl Default for Imap {
    fn default() -> Self {
        Imap {
            down: Lines::new(),
            up: Lines::new(),
            bye: false,
            opaque: false,
        }
    }
}

impl Imap {
    fn client_sent(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.opaque {
            let (n, ended) = self.up.step(data);
            data = &data[n..];
            if ended {
                self.client_line();
            }
        }
    }

    fn client_line(&mut self) {
        // `tag SP verb ...`: the tag is the first word.
        let head = self.up.head();
        let cut = self.up.cut();
        let rest = &head[first_word(head).len()..];
        let Some(rest) = rest.strip_prefix(b" ") else {
            return;
        };
        let verb = first_word(rest);
        let verb_cut = cut && verb.len() == rest.len();
        if word_is(verb, b"COMPRESS", verb_cut) || word_is(verb, b"STARTTLS", verb_cut) {
            self.opaque = true;
        }
    }

    fn backend_sent(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (n, ended) = self.down.step(data);
            data = &data[n..];
            if ended {
                let h = self.down.head();
                self.bye = h.len() >= 5
                    && h.starts_with(b"* ")
                    && first_word(&h[2..]).eq_ignore_ascii_case(b"BYE");
            }
        }
    }

    fn standing(&self) -> Standing {
        if self.opaque || self.down.lost {
            Standing::Unknown
        } else if !self.down.at_start() {
            Standing::Within
        } else if self.bye {
            Standing::BackendGoodbye
        } else {
            Standing::Boundary
        }
    }
}

/// How a POP3 command is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Answer {
    /// One line.
    Single = 1,
    /// `+OK` and lines up to `.` (an `-ERR` is one line).
    Multi = 2,
    /// Not known: an `+OK` to it cannot be followed.
    Unknown = 3,
}

/// POP3 commands sent and not answered yet, oldest first: 2 bits each.
#[derive(Debug, Clone, Copy, Default)]
struct Queue {
    bits: u64,
    len: u8,
}

impl Queue {
    /// False when full.
    fn push(&mut self, a: Answer) -> bool {
        if self.len >= MAX_QUEUED {
            return false;
        }
        self.bits |= u64::from(a as u8) << (2 * u32::from(self.len));
        self.len += 1;
        true
    }

    fn pop(&mut self) -> Option<Answer> {
        if self.len == 0 {
            return None;
        }
        let a = match self.bits & 3 {
            1 => Answer::Single,
            2 => Answer::Multi,
            _ => Answer::Unknown,
        };
        self.bits >>= 2;
        self.len -= 1;
        Some(a)
    }
}

/// POP3: see the module documentation.
#[derive(Debug, Clone)]
pub struct Pop3 {
    down: Answers,
    up: Lines<16, 0>,
    queue: Queue,
    /// Inside a multi-line answer.
    body: bool,
    /// The backend's last line was an `-ERR` no command asked for.
    unsolicited_err: bool,
    /// The client asked for STLS.
    opaque: bool,
    /// An answer could not be followed.
    lost: bool,
}

impl Default for Pop3 {
    fn default() -> Self {
        Pop3 {
            down: Lines::new(),
            up: Lines::new(),
            queue: Queue::default(),
            body: false,
            unsolicited_err: false,
            opaque: false,
            lost: false,
        }
    }
}

/// How the POP3 command `line` is answered; `None` for STLS.
fn pop3_answer(line: &[u8]) -> Option<Answer> {
    let verb = first_word(line);
    let has_arg = !after_first_word(line).is_empty();
    let is = |name: &[u8]| verb.eq_ignore_ascii_case(name);
    Some(if is(b"RETR") || is(b"TOP") || is(b"CAPA") {
        Answer::Multi
    } else if is(b"LIST") || is(b"UIDL") || is(b"LANG") {
        if has_arg {
            Answer::Single
        } else {
            Answer::Multi
        }
    } else if is(b"AUTH") {
        if has_arg {
            Answer::Unknown // a SASL exchange
        } else {
            Answer::Multi
        }
    } else if [
        &b"STAT"[..],
        b"DELE",
        b"NOOP",
        b"RSET",
        b"QUIT",
        b"LAST",
        b"USER",
        b"PASS",
        b"APOP",
        b"UTF8",
    ]
    .iter()
    .any(|n| is(n))
    {
        Answer::Single
    } else if is(b"STLS") {
        return None;
    } else {
        Answer::Unknown
    })
}

impl Pop3 {
    fn client_sent(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.opaque && !self.lost {
            let (n, ended) = self.up.step(data);
            data = &data[n..];
            if !ended {
                continue;
            }
            let head = self.up.head();
            let answer = if self.up.cut() && after_first_word(head).is_empty() {
                // An argument may lie past the head: the shape is not known.
                Some(Answer::Unknown)
            } else {
                pop3_answer(head)
            };
            match answer {
                None => self.opaque = true,
                Some(a) => self.lost |= !self.queue.push(a),
            }
        }
    }

    fn backend_sent(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            let (n, ended) = self.down.step(data);
            data = &data[n..];
            if ended {
                self.backend_line();
            }
        }
    }

    fn backend_line(&mut self) {
        if self.body {
            self.body = !self.down.is_dot();
            return;
        }
        let status = first_word(self.down.head());
        let ok = status == b"+OK";
        let err = status == b"-ERR";
        let asked = self.queue.pop();
        self.unsolicited_err = err && asked.is_none();
        match (ok, err, asked) {
            (true, _, Some(Answer::Multi)) => self.body = true,
            (true, _, Some(Answer::Unknown)) => self.lost = true,
            (true, _, _) | (_, true, _) => {}
            _ => self.lost = true,
        }
    }

    fn standing(&self) -> Standing {
        if self.opaque || self.lost {
            Standing::Unknown
        } else if self.body || !self.down.at_start() {
            Standing::Within
        } else if self.unsolicited_err {
            Standing::BackendGoodbye
        } else {
            Standing::Boundary
        }
    }
}

/// SMTP: see the module documentation.
#[derive(Debug, Clone)]
pub struct Smtp {
    down: Answers,
    up: Commands,
    /// Bytes of a BDAT chunk the client still sends.
    bdat: u64,
    /// The client sends DATA content (after a `354`, up to its `.` line).
    body: bool,
    /// A `354` was the last final reply: the transfer's own final reply is awaited.
    data: bool,
    /// The backend's last reply line was a continuation (`250-`).
    continued: bool,
    /// The backend's last reply was a `421`.
    closing: bool,
    /// The client asked for STARTTLS.
    opaque: bool,
    /// A BDAT size or a reply could not be read.
    lost: bool,
}

impl Default for Smtp {
    fn default() -> Self {
        Smtp {
            down: Lines::new(),
            up: Lines::new(),
            bdat: 0,
            body: false,
            data: false,
            continued: false,
            closing: false,
            opaque: false,
            lost: false,
        }
    }
}

impl Smtp {
    fn client_sent(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.opaque && !self.lost {
            if self.bdat > 0 {
                let n = Commands::skip(data, &mut self.bdat);
                data = &data[n..];
                continue;
            }
            let (n, ended) = self.up.step(data);
            data = &data[n..];
            if ended {
                self.client_line();
            }
        }
    }

    fn client_line(&mut self) {
        if self.body {
            self.body = !self.up.is_dot();
            if !self.body {
                self.up.keep_head(HEAD);
            }
            return;
        }
        let head = self.up.head();
        let verb = first_word(head);
        if verb.eq_ignore_ascii_case(b"BDAT") {
            let size = first_word(after_first_word(head));
            let parsed =
                (!size.is_empty() && size.len() <= 19 && size.iter().all(u8::is_ascii_digit))
                    .then(|| size.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
            match parsed {
                Some(n) => self.bdat = n,
                None => self.lost = true,
            }
        } else if verb.eq_ignore_ascii_case(b"STARTTLS") {
            self.opaque = true;
        }
    }

    fn backend_sent(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            let (n, ended) = self.down.step(data);
            data = &data[n..];
            if ended {
                self.backend_line();
            }
        }
    }

    fn backend_line(&mut self) {
        let h = self.down.head();
        let code = match h {
            [a, b, c, ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            _ => {
                self.lost = true;
                return;
            }
        };
        self.continued = h.get(3) == Some(&b'-');
        if self.continued {
            return;
        }
        if code == 354 {
            self.data = true;
            self.body = true;
            // Content lines are only looked at for a lone `.`.
            self.up.keep_head(4);
        } else {
            self.data = false;
        }
        self.closing = code == 421;
    }

    fn standing(&self) -> Standing {
        if self.opaque || self.lost {
            Standing::Unknown
        } else if self.continued
            || self.data
            || self.body
            || self.bdat > 0
            || !self.down.at_start()
            || !self.up.at_start()
        {
            Standing::Within
        } else if self.closing {
            Standing::BackendGoodbye
        } else {
            Standing::Boundary
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a transcript: who sends what.
    #[derive(Clone, Copy)]
    enum S<'a> {
        C(&'a [u8]),
        B(&'a [u8]),
    }

    fn feed(t: &mut Tracker, steps: &[S<'_>]) {
        for s in steps {
            match s {
                S::C(d) => t.client_sent(d),
                S::B(d) => t.backend_sent(d),
            }
        }
    }

    /// Standing after the whole transcript, fed whole and fed cut at every byte of every
    /// step (and byte by byte): the answers must all agree.
    fn standing(new: fn() -> Tracker, steps: &[S<'_>]) -> Standing {
        let mut whole = new();
        feed(&mut whole, steps);
        let want = whole.standing();
        for (i, s) in steps.iter().enumerate() {
            let (S::C(d) | S::B(d)) = *s;
            for cut in 0..=d.len() {
                let mut t = new();
                feed(&mut t, &steps[..i]);
                let (a, b) = d.split_at(cut);
                let parts = match s {
                    S::C(_) => [S::C(a), S::C(b)],
                    S::B(_) => [S::B(a), S::B(b)],
                };
                feed(&mut t, &parts);
                feed(&mut t, &steps[i + 1..]);
                assert_eq!(t.standing(), want, "step {i} cut at {cut}");
            }
        }
        let mut bytewise = new();
        for s in steps {
            let (S::C(d) | S::B(d)) = *s;
            for b in d.chunks(1) {
                match s {
                    S::C(_) => bytewise.client_sent(b),
                    S::B(_) => bytewise.backend_sent(b),
                }
            }
        }
        assert_eq!(bytewise.standing(), want, "byte by byte");
        want
    }

    use Standing::*;

    #[test]
    fn finds_line_feeds_anywhere_in_a_word() {
        for len in 0..40 {
            for at in 0..len {
                let mut v = vec![b'x'; len];
                v[at] = b'\n';
                if at + 3 < len {
                    v[at + 3] = b'\n';
                }
                assert_eq!(find_lf(&v), Some(at), "len {len} at {at}");
            }
            assert_eq!(find_lf(&vec![b'\r'; len]), None);
        }
        // Bytes next to LF in value (0x0b, 0x09, 0x8a) are not LF.
        assert_eq!(find_lf(&[0x0b, 0x09, 0x8a, 0x0a]), Some(3));
        assert_eq!(find_lf(&[0x8a; 16]), None);
    }

    #[test]
    fn literal_markers() {
        assert_eq!(literal_at_end(b"BODY[] {12}\r", false), Marker::Literal(12));
        assert_eq!(literal_at_end(b"x {0}", false), Marker::Literal(0));
        assert_eq!(literal_at_end(b"x {5+}\r", false), Marker::Literal(5));
        assert_eq!(
            literal_at_end(b"BINARY[1] ~{7}\r", false),
            Marker::Literal(7)
        );
        assert_eq!(literal_at_end(b"x {}\r", false), Marker::None);
        assert_eq!(literal_at_end(b"x 12}\r", false), Marker::None);
        assert_eq!(literal_at_end(b"OK done\r", false), Marker::None);
        assert_eq!(
            literal_at_end(b"{99999999999999999999}\r", false),
            Marker::TooLarge
        );
        assert_eq!(
            literal_at_end(b"99999999999999999999}\r", true),
            Marker::TooLarge
        );
    }

    #[test]
    fn imap_between_responses_and_inside_literals() {
        let login_ok: &[S] = &[S::B(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")];
        assert_eq!(standing(Tracker::imap, login_ok), Boundary);
        let fetch = [
            S::C(b"a2 FETCH 1 (BODY[] FLAGS)\r\n"),
            S::B(b"* 1 FETCH (FLAGS (\\Seen) BODY[] {12}\r\nhello\r\nworld"),
        ];
        assert_eq!(standing(Tracker::imap, &fetch[..1]), Boundary);
        assert_eq!(standing(Tracker::imap, &fetch), Within, "literal in flight");
        let mut done = fetch.to_vec();
        done.push(S::B(b")"));
        assert_eq!(standing(Tracker::imap, &done), Within, "rest of line");
        done.push(S::B(b"\r\na2 OK Fetch completed\r\n"));
        assert_eq!(standing(Tracker::imap, &done), Boundary);
        // Literal contents that look like markers or BYE are skipped by count.
        let tricky = [
            S::B(b"* 2 FETCH (BODY[HEADER] {23}\r\n* BYE {99}\r\nx {3}\r\nab\r\n"),
            S::B(b" BODY[TEXT] {0}\r\n)\r\n"),
            S::B(b"* 3 FETCH (BINARY[1] ~{4}\r\n\0\r\n\n)\r\n"),
        ];
        assert_eq!(standing(Tracker::imap, &tricky), Boundary);
        assert_eq!(standing(Tracker::imap, &tricky[..1]), Within);
        // A long line whose marker may straddle reads, then a long literal.
        let long = [S::B(
            b"* 12 FETCH (UID 12345 FLAGS (\\Seen \\Answered) BODY[HEADER.FIELDS (SUBJECT)] {40}\r\n",
        )];
        assert_eq!(standing(Tracker::imap, &long), Within);
        let body = [long[0], S::B(&[b'x'; 40]), S::B(b")\r\n")];
        assert_eq!(standing(Tracker::imap, &body), Boundary);
        // IDLE: the continuation is a whole response.
        let idle = [
            S::C(b"a3 IDLE\r\n"),
            S::B(b"+ idling\r\n"),
            S::B(b"* 4 EXISTS\r\n"),
        ];
        assert_eq!(standing(Tracker::imap, &idle), Boundary);
        assert_eq!(
            standing(Tracker::imap, &[S::B(b"* 4 EXIS")]),
            Within,
            "partial line"
        );
    }

    #[test]
    fn imap_knows_the_backends_own_bye_and_compress() {
        let bye = [S::B(b"* BYE Disconnected for inactivity.\r\n")];
        assert_eq!(standing(Tracker::imap, &bye), BackendGoodbye);
        let after = [bye[0], S::B(b"* 1 EXISTS\r\n")];
        assert_eq!(standing(Tracker::imap, &after), Boundary);
        for cmd in [
            &b"a9 COMPRESS DEFLATE\r\n"[..],
            b"a9 compress deflate\r\n",
            b"a9 STARTTLS\r\n",
            b"a-very-long-tag-of-22c COMPRESS DEFLATE\r\n",
        ] {
            let s = [S::C(cmd), S::B(b"a9 OK\r\n")];
            assert_eq!(standing(Tracker::imap, &s), Unknown, "{cmd:?}");
        }
        let s = [S::C(b"a9 COMPRESSED\r\n"), S::B(b"a9 BAD\r\n")];
        assert_eq!(standing(Tracker::imap, &s), Boundary);
        // A literal too large to count.
        let s = [S::B(b"* 1 FETCH (BODY[] {999999999999999999999}\r\n")];
        assert_eq!(standing(Tracker::imap, &s), Unknown);
    }

    #[test]
    fn imap_text_that_ends_in_a_count_is_not_a_literal() {
        for line in [
            &b"a5 NO Mailbox doesn't exist: x{99}\r\n"[..],
            b"* NO [ALERT] quota {12}\r\n",
            b"* OK still here {3}\r\n",
            b"* bad command {5}\r\n",
            b"+ go ahead {7}\r\n",
            b"a6 NO x {99999999999999999999}\r\n",
        ] {
            assert_eq!(standing(Tracker::imap, &[S::B(line)]), Boundary, "{line:?}");
        }
        // Data responses still announce them, also after a first literal on the line.
        for line in [
            &b"* 3 FETCH (BODY[] {5}\r\n"[..],
            b"* 3 FETCH (BODY[1] {2}\r\nab BODY[2] {4}\r\n",
            b"* OKAY {5}\r\n",
        ] {
            assert_eq!(standing(Tracker::imap, &[S::B(line)]), Within, "{line:?}");
        }
        // The backend's own goodbye, even with a count at its end.
        let bye = [S::B(b"* BYE closing {4}\r\n")];
        assert_eq!(standing(Tracker::imap, &bye), BackendGoodbye);
    }

    #[test]
    fn pop3_multi_line_answers_follow_the_commands() {
        let stat = [S::C(b"STAT\r\n"), S::B(b"+OK 2 320\r\n")];
        assert_eq!(standing(Tracker::pop3, &stat), Boundary);
        let retr = [
            S::C(b"RETR 1\r\n"),
            S::B(b"+OK 120 octets\r\nSubject: x\r\n\r\n..dot-stuffed\r\n.x\r\n"),
        ];
        assert_eq!(standing(Tracker::pop3, &retr), Within, "mid-RETR");
        let mut done = retr.to_vec();
        done.push(S::B(b".\r\n"));
        assert_eq!(standing(Tracker::pop3, &done), Boundary);
        // Pipelined: LIST (multi), LIST 1 (single), UIDL refused, TOP.
        let piped = [
            S::C(b"LIST\r\nLIST 1\r\nUIDL\r\nTOP 1 0\r\n"),
            S::B(b"+OK 1 messages\r\n1 120\r\n.\r\n+OK 1 120\r\n-ERR no\r\n"),
        ];
        assert_eq!(
            standing(Tracker::pop3, &piped),
            Boundary,
            "TOP not answered"
        );
        let mut top = piped.to_vec();
        top.push(S::B(b"+OK\r\nSubject: x\r\n"));
        assert_eq!(standing(Tracker::pop3, &top), Within);
        top.push(S::B(b".\r\n"));
        assert_eq!(standing(Tracker::pop3, &top), Boundary);
        // CAPA is multi-line; an error to RETR is one line.
        let s = [
            S::C(b"capa\r\nRETR 9\r\n"),
            S::B(b"+OK\r\nTOP\r\nUIDL\r\n.\r\n-ERR no such message\r\n"),
        ];
        assert_eq!(standing(Tracker::pop3, &s), Boundary);
    }

    #[test]
    fn pop3_unknown_answers_and_goodbyes() {
        let s = [S::C(b"XTND XMIT\r\n"), S::B(b"+OK go on\r\n")];
        assert_eq!(standing(Tracker::pop3, &s), Unknown);
        let s = [S::C(b"XTND XMIT\r\n"), S::B(b"-ERR unknown\r\n")];
        assert_eq!(standing(Tracker::pop3, &s), Boundary);
        let s = [S::C(b"STLS\r\n"), S::B(b"+OK Begin TLS\r\n")];
        assert_eq!(standing(Tracker::pop3, &s), Unknown);
        let s = [S::B(b"-ERR Disconnected for inactivity.\r\n")];
        assert_eq!(standing(Tracker::pop3, &s), BackendGoodbye);
        let s = [S::C(b"NOOP\r\n"), S::B(b"-ERR [SYS/TEMP] hiccup\r\n")];
        assert_eq!(
            standing(Tracker::pop3, &s),
            Boundary,
            "an answer, not a goodbye"
        );
        let s = [S::C(b"NOOP\r\n"), S::B(b"* what\r\n")];
        assert_eq!(standing(Tracker::pop3, &s), Unknown);
        let s = [S::C(b"LIST                 1\r\n"), S::B(b"+OK 1 120\r\n")];
        assert_eq!(
            standing(Tracker::pop3, &s),
            Unknown,
            "argument past the head"
        );
        let many = "NOOP\r\n".repeat(33);
        assert_eq!(
            standing(Tracker::pop3, &[S::C(many.as_bytes())]),
            Unknown,
            "too many in flight"
        );
    }

    #[test]
    fn smtp_between_commands_and_inside_a_transfer() {
        let mail = [S::C(b"MAIL FROM:<a@b>\r\n"), S::B(b"250 2.1.0 Ok\r\n")];
        assert_eq!(standing(Tracker::smtp, &mail), Boundary);
        assert_eq!(
            standing(Tracker::smtp, &mail[..1]),
            Boundary,
            "a reply is awaited: a 421 answers it"
        );
        assert_eq!(
            standing(Tracker::smtp, &[S::C(b"RCPT TO:<x")]),
            Within,
            "mid command line"
        );
        let ehlo = [S::C(b"EHLO x\r\n"), S::B(b"250-b\r\n250-PIPELINING\r\n")];
        assert_eq!(standing(Tracker::smtp, &ehlo), Within, "multi-line reply");
        let data = [
            S::C(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
            S::B(b"250 ok\r\n250 ok\r\n354 go ahead\r\n"),
            S::C(b"Subject: x\r\n\r\nBDAT 99\r\nSTARTTLS\r\n..\r\n"),
        ];
        assert_eq!(standing(Tracker::smtp, &data[..2]), Within, "after 354");
        assert_eq!(standing(Tracker::smtp, &data), Within, "mid-DATA");
        let mut end = data.to_vec();
        end.push(S::C(b".\r\n"));
        assert_eq!(standing(Tracker::smtp, &end), Within, "final reply awaited");
        end.push(S::B(b"250 2.0.0 queued\r\n"));
        assert_eq!(standing(Tracker::smtp, &end), Boundary);
        end.push(S::C(b"QUIT\r\n"));
        end.push(S::B(b"221 bye\r\n"));
        assert_eq!(standing(Tracker::smtp, &end), Boundary);
    }

    #[test]
    fn smtp_bdat_chunks_are_skipped_by_count() {
        let bdat = [
            S::C(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 14\r\n"),
            S::B(b"250 ok\r\n250 ok\r\n"),
            S::C(b"DATA\r\nQUIT\r\n"),
        ];
        assert_eq!(
            standing(Tracker::smtp, &bdat),
            Within,
            "2 chunk bytes to go"
        );
        let mut done = bdat.to_vec();
        done.push(S::C(b"ab"));
        assert_eq!(standing(Tracker::smtp, &done), Boundary);
        done.push(S::C(b"BDAT 0 LAST\r\n"));
        done.push(S::B(b"250 ok\r\n250 2.0.0 queued\r\n"));
        assert_eq!(standing(Tracker::smtp, &done), Boundary);
        let s = [S::C(b"BDAT lots\r\n")];
        assert_eq!(standing(Tracker::smtp, &s), Unknown);
        let s = [S::C(b"STARTTLS\r\n"), S::B(b"220 go\r\n")];
        assert_eq!(standing(Tracker::smtp, &s), Unknown);
        let s = [S::B(b"421 4.4.2 timeout\r\n")];
        assert_eq!(standing(Tracker::smtp, &s), BackendGoodbye);
        let s = [S::B(b"hello\r\n")];
        assert_eq!(standing(Tracker::smtp, &s), Unknown);
    }

    #[test]
    fn goodbyes_only_at_a_boundary() {
        let mut t = Tracker::imap();
        assert_eq!(t.goodbye(), Some(IMAP_GOODBYE));
        t.backend_sent(b"* 1 FETCH (BODY[] {3}\r\n");
        assert_eq!(t.goodbye(), None);
        let mut t = Tracker::pop3();
        assert_eq!(t.goodbye(), Some(POP3_GOODBYE));
        let mut t2 = Tracker::smtp();
        assert_eq!(t2.goodbye(), Some(SMTP_GOODBYE));
        t.backend_sent(b"-ERR bye\r\n");
        assert_eq!(t.goodbye(), None);
        t2.backend_sent(b"421 bye\r\n");
        assert_eq!(t2.goodbye(), None);
        for g in [IMAP_GOODBYE, POP3_GOODBYE, SMTP_GOODBYE] {
            assert!(g.ends_with(b"\r\n") && g.len() < 200);
        }
    }

    /// Random transcripts cut at random places: the standing never depends on the cuts.
    #[test]
    fn random_splits_agree() {
        let imap: &[u8] = b"* 1 FETCH (BODY[] {10}\r\n0123456789 UID 7)\r\n* 2 EXISTS\r\na1 OK\r\n* 3 FETCH (X {2}\r\nab Y {1}\r\nc)\r\n+ go\r\n* 4 FETCH (BODY[] {30}\r\n";
        let pop: &[u8] = b"+OK\r\n1 2\r\n.\r\n+OK 3\r\n-ERR x\r\n+OK\r\nbody\r\n..\r\n";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..500 {
            let (data, new, client): (&[u8], fn() -> Tracker, &[u8]) = if round % 2 == 0 {
                (imap, Tracker::imap, b"")
            } else {
                (pop, Tracker::pop3, b"LIST\r\nSTAT\r\nNOOP\r\nRETR 1\r\n")
            };
            let mut whole = new();
            whole.client_sent(client);
            let mut cut = new();
            cut.client_sent(client);
            let end = 1 + next(data.len());
            whole.backend_sent(&data[..end]);
            let mut at = 0;
            while at < end {
                let n = (1 + next(9)).min(end - at);
                cut.backend_sent(&data[at..at + n]);
                at += n;
            }
            assert_eq!(
                cut.standing(),
                whole.standing(),
                "round {round}, {end} bytes"
            );
        }
    }

    /// Garbage made of the bytes the trackers look at, in both directions, cut anywhere:
    /// no panic, and the same standing whole or cut.
    #[test]
    fn garbage_never_panics_and_splits_agree() {
        const ALPHABET: &[u8] = b"{}+~0123456789\r\n\r\n. *-BYEOKRTLISUDA3542 \0\xff";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..3000 {
            let len = next(200);
            let bytes: Vec<u8> = (0..len).map(|_| ALPHABET[next(ALPHABET.len())]).collect();
            let sides: Vec<bool> = (0..len).map(|_| next(4) == 0).collect();
            let new = [Tracker::imap, Tracker::pop3, Tracker::smtp][round % 3];
            let (mut whole, mut cut) = (new(), new());
            // Runs of one side, fed whole to one tracker and cut in two to the other.
            let mut at = 0;
            while at < len {
                let side = sides[at];
                let end = (at..len).find(|&i| sides[i] != side).unwrap_or(len);
                let run = &bytes[at..end];
                let (a, b) = run.split_at(next(run.len() + 1));
                if side {
                    whole.client_sent(run);
                    cut.client_sent(a);
                    cut.client_sent(b);
                } else {
                    whole.backend_sent(run);
                    cut.backend_sent(a);
                    cut.backend_sent(b);
                }
                at = end;
            }
            assert_eq!(whole.standing(), cut.standing(), "round {round}: {bytes:?}");
        }
    }

    #[test]
    fn a_tracker_is_small() {
        // It lives as long as its session (most sessions idle for hours).
        assert!(
            std::mem::size_of::<Tracker>() <= 128,
            "{}",
            std::mem::size_of::<Tracker>()
        );
    }
}

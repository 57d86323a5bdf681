//! SASL for the three protocols: base64, the PLAIN message (RFC 4616), and the one
//! exchange machine ([`Exchange`]) that the IMAP, POP3 and SMTP servers drive, each with
//! its own wording (`+ ` or `334 `, tags, reply codes).
//!
//! # The failure-counting rule
//! An exchange that ends because of what the client sent — invalid base64, a malformed
//! PLAIN message, a foreign authorization identity, an unusable user name — is a failed
//! login attempt ([`Step::Failed`]): it counts towards `max_auth_failures` exactly as a
//! password the backend rejected, on every protocol (RFC 4954 and RFC 3501 practice: a
//! malformed exchange is an authentication failure, so a client cannot probe for free).
//! A cancel (`*`) and a response over the size bound ([`Step::TooBig`]) end the exchange
//! without counting.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::{Credentials, Mechanism, Mechanisms};

/// Why a SASL payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not valid base64.
    #[error("invalid base64")]
    Base64,
    /// Not `authzid NUL authcid NUL passwd`, or a part is empty or not UTF-8.
    #[error("malformed PLAIN message")]
    Malformed,
    /// The authorization identity names someone other than the user: refused, because the
    /// proxy would route by one name and log in as the other.
    #[error("authorization identity differs from authentication identity")]
    ForeignAuthzid,
    /// A user name that is empty, not UTF-8, or holds NUL, CR or LF (SASL LOGIN).
    #[error("invalid user name")]
    InvalidUser,
    /// Not an OAUTHBEARER (RFC 7628) or XOAUTH2 message with a bearer token, or one that
    /// asks for channel binding (which cannot cross a proxy that terminates TLS).
    #[error("malformed OAuth message")]
    MalformedToken,
}

/// What an OAuth SASL message says: the identity it claims (OAUTHBEARER's GS2 `a=`,
/// XOAUTH2's `user=`; None when it names none) and the bearer token.
#[derive(PartialEq, Eq)]
pub struct OAuthMessage<'a> {
    /// The claimed identity.
    pub user: Option<String>,
    /// The bearer token (a b64token: letters, digits, `-._~+/`, then `=`s).
    pub token: &'a [u8],
}

impl std::fmt::Debug for OAuthMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthMessage")
            .field("user", &self.user)
            .field("token", &format_args!("({} bytes)", self.token.len()))
            .finish()
    }
}

/// Parses an OAuth SASL client message of `mechanism`:
///
/// * OAUTHBEARER (RFC 7628 3.1): `gs2-header %x01 *(key=value %x01) %x01`, where the
///   GS2 header is `n,` or `y,` then an optional `a=identity` (with `=2C` for `,` and `=3D`
///   for `=`) then `,`, and one pair is `auth=Bearer <token>`;
/// * XOAUTH2: `user=identity %x01 auth=Bearer <token> %x01 %x01`.
pub fn parse_oauth(mechanism: Mechanism, msg: &[u8]) -> Result<OAuthMessage<'_>, SaslError> {
    let bad = SaslError::MalformedToken;
    let (mut user, pairs) = match mechanism {
        Mechanism::OAuthBearer => {
            let (gs2, rest) = split_once(msg, 0x01).ok_or(bad)?;
            let mut parts = gs2.splitn(3, |b| *b == b',');
            let (Some(flag), Some(authzid), Some(tail)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad);
            };
            // `p=...` asks for channel binding: the TLS the client sees ends here.
            if !(flag == b"n" || flag == b"y") || !tail.is_empty() {
                return Err(bad);
            }
            let user = match authzid {
                [] => None,
                [b'a', b'=', name @ ..] => Some(unescape_saslname(name).ok_or(bad)?),
                _ => return Err(bad),
            };
            (user, rest)
        }
        Mechanism::XOAuth2 => (None, msg),
        _ => return Err(bad),
    };
    // Each pair ends with %x01, and the message with one more.
    let pairs = pairs.strip_suffix(&[0x01]).ok_or(bad)?;
    let pairs = pairs.strip_suffix(&[0x01]).ok_or(bad)?;
    let mut token = None;
    for pair in pairs.split(|b| *b == 0x01) {
        let (key, value) = split_once(pair, b'=').ok_or(bad)?;
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) {
            return Err(bad);
        }
        match key {
            b"auth" => {
                let rest = value
                    .get(..7)
                    .filter(|p| p.eq_ignore_ascii_case(b"Bearer "));
                rest.ok_or(bad)?;
                let t = trim_spaces(&value[7..]);
                if token.is_some() || !is_b64token(t) {
                    return Err(bad);
                }
                token = Some(t);
            }
            b"user" if mechanism == Mechanism::XOAuth2 => {
                user = Some(valid_user(value).ok_or(bad)?);
            }
            _ => {}
        }
    }
    Ok(OAuthMessage {
        user,
        token: token.ok_or(bad)?,
    })
}

/// The message with `identity` as the identity it claims, for a message that claims none
/// (the token's verified identity then goes to the backend too, which may require it:
/// Dovecot does for OAUTHBEARER). `None` if the message already claims one or is not an
/// OAuth message.
pub fn with_identity(mechanism: Mechanism, msg: &[u8], identity: &str) -> Option<Vec<u8>> {
    if parse_oauth(mechanism, msg).ok()?.user.is_some() {
        return None;
    }
    match mechanism {
        Mechanism::OAuthBearer => {
            // `n,,` or `y,,`: the GS2 header with an empty authzid.
            let flag = msg.first().copied()?;
            let rest = msg.strip_prefix(&[flag, b',', b','][..])?;
            let escaped = identity.replace('=', "=3D").replace(',', "=2C");
            let mut out = Vec::with_capacity(msg.len() + escaped.len() + 2);
            out.push(flag);
            out.extend_from_slice(b",a=");
            out.extend_from_slice(escaped.as_bytes());
            out.push(b',');
            out.extend_from_slice(rest);
            Some(out)
        }
        Mechanism::XOAuth2 => {
            let mut out = format!("user={identity}\x01").into_bytes();
            out.extend_from_slice(msg);
            Some(out)
        }
        _ => None,
    }
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|b| *b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| *b != b' ').unwrap_or(s.len());
    &s[start..]
}

/// RFC 6750's b64token: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(t: &[u8]) -> bool {
    let body = t.iter().position(|b| *b == b'=').unwrap_or(t.len());
    body > 0
        && t[..body]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b))
        && t[body..].iter().all(|b| *b == b'=')
}

/// A GS2 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
fn unescape_saslname(name: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        match &name[i..] {
            [b'=', b'2', b'C' | b'c', ..] => {
                out.push(b',');
                i += 3;
            }
            [b'=', b'3', b'D' | b'd', ..] => {
                out.push(b'=');
                i += 3;
            }
            [b'=', ..] | [b',', ..] => return None,
            [b, ..] => {
                out.push(*b);
                i += 1;
            }
            [] => break,
        }
    }
    valid_user(&out)
}

/// Decodes base64 (whitespace is not allowed, as in IMAP/POP3/SMTP SASL exchanges).
pub fn decode_base64(input: &[u8]) -> Result<Vec<u8>, SaslError> {
    STANDARD.decode(input).map_err(|_| SaslError::Base64)
}

/// Encodes base64.
pub fn encode_base64(input: &[u8]) -> String {
    STANDARD.encode(input)
}

/// Decodes one client response: `=` is the empty response (RFC 4959, 5034 and 4954 for
/// initial responses; accepted in continuations too, as some clients send it there).
fn decode_response(response: &[u8]) -> Result<Vec<u8>, SaslError> {
    if response == b"=" {
        Ok(Vec::new())
    } else {
        decode_base64(response)
    }
}

/// Parses a decoded PLAIN message into credentials. An authorization identity is allowed
/// only if it is empty or equal to the authentication identity.
pub fn parse_plain(mut decoded: Vec<u8>) -> Result<Credentials, SaslError> {
    let result = parse_plain_inner(&decoded);
    super::wipe(&mut decoded);
    result
}

fn parse_plain_inner(decoded: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = decoded.splitn(3, |b| *b == 0);
    let (Some(authz), Some(authc), Some(pass)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    if authc.is_empty() || pass.contains(&0) {
        return Err(SaslError::Malformed);
    }
    let user = valid_user(authc).ok_or(SaslError::Malformed)?;
    if !authz.is_empty() && authz != authc {
        return Err(SaslError::ForeignAuthzid);
    }
    Ok(Credentials::password(user, pass.to_vec(), Mechanism::Plain))
}

/// Builds the PLAIN message `NUL user NUL password`, base64 encoded, for a backend.
/// The intermediate buffer is wiped. Returns `None` if the user or password contains NUL
/// (PLAIN cannot carry it) or the credentials hold no password.
pub fn encode_plain(creds: &Credentials) -> Option<String> {
    let pass = creds.secret()?.expose();
    if pass.contains(&0) || creds.user.as_bytes().contains(&0) {
        return None;
    }
    let mut msg = Vec::with_capacity(2 + creds.user.len() + pass.len());
    msg.push(0);
    msg.extend_from_slice(creds.user.as_bytes());
    msg.push(0);
    msg.extend_from_slice(pass);
    let out = encode_base64(&msg);
    super::wipe(&mut msg);
    Some(out)
}

/// A user name is acceptable if it is non-empty UTF-8 without NUL, CR or LF.
pub fn valid_user(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
        return None;
    }
    std::str::from_utf8(raw).ok().map(str::to_owned)
}

/// base64 of `Username:`, the first SASL LOGIN challenge.
pub const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
/// base64 of `Password:`, the second SASL LOGIN challenge.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// What the exchange asks its protocol server to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this challenge (base64, possibly empty) in the protocol's continuation form
    /// (IMAP and POP3 `+ `, SMTP `334 `) and pass the client's next line to
    /// [`Exchange::respond`].
    Challenge(&'static str),
    /// The exchange is complete: log in with these credentials.
    Done(Credentials),
    /// The client cancelled with `*`. Not a failed attempt.
    Cancelled,
    /// The client's data could not be used: a failed login attempt, counted (see the
    /// module documentation).
    Failed(SaslError),
    /// The decoded response is larger than the bound. Not counted: no credentials were
    /// presented.
    TooBig,
}

/// Where an exchange stands.
#[derive(Debug)]
enum Waiting {
    /// PLAIN: the whole message.
    Plain,
    /// LOGIN: the user name.
    LoginUser,
    /// LOGIN: the password of this user.
    LoginPassword(String),
    /// OAUTHBEARER or XOAUTH2: the whole message.
    Token(Mechanism),
}

/// One SASL exchange with a client (PLAIN or LOGIN), from the `AUTHENTICATE`/`AUTH`
/// command to its credentials. Sans-IO and wording-free: the protocol server sends what
/// each [`Step`] asks for in its own words and feeds back the client's lines. The
/// exchange is over after any step other than [`Step::Challenge`]: the server drops it.
#[derive(Debug)]
pub struct Exchange {
    waiting: Waiting,
    /// Largest decoded response accepted (PLAIN, LOGIN).
    max_decoded: usize,
    /// Longest base64 response accepted, as received (OAuth mechanisms).
    max_token: usize,
}

impl Exchange {
    /// A PLAIN or LOGIN exchange for the mechanism named `name` (case-insensitive);
    /// `None` for any other.
    pub fn new(name: &[u8], max_decoded: usize) -> Option<Exchange> {
        Exchange::offered(name, Mechanisms::default(), max_decoded, max_decoded)
    }

    /// An exchange for the mechanism named `name` (case-insensitive) if the listener
    /// offers it; `None` otherwise (the server answers with its "unsupported mechanism"
    /// reply). `max_token` bounds an OAuth response in base64 bytes as received.
    pub fn offered(
        name: &[u8],
        offered: Mechanisms,
        max_decoded: usize,
        max_token: usize,
    ) -> Option<Exchange> {
        let mechanism = Mechanism::from_name(name).filter(|m| offered.has(*m))?;
        let waiting = match mechanism {
            Mechanism::Plain => Waiting::Plain,
            Mechanism::Login => Waiting::LoginUser,
            m => Waiting::Token(m),
        };
        Some(Exchange {
            waiting,
            max_decoded,
            max_token,
        })
    }

    /// The longest client line this exchange may need, terminator included (`fallback`
    /// for PLAIN and LOGIN, whose responses fit the protocol's own bound).
    pub fn max_line(&self, fallback: usize) -> usize {
        match self.waiting {
            Waiting::Token(_) => fallback.max(self.max_token.saturating_add(2)),
            _ => fallback,
        }
    }

    /// Carries a token (OAUTHBEARER, XOAUTH2).
    pub fn is_token(&self) -> bool {
        matches!(self.waiting, Waiting::Token(_))
    }

    /// The first step: the client's initial response if it sent one (a `*` there is not
    /// a cancel, just invalid base64), else the first challenge.
    pub fn begin(&mut self, initial: Option<&[u8]>) -> Step {
        match initial {
            Some(response) => self.answer(response),
            None => Step::Challenge(self.challenge()),
        }
    }

    /// The challenge that asks for what the exchange waits for.
    fn challenge(&self) -> &'static str {
        match self.waiting {
            Waiting::Plain => "",
            Waiting::LoginUser => LOGIN_USER_PROMPT,
            Waiting::LoginPassword(_) => LOGIN_PASSWORD_PROMPT,
            Waiting::Token(_) => "",
        }
    }

    /// The client's next line (without its terminator). After a step other than
    /// [`Step::Challenge`] the exchange is over and must be dropped.
    pub fn respond(&mut self, line: &[u8]) -> Step {
        if line == b"*" {
            return Step::Cancelled;
        }
        self.answer(line)
    }

    fn answer(&mut self, response: &[u8]) -> Step {
        if let Waiting::Token(mechanism) = self.waiting {
            return self.token(mechanism, response);
        }
        let mut data = match decode_response(response) {
            Ok(data) => data,
            Err(e) => return Step::Failed(e),
        };
        if data.len() > self.max_decoded {
            super::wipe(&mut data);
            return Step::TooBig;
        }
        match std::mem::replace(&mut self.waiting, Waiting::Plain) {
            Waiting::Plain => match parse_plain(data) {
                Ok(creds) => Step::Done(creds),
                Err(e) => Step::Failed(e),
            },
            Waiting::LoginUser => match valid_user(&data) {
                Some(user) => {
                    self.waiting = Waiting::LoginPassword(user);
                    Step::Challenge(self.challenge())
                }
                None => Step::Failed(SaslError::InvalidUser),
            },
            // No backend mechanism can carry a NUL in a password.
            Waiting::LoginPassword(_) if data.contains(&0) => {
                super::wipe(&mut data);
                Step::Failed(SaslError::Malformed)
            }
            Waiting::LoginPassword(user) => {
                Step::Done(Credentials::password(user, data, Mechanism::Login))
            }
            Waiting::Token(_) => Step::Failed(SaslError::MalformedToken),
        }
    }

    /// An OAuth response: bounded as received, then decoded and checked (the claimed
    /// identity routes the login; the token is verified later, or by the backend).
    fn token(&mut self, mechanism: Mechanism, response: &[u8]) -> Step {
        if response.len() > self.max_token {
            return Step::TooBig;
        }
        let mut data = match decode_base64(response) {
            Ok(d) => d,
            Err(e) => return Step::Failed(e),
        };
        let user = match parse_oauth(mechanism, &data) {
            Ok(m) => m.user.unwrap_or_default(),
            Err(e) => {
                super::wipe(&mut data);
                return Step::Failed(e);
            }
        };
        Step::Done(Credentials::token(user, data, mechanism))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(step: Step) -> (String, Vec<u8>, &'static str) {
        let Step::Done(c) = step else {
            panic!("expected credentials, got {step:?}")
        };
        let secret = c.secret().map(|s| s.expose().to_vec()).unwrap_or_default();
        (c.user.clone(), secret, c.mechanism())
    }

    #[test]
    fn plain_round_trip() {
        let creds = Credentials::password("joe".into(), b"s3cret".to_vec(), Mechanism::Plain);
        let enc = encode_plain(&creds).unwrap();
        assert_eq!(enc, "AGpvZQBzM2NyZXQ=");
        let back = parse_plain(decode_base64(enc.as_bytes()).unwrap()).unwrap();
        assert_eq!(back.user, "joe");
        assert_eq!(back.secret().unwrap().expose(), b"s3cret");
        assert_eq!(encode_plain(&Credentials::bridged("joe".into())), None);
    }

    #[test]
    fn plain_authzid_rules() {
        assert!(parse_plain(b"joe\0joe\0pw".to_vec()).is_ok());
        assert_eq!(
            parse_plain(b"admin\0joe\0pw".to_vec()).unwrap_err(),
            SaslError::ForeignAuthzid
        );
        assert_eq!(
            parse_plain(b"\0\0pw".to_vec()).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            parse_plain(b"joe\0pw".to_vec()).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(
            parse_plain(b"\0jo\ne\0pw".to_vec()).unwrap_err(),
            SaslError::Malformed
        );
        assert_eq!(decode_base64(b"!!!").unwrap_err(), SaslError::Base64);
    }

    #[test]
    fn debug_hides_secret() {
        let creds = parse_plain(b"\0joe\0hunter2".to_vec()).unwrap();
        assert!(!format!("{creds:?}").contains("hunter2"));
        let step = Exchange::new(b"plain", 100)
            .unwrap()
            .begin(Some(b"AGpvZQBodW50ZXIy"));
        assert!(!format!("{step:?}").contains("hunter2"));
    }

    #[test]
    fn plain_with_and_without_initial_response() {
        let mut ex = Exchange::new(b"PLAIN", 100).unwrap();
        let step = ex.begin(Some(b"AGpvZQBzM2NyZXQ="));
        assert_eq!(creds(step), ("joe".into(), b"s3cret".to_vec(), "plain"));
        let mut ex = Exchange::new(b"plain", 100).unwrap();
        assert_eq!(ex.begin(None), Step::Challenge(""));
        assert_eq!(
            creds(ex.respond(b"AGpvZQBzM2NyZXQ=")),
            ("joe".into(), b"s3cret".to_vec(), "plain")
        );
    }

    #[test]
    fn login_prompts_user_then_password() {
        let mut ex = Exchange::new(b"LOGIN", 100).unwrap();
        assert_eq!(ex.begin(None), Step::Challenge(LOGIN_USER_PROMPT));
        assert_eq!(ex.respond(b"am9l"), Step::Challenge(LOGIN_PASSWORD_PROMPT));
        assert_eq!(
            creds(ex.respond(b"czNjcmV0")),
            ("joe".into(), b"s3cret".to_vec(), "login")
        );
        // With the user name as initial response the first challenge is the password.
        let mut ex = Exchange::new(b"login", 100).unwrap();
        assert_eq!(
            ex.begin(Some(b"am9l")),
            Step::Challenge(LOGIN_PASSWORD_PROMPT)
        );
        // `=` is an empty password.
        assert_eq!(creds(ex.respond(b"=")), ("joe".into(), Vec::new(), "login"));
    }

    #[test]
    fn one_failure_rule() {
        let fail = |name: &[u8], ir: Option<&[u8]>, line: Option<&[u8]>| {
            let mut ex = Exchange::new(name, 16).unwrap();
            let step = ex.begin(ir);
            match (step, line) {
                (Step::Challenge(_), Some(line)) => ex.respond(line),
                (step, _) => step,
            }
        };
        // Counted: what the client sent cannot be used.
        assert_eq!(
            fail(b"PLAIN", Some(b"!!!"), None),
            Step::Failed(SaslError::Base64)
        );
        assert_eq!(
            fail(b"PLAIN", None, Some(b"!!!")),
            Step::Failed(SaslError::Base64)
        );
        assert_eq!(
            fail(b"PLAIN", Some(b"="), None),
            Step::Failed(SaslError::Malformed)
        );
        assert_eq!(
            fail(b"PLAIN", Some(b"YQBqb2UAcHc="), None),
            Step::Failed(SaslError::ForeignAuthzid)
        );
        assert_eq!(
            fail(b"LOGIN", None, Some(b"=")),
            Step::Failed(SaslError::InvalidUser)
        );
        assert_eq!(
            fail(b"LOGIN", None, Some(b"am8KZQ==")),
            Step::Failed(SaslError::InvalidUser)
        );
        let mut ex = Exchange::new(b"LOGIN", 16).unwrap();
        ex.begin(Some(b"am9l"));
        assert_eq!(ex.respond(b"cABx"), Step::Failed(SaslError::Malformed));
        // Not counted: a cancel, and data over the bound.
        assert_eq!(fail(b"PLAIN", None, Some(b"*")), Step::Cancelled);
        assert_eq!(fail(b"LOGIN", None, Some(b"*")), Step::Cancelled);
        let big = encode_base64(&[b'x'; 17]);
        assert_eq!(fail(b"PLAIN", None, Some(big.as_bytes())), Step::TooBig);
        // `*` as an initial response is just bad base64.
        assert_eq!(
            fail(b"PLAIN", Some(b"*"), None),
            Step::Failed(SaslError::Base64)
        );
        assert!(Exchange::new(b"CRAM-MD5", 16).is_none());
    }
}

/// The exchange as the three protocol servers speak it: byte-exact transcripts, the same
/// whatever the read boundaries, and the one failure-counting rule.
#[cfg(test)]
mod servers {
    use crate::proto::drive::{ServerDriver, Transcript};
    use crate::proto::{imap, pop3, smtp, Limits, ListenerTls, LoginOutcome, ServerPolicy};

    #[derive(Clone, Copy, Debug)]
    enum Proto {
        Imap,
        Pop3,
        Smtp,
    }

    const ALL: [Proto; 3] = [Proto::Imap, Proto::Pop3, Proto::Smtp];

    /// Room for 300 decoded bytes per SASL response.
    const MAX_DECODED: usize = 300;

    fn policy(max_auth_failures: u32) -> ServerPolicy {
        ServerPolicy {
            tls: ListenerTls::Implicit,
            allow_plaintext_auth: false,
            limits: Limits {
                max_auth_failures,
                max_literal: MAX_DECODED,
                ..Limits::default()
            },
            hostname: "mx.example".into(),
            mechanisms: Default::default(),
        }
    }

    /// `AUTH`/`AUTHENTICATE` as each protocol writes it (IMAP with tag `a`), and what a
    /// session needs before it (SMTP: EHLO).
    fn auth_line(p: Proto, mechanism: &str, ir: Option<&str>) -> String {
        let ir = ir.map(|r| format!(" {r}")).unwrap_or_default();
        match p {
            Proto::Imap => format!("a AUTHENTICATE {mechanism}{ir}\r\n"),
            Proto::Pop3 | Proto::Smtp => format!("AUTH {mechanism}{ir}\r\n"),
        }
    }

    /// Runs `input` (split into `chunks`) with logins answered Ok; the transcript without
    /// the greeting (and EHLO reply). A session left open stays open (no timeout).
    fn run(p: Proto, max_failures: u32, chunks: &[&[u8]]) -> Transcript {
        let ok = LoginOutcome::Ok { capabilities: None };
        let mut t = match p {
            Proto::Imap => {
                let m = imap::ServerMachine::new(policy(max_failures));
                let mut d = ServerDriver::scripted(m, &[], ok);
                d.take_text();
                d.feed_all(chunks);
                d.finish()
            }
            Proto::Pop3 => {
                let m = pop3::ServerMachine::new(policy(max_failures));
                let mut d = ServerDriver::scripted(m, &[], ok);
                d.take_text();
                d.feed_all(chunks);
                d.finish()
            }
            Proto::Smtp => {
                let m = smtp::ServerMachine::new(policy(max_failures), Vec::new());
                let mut d = ServerDriver::scripted(m, &[], ok);
                d.feed(b"EHLO c\r\n");
                d.take_text();
                d.feed_all(chunks);
                d.finish()
            }
        };
        t.left.clear();
        t
    }

    /// The transcript of `input`, checked to be the same cut at every byte and fed one
    /// byte at a time.
    fn exact(p: Proto, max_failures: u32, input: &str) -> String {
        let input = input.as_bytes();
        let whole = run(p, max_failures, &[input]);
        for cut in 0..=input.len() {
            let split = run(p, max_failures, &[&input[..cut], &input[cut..]]);
            assert_eq!(split, whole, "{p:?}: cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(p, max_failures, &bytes), whole, "{p:?}: byte by byte");
        whole.text()
    }

    #[test]
    fn plain_and_login_in_each_protocol_s_words() {
        let cases: [(Proto, &str); 3] = [
            (Proto::Imap, "+ \r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"),
            (Proto::Pop3, "+ \r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"),
            (
                Proto::Smtp,
                "334 \r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n",
            ),
        ];
        for (p, challenges) in cases {
            let mut lines = challenges.split_inclusive("\r\n");
            let (plain, user, pass) = (
                lines.next().unwrap_or_default(),
                lines.next().unwrap_or_default(),
                lines.next().unwrap_or_default(),
            );
            let ok = match p {
                Proto::Imap => "a OK Logged in\r\n",
                Proto::Pop3 => "+OK Logged in.\r\n",
                Proto::Smtp => "235 2.7.0 Authentication successful\r\n",
            };
            // PLAIN with an initial response.
            let input = auth_line(p, "PLAIN", Some("AGpvZQBzM2NyZXQ="));
            assert_eq!(
                exact(p, 3, &input),
                format!("<login joe s3cret plain>{ok}"),
                "{p:?}"
            );
            // PLAIN after an empty challenge.
            let input = auth_line(p, "plain", None) + "AGpvZQBzM2NyZXQ=\r\n";
            assert_eq!(
                exact(p, 3, &input),
                format!("{plain}<login joe s3cret plain>{ok}"),
                "{p:?}"
            );
            // LOGIN: user name, then password.
            let input = auth_line(p, "LOGIN", None) + "am9l\r\nczNjcmV0\r\n";
            assert_eq!(
                exact(p, 3, &input),
                format!("{user}{pass}<login joe s3cret login>{ok}"),
                "{p:?}"
            );
            // LOGIN with the user name as initial response.
            let input = auth_line(p, "LOGIN", Some("am9l")) + "czNjcmV0\r\n";
            assert_eq!(
                exact(p, 3, &input),
                format!("{pass}<login joe s3cret login>{ok}"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn malformed_exchanges_count_as_failed_logins_on_every_protocol() {
        // Invalid base64, a malformed PLAIN message, a foreign authorization identity:
        // with max_auth_failures 3, the third closes the connection, on all three.
        for p in ALL {
            let input = auth_line(p, "PLAIN", Some("!!!!"))
                + &auth_line(p, "PLAIN", None)
                + "=\r\n"
                + &auth_line(p, "PLAIN", Some("YWRtaW4Aam9lAHB3"))
                + &auth_line(p, "PLAIN", Some("AGpvZQBzM2NyZXQ="));
            let out = exact(p, 3, &input);
            let expected = match p {
                Proto::Imap => "a BAD Invalid base64 data\r\n+ \r\n\
                     a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\
                     a NO [AUTHORIZATIONFAILED] Authorization identity must be the user's own\r\n\
                     * BYE Too many authentication failures\r\n<close>"
                    .to_string(),
                Proto::Pop3 => "-ERR Invalid base64 data\r\n+ \r\n\
                     -ERR Malformed PLAIN response\r\n\
                     -ERR [AUTH] Authorization identity must match the user name\r\n<close>"
                    .to_string(),
                Proto::Smtp => "501 5.5.2 Invalid base64 data\r\n334 \r\n\
                     501 5.5.2 Malformed authentication data\r\n\
                     535 5.7.8 Authorization identity must match authentication identity\r\n\
                     421 4.7.0 mx.example Too many authentication failures, closing connection\r\n<close>"
                    .to_string(),
            };
            assert_eq!(out, expected, "{p:?}");
        }
    }

    #[test]
    fn invalid_base64_alone_reaches_the_limit_on_every_protocol() {
        for p in ALL {
            let input = auth_line(p, "LOGIN", None) + "!!!\r\n";
            let two = input.repeat(2);
            let t = run(p, 2, &[two.as_bytes()]);
            assert!(
                t.closed,
                "{p:?}: two invalid exchanges must close at a limit of 2"
            );
            let t = run(p, 3, &[two.as_bytes()]);
            assert!(!t.closed, "{p:?}: only two failures so far");
        }
    }

    /// A policy offering every mechanism, with a small token bound.
    fn oauth_policy(max_token: usize) -> ServerPolicy {
        let mut p = policy(3);
        p.limits.max_sasl_token = max_token;
        p.mechanisms = crate::proto::Mechanisms::NONE
            .with(crate::proto::Mechanism::Plain)
            .with(crate::proto::Mechanism::Login)
            .with(crate::proto::Mechanism::OAuthBearer)
            .with(crate::proto::Mechanism::XOAuth2);
        p
    }

    /// Like [`run`], with a policy and scripted login outcomes.
    fn run_with(
        p: Proto,
        policy: ServerPolicy,
        outcomes: &[LoginOutcome],
        chunks: &[&[u8]],
    ) -> Transcript {
        let ok = LoginOutcome::Ok { capabilities: None };
        let mut t = match p {
            Proto::Imap => {
                let mut d = ServerDriver::scripted(imap::ServerMachine::new(policy), outcomes, ok);
                d.take_text();
                d.feed_all(chunks);
                d.finish()
            }
            Proto::Pop3 => {
                let mut d = ServerDriver::scripted(pop3::ServerMachine::new(policy), outcomes, ok);
                d.take_text();
                d.feed_all(chunks);
                d.finish()
            }
            Proto::Smtp => {
                let m = smtp::ServerMachine::new(policy, Vec::new());
                let mut d = ServerDriver::scripted(m, outcomes, ok);
                d.feed(b"EHLO c\r\n");
                d.take_text();
                d.feed_all(chunks);
                d.finish()
            }
        };
        t.left.clear();
        t
    }

    /// [`exact`] for OAuth: the same transcript however the input is cut.
    fn exact_with(p: Proto, max_token: usize, outcomes: &[LoginOutcome], input: &str) -> String {
        let input = input.as_bytes();
        let whole = run_with(p, oauth_policy(max_token), outcomes, &[input]);
        for cut in 0..=input.len() {
            let split = run_with(
                p,
                oauth_policy(max_token),
                outcomes,
                &[&input[..cut], &input[cut..]],
            );
            assert_eq!(split, whole, "{p:?}: cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            run_with(p, oauth_policy(max_token), outcomes, &bytes),
            whole,
            "{p:?}: byte by byte"
        );
        whole.text()
    }

    const BEARER: &[u8] = b"n,a=joe@example.net,\x01host=mx.example\x01port=993\x01auth=Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJqb2UifQ.c2ln\x01\x01";
    const XOAUTH2: &[u8] = b"user=joe@example.net\x01auth=Bearer ya29.a0AfH6SMB\x01\x01";

    fn ok_reply(p: Proto) -> &'static str {
        match p {
            Proto::Imap => "a OK Logged in\r\n",
            Proto::Pop3 => "+OK Logged in.\r\n",
            Proto::Smtp => "235 2.7.0 Authentication successful\r\n",
        }
    }

    fn continuation(p: Proto, data: &str) -> String {
        match p {
            Proto::Imap | Proto::Pop3 => format!("+ {data}\r\n"),
            Proto::Smtp => format!("334 {data}\r\n"),
        }
    }

    #[test]
    fn oauth_mechanisms_with_and_without_initial_response() {
        for p in ALL {
            for (name, msg) in [("OAUTHBEARER", BEARER), ("XOAUTH2", XOAUTH2)] {
                let b64 = super::encode_base64(msg);
                let marker = format!(
                    "<login joe@example.net {} {}>",
                    String::from_utf8_lossy(msg),
                    name.to_ascii_lowercase()
                );
                let input = auth_line(p, name, Some(&b64));
                assert_eq!(
                    exact_with(p, 4096, &[], &input),
                    format!("{marker}{}", ok_reply(p)),
                    "{p:?} {name}"
                );
                // The continuation form: an empty challenge, then the message.
                let input = auth_line(p, name, None) + &b64 + "\r\n";
                assert_eq!(
                    exact_with(p, 4096, &[], &input),
                    format!("{}{marker}{}", continuation(p, ""), ok_reply(p)),
                    "{p:?} {name}"
                );
            }
        }
    }

    #[test]
    fn the_backend_s_error_challenge_reaches_the_client_and_the_failure_follows() {
        let challenge = super::encode_base64(br#"{"status":"invalid_token","scope":"mail"}"#);
        let refused = LoginOutcome::Challenged {
            challenge: challenge.clone(),
            response: Some("[AUTHENTICATIONFAILED] Invalid token".into()),
        };
        for p in ALL {
            let b64 = super::encode_base64(BEARER);
            // OAUTHBEARER clients answer AQ==, XOAUTH2 clients an empty line: both end it.
            for dummy in ["AQ==", ""] {
                let input = auth_line(p, "OAUTHBEARER", Some(&b64)) + dummy + "\r\n";
                let out = exact_with(p, 4096, std::slice::from_ref(&refused), &input);
                let failure = match p {
                    Proto::Imap => "a NO [AUTHENTICATIONFAILED] Invalid token\r\n",
                    // The backend's response code is kept (it has one).
                    Proto::Pop3 => "-ERR [AUTHENTICATIONFAILED] Invalid token\r\n",
                    Proto::Smtp => "535 5.7.8 [AUTHENTICATIONFAILED] Invalid token\r\n",
                };
                let login = format!(
                    "<login joe@example.net {} oauthbearer>",
                    String::from_utf8_lossy(BEARER)
                );
                assert_eq!(
                    out,
                    format!("{login}{}{failure}", continuation(p, &challenge)),
                    "{p:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_tokens_are_refused_without_a_continuation_or_a_login() {
        let big = super::encode_base64(&[BEARER, &[b'A'; 300][..]].concat());
        for p in ALL {
            // As initial response: refused at once (no `+`), no login.
            let t = run_with(
                p,
                oauth_policy(256),
                &[],
                &[auth_line(p, "OAUTHBEARER", Some(&big)).as_bytes()],
            );
            assert!(t.logins.is_empty(), "{p:?}: {}", t.text());
            assert!(
                !t.text().starts_with('+') && !t.text().starts_with("334"),
                "{p:?}: {}",
                t.text()
            );
            // In the continuation form: refused without being forwarded.
            let input = auth_line(p, "XOAUTH2", None) + &big + "\r\n";
            let t = run_with(p, oauth_policy(256), &[], &[input.as_bytes()]);
            assert!(t.logins.is_empty(), "{p:?}: {}", t.text());
            // Tokens bigger than the password bound (max_literal) but within their own
            // bound are fine.
            let long = [
                &b"n,a=joe,\x01auth=Bearer "[..],
                &[b'x'; 2000][..],
                b"\x01\x01",
            ]
            .concat();
            let input = auth_line(p, "OAUTHBEARER", Some(&super::encode_base64(&long)));
            let t = run_with(p, oauth_policy(32 * 1024), &[], &[input.as_bytes()]);
            assert_eq!(t.logins.len(), 1, "{p:?}: {}", t.text());
        }
    }

    #[test]
    fn malformed_oauth_messages_count_as_failed_logins() {
        let bad: [&[u8]; 6] = [
            b"n,a=joe,auth=Bearer x\x01\x01", // no kvsep after the GS2 header
            b"p=tls-unique,a=joe,\x01auth=Bearer x\x01\x01", // channel binding
            b"n,a=joe,\x01auth=Basic x\x01\x01", // not a bearer token
            b"n,a=jo=2Xe,\x01auth=Bearer x\x01\x01", // bad saslname escape
            b"n,a=joe,\x01auth=Bearer x y\x01\x01", // not a b64token
            b"n,a=joe,\x01host=x\x01\x01",    // no auth at all
        ];
        for p in ALL {
            let input: String = bad[..3]
                .iter()
                .map(|m| auth_line(p, "OAUTHBEARER", Some(&super::encode_base64(m))))
                .collect();
            let t = run_with(p, oauth_policy(4096), &[], &[input.as_bytes()]);
            assert!(t.logins.is_empty() && t.closed, "{p:?}: {}", t.text());
        }
        for m in bad {
            assert!(
                super::parse_oauth(crate::proto::Mechanism::OAuthBearer, m).is_err(),
                "{:?}",
                String::from_utf8_lossy(m)
            );
        }
    }

    #[test]
    fn oauth_is_offered_only_where_enabled() {
        for p in ALL {
            let b64 = super::encode_base64(BEARER);
            let t = run(p, 3, &[auth_line(p, "OAUTHBEARER", Some(&b64)).as_bytes()]);
            assert!(t.logins.is_empty(), "{p:?}: {}", t.text());
        }
        let p = oauth_policy(4096);
        let m = imap::ServerMachine::new(p.clone());
        let mut d = ServerDriver::scripted(m, &[], LoginOutcome::Unavailable);
        assert!(d
            .take_text()
            .contains("AUTH=PLAIN AUTH=LOGIN AUTH=OAUTHBEARER AUTH=XOAUTH2"));
        let mut d = ServerDriver::scripted(
            smtp::ServerMachine::new(p.clone(), vec![]),
            &[],
            LoginOutcome::Unavailable,
        );
        d.feed(b"EHLO c\r\n");
        assert!(d
            .take_text()
            .contains("250 AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n"));
        let mut d =
            ServerDriver::scripted(pop3::ServerMachine::new(p), &[], LoginOutcome::Unavailable);
        d.feed(b"CAPA\r\n");
        assert!(d
            .take_text()
            .contains("SASL PLAIN LOGIN OAUTHBEARER XOAUTH2\r\n"));
    }

    #[test]
    fn a_verified_identity_is_added_to_a_message_that_claims_none() {
        use crate::proto::Mechanism::{OAuthBearer, XOAuth2};
        let m =
            super::with_identity(OAuthBearer, b"n,,\x01auth=Bearer abc\x01\x01", "a,b=c").unwrap();
        assert_eq!(m, b"n,a=a=2Cb=3Dc,\x01auth=Bearer abc\x01\x01");
        assert_eq!(
            super::parse_oauth(OAuthBearer, &m).unwrap().user.as_deref(),
            Some("a,b=c")
        );
        let m = super::with_identity(XOAuth2, b"auth=Bearer abc\x01\x01", "joe").unwrap();
        assert_eq!(
            super::parse_oauth(XOAuth2, &m).unwrap().user.as_deref(),
            Some("joe")
        );
        assert_eq!(super::with_identity(OAuthBearer, BEARER, "joe"), None);
    }

    #[test]
    fn parse_oauth_messages() {
        let m = super::parse_oauth(crate::proto::Mechanism::OAuthBearer, BEARER).unwrap();
        assert_eq!(m.user.as_deref(), Some("joe@example.net"));
        assert_eq!(m.token, b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJqb2UifQ.c2ln");
        let m = super::parse_oauth(crate::proto::Mechanism::XOAuth2, XOAUTH2).unwrap();
        assert_eq!(m.user.as_deref(), Some("joe@example.net"));
        // No authzid: the token alone says who it is.
        let m = super::parse_oauth(
            crate::proto::Mechanism::OAuthBearer,
            b"n,,\x01auth=Bearer abc\x01\x01",
        )
        .unwrap();
        assert_eq!(m.user, None);
        // Escapes in the GS2 identity.
        let m = super::parse_oauth(
            crate::proto::Mechanism::OAuthBearer,
            b"y,a=a=2Cb=3Dc,\x01auth=Bearer abc==\x01\x01",
        )
        .unwrap();
        assert_eq!(m.user.as_deref(), Some("a,b=c"));
        // The token never shows in Debug.
        assert!(!format!("{m:?}").contains("abc"));
    }

    #[test]
    fn cancel_and_oversized_data_do_not_count() {
        for p in ALL {
            let cancel = auth_line(p, "LOGIN", None) + "*\r\n";
            let big = super::encode_base64(&[b'x'; MAX_DECODED + 1]);
            let too_big = auth_line(p, "PLAIN", None) + &big + "\r\n";
            let good = auth_line(p, "PLAIN", Some("AGpvZQBzM2NyZXQ="));
            let input = cancel.repeat(4) + &too_big + &too_big + &good;
            let t = run(p, 2, &[input.as_bytes()]);
            assert!(!t.closed, "{p:?}: {}", t.text());
            assert!(t.authenticated, "{p:?}: {}", t.text());
            let cancelled = match p {
                Proto::Imap => "a BAD Authentication cancelled\r\n",
                Proto::Pop3 => "-ERR Authentication cancelled\r\n",
                Proto::Smtp => "501 5.0.0 Authentication cancelled\r\n",
            };
            assert_eq!(t.text().matches(cancelled).count(), 4, "{p:?}");
        }
    }
}

//! The backend-facing SMTP machine: greeting, EHLO, STARTTLS, XCLIENT, then the AUTH
//! replay (or nothing, or QUIT for a probe).

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;

use super::normalize_keyword;
use super::reply::{parse_reply, Reply};
use crate::proto::sasl::{encode_base64, encode_plain};
use crate::proto::text::sanitize;
use crate::proto::{
    wipe, BackendAction, BackendLogin, BackendPolicy, BackendResult, BackendTls, ClientInfo,
    Credentials, Secret, Unavailable,
};

/// Longest backend text kept for [`BackendResult::AuthFailed`].
const MAX_FAILURE_TEXT: usize = 200;
/// Longest EHLO name sent (a domain has at most 255 octets).
const MAX_HELO: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Health probe: greeting, EHLO (and STARTTLS + EHLO when required), then `QUIT` and
    /// [`BackendResult::Ready`] with the EHLO keywords.
    Probe,
    /// Log in with the password (AUTH PLAIN or LOGIN).
    Auth,
    /// [`crate::proto::Auth::Bridged`]: greeting and EHLO (HELO if EHLO is refused), then
    /// hand over without AUTH (pop-before-smtp vouched for the user).
    Bridged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    AwaitTls,
    Xclient,
    AuthPlain,
    LoginUser,
    LoginPassword,
    LoginFinal,
    /// `AUTH OAUTHBEARER|XOAUTH2 <message>` sent.
    TokenInitial,
    /// `AUTH OAUTHBEARER|XOAUTH2` sent: waiting for the `334` to send the message.
    TokenWait,
    /// The message sent after the `334`.
    TokenSent,
    /// The token drew an error challenge (kept in `challenge`); the dummy response is
    /// sent and the final `535` is awaited.
    TokenChallenged,
    Done,
}

/// Longest `AUTH` line with a token as initial response; a longer message goes after the
/// `334` (Dovecot's submission service refuses AUTH lines over about 1,000 octets).
const MAX_TOKEN_AUTH_LINE: usize = 500;

/// The backend-facing SMTP machine: greeting, EHLO, STARTTLS, XCLIENT, then the AUTH
/// replay (or nothing, or QUIT for a probe). Implements [`BackendLogin`]. Its `Debug`
/// output shows the queued actions only by number: a queued `AUTH PLAIN` line carries
/// the password (base64 is not redaction).
///
/// ```text
///  Greeting --220--> Ehlo --250--> [STARTTLS required and not done?]
///     |                |              yes: STARTTLS --220--> AwaitTls --tls_established--> Ehlo
///  4xx/5xx/garbage     | 5xx          (no STARTTLS keyword / not 220: Unavailable(Tls))
///  Unavailable(        v
///   Greeting)     Helo (Bridged, Probe only; Auth: NoMechanism; TLS pending: Tls)
///                      |
///      [forward_client and XCLIENT ... ADDR offered, not Probe, not done yet?]
///        yes: XCLIENT --220--> Ehlo (again)   (other replies: go on without it)
///                      |
///      Probe:  QUIT, Done(Ready{EHLO keywords})
///      Bridged: Done(LoggedIn)
///      Auth:   AuthPlain --235--> Done(LoggedIn)
///              LoginUser --334--> LoginPassword --334--> LoginFinal --235--> Done(LoggedIn)
/// ```
///
/// Each `receive` consumes at most one reply, so the `235` that ends a login is consumed
/// exactly and whatever the backend sent after it stays in the driver's buffer for the
/// client. At STARTTLS the `220` is consumed exactly and the driver discards the rest.
///
/// # How replies are read
/// * **Greeting**: `220` (multi-line allowed) or `Unavailable(Greeting)`, also for garbage
///   or an overlong reply.
/// * **EHLO**: `250` lines after the first are the keywords: keyword upper-cased,
///   parameters kept (single-spaced), lines with control characters dropped. A `5xx`
///   means an old server: `HELO` is tried in Bridged and Probe modes (no keywords then);
///   in Auth mode there can be no AUTH without EHLO, so `Unavailable(NoMechanism)`; with
///   STARTTLS still required, `Unavailable(Tls)`. A `4xx` is `Unavailable(Protocol)`.
/// * **AUTH**: PLAIN with an initial response is preferred (one round trip); LOGIN is used
///   when PLAIN is not offered or cannot carry the password (it contains NUL). Both
///   `AUTH mech` and the old `AUTH=mech` keyword forms are understood. Replies:
///
///   | reply                         | result                                   |
///   |-------------------------------|------------------------------------------|
///   | `235`                         | `LoggedIn` (consumed exactly)            |
///   | `535`, other `5xx`            | `AuthFailed` with the text after the code |
///   | `504`, `534`, `538`           | `Unavailable(NoMechanism)`: configuration, not the password |
///   | `500`..`503`                  | `Unavailable(Protocol)`: the backend did not follow |
///   | `4xx` (`454`, `421`, ...)     | `Unavailable(Protocol)`: temporary, fail over |
///   | anything else                 | `Unavailable(Protocol)`                  |
///
/// * **421** at any point after the greeting is `Unavailable(Protocol)`.
/// * Lines are bounded to 4 KiB and replies to 64 KiB (`Unavailable(Protocol)`, or
///   `Greeting` for the greeting).
///
/// After an orderly refusal (`AuthFailed`, `NoMechanism`, STARTTLS refused or hidden) the
/// machine sends `QUIT` before `Done`, so the backend logs a clean end; after garbage or a
/// temporary failure it just stops.
///
/// Credentials only ever leave as base64 (`AUTH PLAIN <b64>`, LOGIN answers), so CR or LF
/// in a user name or password cannot inject a command; buffers that held them are wiped
/// and the credentials are dropped (wiped) once sent.
pub struct BackendMachine {
    forward_client: Option<ClientInfo>,
    helo: String,
    kind: Kind,
    creds: Option<Credentials>,
    step: Step,
    /// STARTTLS is done or not needed (implicit TLS is handled by the driver).
    tls_done: bool,
    xclient_done: bool,
    keywords: Vec<String>,
    /// An OAuth token's error challenge (RFC 7628), for the client.
    challenge: Option<String>,
    /// The login replays a token with this mechanism.
    token: Option<crate::proto::Mechanism>,
    actions: VecDeque<BackendAction>,
}

impl fmt::Debug for BackendMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendMachine")
            .field("forward_client", &self.forward_client)
            .field("helo", &self.helo)
            .field("kind", &self.kind)
            .field("creds", &self.creds)
            .field("step", &self.step)
            .field("tls_done", &self.tls_done)
            .field("xclient_done", &self.xclient_done)
            .field("keywords", &self.keywords)
            .field("queued_actions", &self.actions.len())
            .finish()
    }
}

impl BackendMachine {
    /// A machine for one backend connection. Nothing is sent before the greeting.
    ///
    /// `policy.helo` is used as given when it is one word of printable ASCII of at most
    /// 255 bytes; otherwise its printable characters are kept (`localhost` if none are).
    /// Without credentials it is a health probe; bridged credentials open the session
    /// without AUTH.
    pub fn new(policy: BackendPolicy, creds: Option<Credentials>) -> BackendMachine {
        let token = (creds.as_ref()).and_then(|c| c.token_payload().map(|(_, m)| m));
        let (kind, creds) = match creds {
            None => (Kind::Probe, None),
            Some(c) if matches!(c.auth, crate::proto::Auth::Bridged) => (Kind::Bridged, None),
            Some(c) => (Kind::Auth, Some(c)),
        };
        let mut helo: String = policy
            .helo
            .chars()
            .filter(char::is_ascii_graphic)
            .take(MAX_HELO)
            .collect();
        if helo.is_empty() {
            helo = "localhost".to_owned();
        }
        BackendMachine {
            tls_done: policy.tls != BackendTls::StartTls,
            forward_client: policy.forward_client,
            helo,
            kind,
            creds,
            step: Step::Greeting,
            xclient_done: false,
            keywords: Vec::new(),
            challenge: None,
            token,
            actions: VecDeque::new(),
        }
    }

    /// The keywords of the backend's last EHLO reply (keyword upper-cased, parameters
    /// kept, e.g. `SIZE 10240000`, `AUTH PLAIN LOGIN`); empty before it or after a HELO
    /// fallback. Useful to the driver after bridged and password logins.
    pub fn extensions(&self) -> &[String] {
        &self.keywords
    }

    fn send(&mut self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.actions.push_back(BackendAction::Send(bytes));
    }

    /// Sends `prefix` + base64 secret + CRLF, wiping the base64 text afterwards.
    fn send_secret(&mut self, prefix: &str, b64: String) {
        let mut bytes = Vec::with_capacity(prefix.len() + b64.len() + 2);
        bytes.extend_from_slice(prefix.as_bytes());
        bytes.extend_from_slice(b64.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        let mut raw = b64.into_bytes();
        wipe(&mut raw);
        self.actions.push_back(BackendAction::Send(bytes));
    }

    fn finish(&mut self, result: BackendResult) {
        self.creds = None;
        self.step = Step::Done;
        self.actions.push_back(BackendAction::Done(result));
    }

    fn fail(&mut self, why: Unavailable) {
        self.finish(BackendResult::Unavailable(why));
    }

    /// An orderly end: QUIT first.
    fn quit_with(&mut self, result: BackendResult) {
        self.send("QUIT");
        self.finish(result);
    }

    fn send_ehlo(&mut self) {
        let line = format!("EHLO {}", self.helo);
        self.send(&line);
        self.keywords.clear();
        self.step = Step::Ehlo;
    }

    fn keyword(&self, name: &str) -> Option<Vec<String>> {
        self.keywords.iter().find_map(|line| {
            let mut words = line.split(' ');
            (words.next() == Some(name)).then(|| words.map(str::to_ascii_uppercase).collect())
        })
    }

    /// SASL mechanisms offered, from `AUTH m1 m2` and the old `AUTH=m1 m2` forms.
    fn auth_mechanisms(&self) -> Vec<String> {
        let mut out = Vec::new();
        for line in &self.keywords {
            let mut words = line.split(' ');
            let Some(first) = words.next() else {
                continue;
            };
            if first == "AUTH" {
                out.extend(words.map(str::to_ascii_uppercase));
            } else if let Some(mech) = first.strip_prefix("AUTH=") {
                out.extend(
                    std::iter::once(mech)
                        .chain(words)
                        .filter(|w| !w.is_empty())
                        .map(str::to_ascii_uppercase),
                );
            }
        }
        out
    }

    fn on_reply(&mut self, reply: Reply) {
        if reply.code == 421 && self.step != Step::Greeting {
            self.fail(Unavailable::Protocol);
            return;
        }
        match self.step {
            Step::Greeting | Step::Ehlo | Step::Helo | Step::StartTls | Step::Xclient => {
                self.on_hello_reply(reply)
            }
            Step::AwaitTls | Step::Done => {}
            _ => self.on_auth_reply(reply),
        }
    }

    /// A reply before authentication: greeting, EHLO/HELO, STARTTLS, XCLIENT.
    fn on_hello_reply(&mut self, reply: Reply) {
        match self.step {
            Step::Greeting => {
                if reply.code == 220 {
                    self.send_ehlo();
                } else {
                    self.fail(Unavailable::Greeting);
                }
            }
            Step::Ehlo => match reply.code {
                250 => {
                    self.keywords = reply
                        .lines
                        .iter()
                        .skip(1)
                        .filter_map(|l| normalize_keyword(l))
                        .map(|(k, p)| if p.is_empty() { k } else { format!("{k} {p}") })
                        .collect();
                    self.after_hello();
                }
                500..=599 if !self.tls_done => self.quit_with(unavailable(Unavailable::Tls)),
                500..=599 if self.kind == Kind::Auth => {
                    self.quit_with(unavailable(Unavailable::NoMechanism))
                }
                500..=599 => {
                    let line = format!("HELO {}", self.helo);
                    self.send(&line);
                    self.step = Step::Helo;
                }
                _ => self.fail(Unavailable::Protocol),
            },
            Step::Helo => {
                if reply.code == 250 {
                    self.keywords.clear();
                    self.after_hello();
                } else {
                    self.fail(Unavailable::Protocol);
                }
            }
            Step::StartTls => {
                if reply.code == 220 {
                    self.step = Step::AwaitTls;
                    self.actions.push_back(BackendAction::StartTls);
                } else {
                    self.quit_with(unavailable(Unavailable::Tls));
                }
            }
            Step::Xclient => {
                if reply.code == 220 {
                    // The XCLIENT reply is a new greeting: EHLO again (Postfix XCLIENT).
                    self.send_ehlo();
                } else {
                    self.after_hello();
                }
            }
            _ => {}
        }
    }

    /// A reply during the AUTH exchange.
    fn on_auth_reply(&mut self, reply: Reply) {
        match self.step {
            Step::TokenInitial | Step::TokenSent | Step::AuthPlain | Step::LoginFinal
                if reply.code == 235 =>
            {
                self.finish(BackendResult::LoggedIn { capabilities: None });
            }
            Step::LoginUser if reply.code == 334 => {
                let Some(user) = self
                    .creds
                    .as_ref()
                    .map(|c| encode_base64(c.user.as_bytes()))
                else {
                    self.fail(Unavailable::Protocol);
                    return;
                };
                self.send_secret("", user);
                self.step = Step::LoginPassword;
            }
            Step::LoginPassword if reply.code == 334 => {
                let Some(creds) = self.creds.take() else {
                    self.fail(Unavailable::Protocol);
                    return;
                };
                let password = creds.secret().map(Secret::expose).unwrap_or_default();
                self.send_secret("", encode_base64(password));
                self.step = Step::LoginFinal;
            }
            Step::TokenWait if reply.code == 334 => {
                let Some((payload, _)) = self.creds.as_ref().and_then(|c| c.token_payload()) else {
                    self.fail(Unavailable::Protocol);
                    return;
                };
                let b64 = encode_base64(payload.expose());
                self.creds = None;
                self.send_secret("", b64);
                self.step = Step::TokenSent;
            }
            // RFC 7628 3.2.2: an error challenge after the whole token. The dummy response
            // ends the exchange; the client is shown the challenge.
            Step::TokenInitial | Step::TokenSent if reply.code == 334 => {
                let challenge: String = reply
                    .text()
                    .chars()
                    .filter(char::is_ascii_graphic)
                    .take(4096)
                    .collect();
                let dummy = match self.token {
                    Some(crate::proto::Mechanism::OAuthBearer) => "AQ==",
                    _ => "",
                };
                self.send(dummy);
                self.challenge = Some(challenge);
                self.step = Step::TokenChallenged;
            }
            Step::TokenChallenged => match reply.code {
                500..=599 if ![504, 534, 538].contains(&reply.code) => {
                    let mut response = sanitize(reply.text().as_bytes(), MAX_FAILURE_TEXT);
                    if response.is_empty() {
                        response = "Authentication failed".to_owned();
                    }
                    let challenge = self.challenge.take().unwrap_or_default();
                    self.quit_with(BackendResult::TokenRefused {
                        challenge,
                        response,
                    });
                }
                _ => self.auth_refused(&reply),
            },
            Step::AuthPlain
            | Step::LoginUser
            | Step::LoginPassword
            | Step::LoginFinal
            | Step::TokenInitial
            | Step::TokenWait
            | Step::TokenSent => self.auth_refused(&reply),
            _ => {}
        }
    }

    /// After the (final) EHLO or HELO reply: STARTTLS, XCLIENT, then the mode's ending.
    fn after_hello(&mut self) {
        if !self.tls_done {
            if self.keyword("STARTTLS").is_some() {
                self.send("STARTTLS");
                self.step = Step::StartTls;
            } else {
                self.quit_with(unavailable(Unavailable::Tls));
            }
            return;
        }
        if self.kind != Kind::Probe && !self.xclient_done {
            self.xclient_done = true;
            if let Some(line) = self.xclient_line() {
                self.send(&line);
                self.step = Step::Xclient;
                return;
            }
        }
        match self.kind {
            Kind::Probe => {
                let capabilities = self.keywords.clone();
                self.quit_with(BackendResult::Ready { capabilities });
            }
            Kind::Bridged => self.finish(BackendResult::LoggedIn { capabilities: None }),
            Kind::Auth => self.start_auth(),
        }
    }

    /// `XCLIENT ADDR=...` (and `PORT=...` when offered), if a client is to be forwarded
    /// and the backend offers XCLIENT with ADDR. Addresses are xtext-safe as printed
    /// (hex digits, dots, colons); IPv6 gets the `IPV6:` prefix Postfix expects and an
    /// IPv4-mapped address is sent as IPv4.
    fn xclient_line(&self) -> Option<String> {
        let client = self.forward_client.as_ref()?;
        let attributes = self.keyword("XCLIENT")?;
        if !attributes.iter().any(|a| a == "ADDR") {
            return None;
        }
        let addr = match client.ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("IPV6:{v6}"),
            },
        };
        let mut line = format!("XCLIENT ADDR={addr}");
        if attributes.iter().any(|a| a == "PORT") {
            line.push_str(&format!(" PORT={}", client.port));
        }
        Some(line)
    }

    fn start_auth(&mut self) {
        let mechanisms = self.auth_mechanisms();
        let offers = |m: &str| mechanisms.iter().any(|x| x == m);
        let Some(creds) = self.creds.as_ref() else {
            self.fail(Unavailable::NoMechanism);
            return;
        };
        if let Some((payload, mechanism)) = creds.token_payload() {
            // A token goes with the mechanism it came with, or not at all.
            if !offers(mechanism.sasl_name()) {
                self.quit_with(unavailable(Unavailable::NoMechanism));
                return;
            }
            let b64 = encode_base64(payload.expose());
            let prefix = format!("AUTH {} ", mechanism.sasl_name());
            if prefix.len() + b64.len() + 2 <= MAX_TOKEN_AUTH_LINE {
                self.creds = None;
                self.send_secret(&prefix, b64);
                self.step = Step::TokenInitial;
            } else {
                let mut raw = b64.into_bytes();
                wipe(&mut raw);
                self.send(prefix.trim_end());
                self.step = Step::TokenWait;
            }
            return;
        }
        if offers("PLAIN") {
            if let Some(b64) = encode_plain(creds) {
                self.creds = None;
                self.send_secret("AUTH PLAIN ", b64);
                self.step = Step::AuthPlain;
                return;
            }
        }
        if offers("LOGIN") {
            self.send("AUTH LOGIN");
            self.step = Step::LoginUser;
            return;
        }
        self.quit_with(unavailable(Unavailable::NoMechanism));
    }

    fn auth_refused(&mut self, reply: &Reply) {
        match reply.code {
            504 | 534 | 538 => self.quit_with(unavailable(Unavailable::NoMechanism)),
            500..=503 => self.fail(Unavailable::Protocol),
            505..=533 | 535..=537 | 539..=599 => {
                let mut response = sanitize(reply.text().as_bytes(), MAX_FAILURE_TEXT);
                if response.is_empty() {
                    response = "Authentication failed".to_owned();
                }
                self.quit_with(BackendResult::AuthFailed { response });
            }
            _ => self.fail(Unavailable::Protocol),
        }
    }
}

fn unavailable(why: Unavailable) -> BackendResult {
    BackendResult::Unavailable(why)
}

impl BackendLogin for BackendMachine {
    fn receive(&mut self, input: &[u8]) -> usize {
        if input.is_empty() || matches!(self.step, Step::Done | Step::AwaitTls) {
            return 0;
        }
        match parse_reply(input) {
            Ok(None) => 0,
            Ok(Some((reply, used))) => {
                self.on_reply(reply);
                used
            }
            Err(_) => {
                let why = if self.step == Step::Greeting {
                    Unavailable::Greeting
                } else {
                    Unavailable::Protocol
                };
                self.fail(why);
                0
            }
        }
    }

    fn poll_action(&mut self) -> Option<BackendAction> {
        self.actions.pop_front()
    }

    fn tls_established(&mut self) {
        if self.step == Step::AwaitTls {
            self.tls_done = true;
            self.send_ehlo();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Mechanism;
    use std::net::Ipv6Addr;

    fn policy(tls: BackendTls) -> BackendPolicy {
        BackendPolicy {
            tls,
            forward_client: None,
            helo: "client.example".into(),
            known_capabilities: None,
        }
    }

    fn creds(user: &str, pass: &[u8]) -> Credentials {
        Credentials::password(user.into(), pass.to_vec(), Mechanism::Plain)
    }

    fn joe() -> Option<Credentials> {
        Some(creds("joe", b"s3cret"))
    }

    /// Feeds `input` the way the driver does (receive while it consumes, actions drained
    /// after each call) and returns what was consumed and a transcript of the actions:
    /// sent lines prefixed `C: `, `[TLS]`, `[DONE result]`.
    fn step(m: &mut BackendMachine, input: &[u8]) -> (usize, String) {
        let mut used = 0;
        let mut log = String::new();
        loop {
            let n = m.receive(&input[used..]);
            used += n;
            while let Some(a) = m.poll_action() {
                match a {
                    BackendAction::Send(b) => {
                        log.push_str("C: ");
                        log.push_str(std::str::from_utf8(&b).unwrap());
                    }
                    BackendAction::StartTls => log.push_str("[TLS]"),
                    BackendAction::Done(r) => log.push_str(&format!("[DONE {r:?}]")),
                }
            }
            if n == 0 {
                return (used, log);
            }
        }
    }

    const GREETING: &[u8] = b"220-mx.backend ESMTP\r\n220-second line\r\n220 ready\r\n";
    const EHLO_AUTH: &[u8] =
        b"250-mx.backend\r\n250-PIPELINING\r\n250-size  10240000\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n";

    fn done(r: BackendResult) -> String {
        format!("[DONE {r:?}]")
    }

    fn logged_in() -> String {
        done(BackendResult::LoggedIn { capabilities: None })
    }

    #[test]
    fn multi_line_greeting_then_ehlo_and_plain() {
        let mut m = BackendMachine::new(policy(BackendTls::None), joe());
        assert_eq!(m.poll_action(), None, "nothing before the greeting");
        assert_eq!(step(&mut m, b"220-mx.backend"), (0, String::new()));
        assert_eq!(
            step(&mut m, GREETING),
            (GREETING.len(), "C: EHLO client.example\r\n".into())
        );
        let (n, log) = step(&mut m, EHLO_AUTH);
        assert_eq!(n, EHLO_AUTH.len());
        assert_eq!(log, "C: AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(
            m.extensions(),
            [
                "PIPELINING",
                "SIZE 10240000",
                "AUTH PLAIN LOGIN",
                "ENHANCEDSTATUSCODES",
                "8BITMIME"
            ]
        );
        let input = b"235 2.7.0 Authentication successful\r\n250 client bytes\r\n";
        let (n, log) = step(&mut m, input);
        assert_eq!(&input[n..], b"250 client bytes\r\n", "left for the client");
        assert_eq!(log, logged_in());
        assert_eq!(m.receive(&input[n..]), 0);
    }

    #[test]
    fn tokens_go_with_their_mechanism_and_long_ones_after_334() {
        let short = b"user=joe\x01auth=Bearer abc\x01\x01".to_vec();
        let b64 = encode_base64(&short);
        let creds = Credentials::token("joe".into(), short, crate::proto::Mechanism::XOAuth2);
        let mut m = BackendMachine::new(policy(BackendTls::None), Some(creds));
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH PLAIN XOAUTH2\r\n");
        assert_eq!(log, format!("C: AUTH XOAUTH2 {b64}\r\n"));
        let (_, log) = step(&mut m, b"235 ok\r\n");
        assert_eq!(log, logged_in());
        // A token too long for one AUTH line goes after the 334 (Dovecot's submission
        // service refuses long AUTH lines); an error challenge gets the dummy response.
        let long = [
            &b"n,a=joe,\x01auth=Bearer "[..],
            &[b'x'; 600][..],
            b"\x01\x01",
        ]
        .concat();
        let b64 = encode_base64(&long);
        let creds = Credentials::token("joe".into(), long, crate::proto::Mechanism::OAuthBearer);
        let mut m = BackendMachine::new(policy(BackendTls::None), Some(creds));
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH OAUTHBEARER\r\n");
        assert_eq!(log, "C: AUTH OAUTHBEARER\r\n");
        let (_, log) = step(&mut m, b"334 \r\n");
        assert_eq!(log, format!("C: {b64}\r\n"));
        let (_, log) = step(&mut m, b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n");
        assert_eq!(log, "C: AQ==\r\n");
        let (_, log) = step(&mut m, b"535 5.7.8 Bad token\r\n");
        assert!(
            log.contains("TokenRefused") && log.contains("eyJzdGF0dXMiOiI0MDEifQ=="),
            "{log}"
        );
        // Not offered: unavailable for this login, never a password login.
        let creds = Credentials::token(
            "joe".into(),
            b"user=joe\x01auth=Bearer a\x01\x01".to_vec(),
            crate::proto::Mechanism::XOAuth2,
        );
        let mut m = BackendMachine::new(policy(BackendTls::None), Some(creds));
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n");
        assert!(log.contains("NoMechanism"), "{log}");
    }

    #[test]
    fn login_replay() {
        let mut m = BackendMachine::new(policy(BackendTls::None), joe());
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH=LOGIN\r\n");
        assert_eq!(log, "C: AUTH LOGIN\r\n");
        let (_, log) = step(&mut m, b"334 VXNlcm5hbWU6\r\n");
        assert_eq!(log, "C: am9l\r\n");
        let (_, log) = step(&mut m, b"334 UGFzc3dvcmQ6\r\n");
        assert_eq!(log, "C: czNjcmV0\r\n");
        assert!(m.creds.is_none(), "credentials dropped once sent");
        let (n, log) = step(&mut m, b"235 ok\r\n* extra");
        assert_eq!((n, log), (8, logged_in()));
    }

    #[test]
    fn plain_preferred_and_login_when_password_has_nul() {
        let mut m = BackendMachine::new(policy(BackendTls::None), joe());
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH LOGIN plain\r\n");
        assert_eq!(log, "C: AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");

        let mode = Some(creds("joe", b"a\0b"));
        let mut m = BackendMachine::new(policy(BackendTls::None), mode);
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n");
        assert_eq!(log, "C: AUTH LOGIN\r\n");
        step(&mut m, b"334 x\r\n");
        let (_, log) = step(&mut m, b"334 x\r\n");
        assert_eq!(log, "C: YQBi\r\n");

        let mode = Some(creds("joe", b"a\0b"));
        let mut m = BackendMachine::new(policy(BackendTls::None), mode);
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH PLAIN\r\n");
        assert_eq!(
            log,
            "C: QUIT\r\n".to_owned() + &done(unavailable(Unavailable::NoMechanism))
        );
    }

    #[test]
    fn no_mechanism() {
        for ehlo in [
            &b"250-mx\r\n250 AUTH CRAM-MD5 XOAUTH2\r\n"[..],
            b"250-mx\r\n250 PIPELINING\r\n",
            b"250 mx\r\n",
        ] {
            let mut m = BackendMachine::new(policy(BackendTls::None), joe());
            step(&mut m, b"220 mx\r\n");
            let (_, log) = step(&mut m, ehlo);
            assert_eq!(
                log,
                "C: QUIT\r\n".to_owned() + &done(unavailable(Unavailable::NoMechanism))
            );
        }
    }

    #[test]
    fn auth_failed_vs_unavailable() {
        let cases: &[(&[u8], BackendResult, bool)] = &[
            (
                b"535 5.7.8 Error: authentication failed: \x01bad\r\n",
                BackendResult::AuthFailed {
                    response: "5.7.8 Error: authentication failed: bad".into(),
                },
                true,
            ),
            (
                b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n",
                BackendResult::AuthFailed {
                    response: "5.7.8 Username and Password not accepted. 5.7.8 Learn more".into(),
                },
                true,
            ),
            (
                b"535\r\n",
                BackendResult::AuthFailed {
                    response: "Authentication failed".into(),
                },
                true,
            ),
            (
                b"550 5.7.1 blocked\r\n",
                BackendResult::AuthFailed {
                    response: "5.7.1 blocked".into(),
                },
                true,
            ),
            (
                b"454 4.7.0 Temporary authentication failure\r\n",
                unavailable(Unavailable::Protocol),
                false,
            ),
            (
                b"421 4.3.2 shutting down\r\n",
                unavailable(Unavailable::Protocol),
                false,
            ),
            (
                b"538 5.7.11 Encryption required\r\n",
                unavailable(Unavailable::NoMechanism),
                true,
            ),
            (
                b"504 5.5.4 Unrecognized\r\n",
                unavailable(Unavailable::NoMechanism),
                true,
            ),
            (
                b"501 5.5.2 Syntax\r\n",
                unavailable(Unavailable::Protocol),
                false,
            ),
            (b"334 \r\n", unavailable(Unavailable::Protocol), false),
            (b"250 ok\r\n", unavailable(Unavailable::Protocol), false),
            (b"garbage\r\n", unavailable(Unavailable::Protocol), false),
        ];
        for (reply, result, quits) in cases {
            let mut m = BackendMachine::new(policy(BackendTls::None), joe());
            step(&mut m, b"220 mx\r\n");
            step(&mut m, b"250-mx\r\n250 AUTH PLAIN\r\n");
            let (_, log) = step(&mut m, reply);
            let quit = if *quits { "C: QUIT\r\n" } else { "" };
            assert_eq!(log, quit.to_owned() + &done(result.clone()), "{reply:?}");
        }
        // A rejection in the middle of LOGIN.
        let mut m = BackendMachine::new(policy(BackendTls::None), joe());
        step(&mut m, b"220 mx\r\n");
        step(&mut m, b"250-mx\r\n250 AUTH LOGIN\r\n");
        step(&mut m, b"334 VXNlcm5hbWU6\r\n");
        let (_, log) = step(&mut m, b"535 5.7.8 no such user\r\n");
        assert_eq!(
            log,
            "C: QUIT\r\n".to_owned()
                + &done(BackendResult::AuthFailed {
                    response: "5.7.8 no such user".into()
                })
        );
    }

    #[test]
    fn bad_greetings() {
        for g in [
            &b"554 5.7.1 go away\r\n"[..],
            b"421 4.3.2 busy\r\n",
            b"220-ok\r\n554 no\r\n",
            b"HTTP/1.1 400 Bad Request\r\n",
            b"* OK IMAP4rev1\r\n",
        ] {
            let mut m = BackendMachine::new(policy(BackendTls::None), joe());
            assert_eq!(
                step(&mut m, g).1,
                done(unavailable(Unavailable::Greeting)),
                "{g:?}"
            );
            assert_eq!(m.receive(b"220 ok\r\n"), 0, "done");
        }
        let mut m = BackendMachine::new(policy(BackendTls::None), None);
        let long = vec![b'2'; 5000];
        assert_eq!(
            step(&mut m, &long).1,
            done(unavailable(Unavailable::Greeting))
        );
    }

    #[test]
    fn overlong_reply_is_protocol() {
        let mut m = BackendMachine::new(policy(BackendTls::None), joe());
        step(&mut m, b"220 mx\r\n");
        let mut ehlo = Vec::new();
        while ehlo.len() < 70_000 {
            ehlo.extend_from_slice(b"250-XFOO 0123456789012345678901234567890123456789\r\n");
        }
        assert_eq!(
            step(&mut m, &ehlo).1,
            done(unavailable(Unavailable::Protocol))
        );
    }

    #[test]
    fn starttls_with_injected_bytes() {
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
        step(&mut m, b"220 mx\r\n");
        // Plaintext EHLO offers no AUTH: fine, STARTTLS first.
        let (_, log) = step(&mut m, b"250-mx\r\n250 STARTTLS\r\n");
        assert_eq!(log, "C: STARTTLS\r\n");
        let input = b"220 2.0.0 Ready to start TLS\r\n250 AUTH LOGIN\r\n";
        let (n, log) = step(&mut m, input);
        assert_eq!(
            &input[n..],
            b"250 AUTH LOGIN\r\n",
            "left for the driver to discard"
        );
        assert_eq!(log, "[TLS]");
        assert_eq!(m.receive(&input[n..]), 0, "nothing until tls_established");
        m.tls_established();
        assert_eq!(
            m.poll_action(),
            Some(BackendAction::Send(b"EHLO client.example\r\n".to_vec()))
        );
        assert!(m.extensions().is_empty(), "pre-TLS keywords forgotten");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH PLAIN\r\n");
        assert_eq!(log, "C: AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");
        assert_eq!(m.extensions(), ["AUTH PLAIN"]);
        assert_eq!(step(&mut m, b"235 ok\r\n").1, logged_in());
    }

    #[test]
    fn starttls_refused_or_absent() {
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n");
        assert_eq!(
            log,
            "C: QUIT\r\n".to_owned() + &done(unavailable(Unavailable::Tls))
        );

        let mut m = BackendMachine::new(policy(BackendTls::StartTls), None);
        step(&mut m, b"220 mx\r\n");
        step(&mut m, b"250-mx\r\n250 STARTTLS\r\n");
        let (_, log) = step(&mut m, b"454 4.7.0 TLS not available\r\n");
        assert_eq!(
            log,
            "C: QUIT\r\n".to_owned() + &done(unavailable(Unavailable::Tls))
        );

        // EHLO refused while TLS is still required: no HELO fallback can give TLS.
        let mut m = BackendMachine::new(
            policy(BackendTls::StartTls),
            Some(Credentials::bridged("joe".into())),
        );
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"502 5.5.1 EHLO not supported\r\n");
        assert_eq!(
            log,
            "C: QUIT\r\n".to_owned() + &done(unavailable(Unavailable::Tls))
        );

        // Implicit TLS: no STARTTLS needed even if not offered.
        let mut m = BackendMachine::new(
            policy(BackendTls::Implicit),
            Some(Credentials::bridged("joe".into())),
        );
        step(&mut m, b"220 mx\r\n");
        assert_eq!(step(&mut m, b"250 mx\r\n").1, logged_in());
    }

    #[test]
    fn probe() {
        let mut m = BackendMachine::new(policy(BackendTls::StartTls), None);
        step(&mut m, GREETING);
        step(&mut m, b"250-mx\r\n250-SIZE 100\r\n250 STARTTLS\r\n");
        let (_, log) = step(&mut m, b"220 go\r\n");
        assert_eq!(log, "[TLS]");
        m.tls_established();
        let (_, log) = step(
            &mut m,
            b"250-mx\r\n250-SIZE 200\r\n250-AUTH PLAIN\r\n250 DSN\r\n",
        );
        assert_eq!(
            log,
            "C: EHLO client.example\r\nC: QUIT\r\n".to_owned()
                + &done(BackendResult::Ready {
                    capabilities: vec!["SIZE 200".into(), "AUTH PLAIN".into(), "DSN".into()]
                })
        );
    }

    #[test]
    fn probe_skips_xclient_and_falls_back_to_helo() {
        let mut p = policy(BackendTls::None);
        p.forward_client = Some(ClientInfo {
            ip: "192.0.2.7".parse().unwrap(),
            port: 4321,
        });
        let mut m = BackendMachine::new(p, None);
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"500 5.5.1 what\r\n");
        assert_eq!(log, "C: HELO client.example\r\n");
        let (_, log) = step(&mut m, b"250 mx\r\n");
        assert_eq!(
            log,
            "C: QUIT\r\n".to_owned()
                + &done(BackendResult::Ready {
                    capabilities: vec![]
                })
        );
    }

    #[test]
    fn no_auth_mode() {
        let mut m = BackendMachine::new(
            policy(BackendTls::None),
            Some(Credentials::bridged("joe".into())),
        );
        step(&mut m, b"220 legacy.example ESMTP\r\n");
        let input = b"250-legacy\r\n250 SIZE 5000000\r\n220 something for the client\r\n";
        let (n, log) = step(&mut m, input);
        assert_eq!(log, logged_in());
        assert_eq!(&input[n..], b"220 something for the client\r\n");
        assert_eq!(m.extensions(), ["SIZE 5000000"]);
    }

    #[test]
    fn helo_fallback() {
        let mut m = BackendMachine::new(
            policy(BackendTls::None),
            Some(Credentials::bridged("joe".into())),
        );
        step(&mut m, b"220 old host\r\n");
        let (_, log) = step(&mut m, b"502 Command not implemented\r\n");
        assert_eq!(log, "C: HELO client.example\r\n");
        assert_eq!(step(&mut m, b"250 old host\r\n").1, logged_in());
        assert!(m.extensions().is_empty());

        let mut m = BackendMachine::new(
            policy(BackendTls::None),
            Some(Credentials::bridged("joe".into())),
        );
        step(&mut m, b"220 old host\r\n");
        step(&mut m, b"500 what\r\n");
        assert_eq!(
            step(&mut m, b"501 no\r\n").1,
            done(unavailable(Unavailable::Protocol))
        );

        // Auth mode: no EHLO, no AUTH.
        let mut m = BackendMachine::new(policy(BackendTls::None), joe());
        step(&mut m, b"220 old host\r\n");
        assert_eq!(
            step(&mut m, b"500 what\r\n").1,
            "C: QUIT\r\n".to_owned() + &done(unavailable(Unavailable::NoMechanism))
        );

        // A temporary EHLO failure is not an old host.
        let mut m = BackendMachine::new(
            policy(BackendTls::None),
            Some(Credentials::bridged("joe".into())),
        );
        step(&mut m, b"220 host\r\n");
        assert_eq!(
            step(&mut m, b"451 later\r\n").1,
            done(unavailable(Unavailable::Protocol))
        );
    }

    #[test]
    fn xclient_forwarding() {
        let mut p = policy(BackendTls::None);
        p.forward_client = Some(ClientInfo {
            ip: "2001:db8::7".parse().unwrap(),
            port: 4321,
        });
        let mut m = BackendMachine::new(p.clone(), Some(Credentials::bridged("joe".into())));
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250 XCLIENT NAME addr PORT HELO\r\n");
        assert_eq!(log, "C: XCLIENT ADDR=IPV6:2001:db8::7 PORT=4321\r\n");
        let (_, log) = step(&mut m, b"220 mx ESMTP\r\n");
        assert_eq!(log, "C: EHLO client.example\r\n");
        // The new EHLO still offers XCLIENT: not sent twice.
        let (_, log) = step(&mut m, b"250-mx\r\n250 XCLIENT NAME ADDR\r\n");
        assert_eq!(log, logged_in());

        // IPv4-mapped, ADDR only; a rejection is not fatal.
        p.forward_client = Some(ClientInfo {
            ip: IpAddr::V6(Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0207])),
            port: 1,
        });
        let mut m = BackendMachine::new(p.clone(), joe());
        step(&mut m, b"220 mx\r\n");
        let (_, log) = step(&mut m, b"250-mx\r\n250-XCLIENT ADDR\r\n250 AUTH PLAIN\r\n");
        assert_eq!(log, "C: XCLIENT ADDR=192.0.2.7\r\n");
        let (_, log) = step(&mut m, b"550 5.7.0 insufficient authorization\r\n");
        assert_eq!(log, "C: AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n");

        // XCLIENT without ADDR, or no XCLIENT: skipped.
        let mut m = BackendMachine::new(p.clone(), Some(Credentials::bridged("joe".into())));
        step(&mut m, b"220 mx\r\n");
        assert_eq!(
            step(&mut m, b"250-mx\r\n250 XCLIENT NAME\r\n").1,
            logged_in()
        );

        // 421 to XCLIENT: gone.
        let mut m = BackendMachine::new(p, Some(Credentials::bridged("joe".into())));
        step(&mut m, b"220 mx\r\n");
        step(&mut m, b"250-mx\r\n250 XCLIENT ADDR\r\n");
        assert_eq!(
            step(&mut m, b"421 4.7.0 bye\r\n").1,
            done(unavailable(Unavailable::Protocol))
        );
    }

    #[test]
    fn injection_attempts_send_one_auth_command() {
        let nasty = b"pw\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\n";
        for ehlo in [
            &b"250-mx\r\n250 AUTH PLAIN\r\n"[..],
            b"250-mx\r\n250 AUTH LOGIN\r\n",
        ] {
            for (user, pass) in [("joe", &nasty[..]), ("joe\r\nRSET", b"pw")] {
                let mode = Some(creds(user, pass));
                let mut m = BackendMachine::new(policy(BackendTls::None), mode);
                let mut sent = Vec::new();
                for reply in [
                    &b"220 mx\r\n"[..],
                    ehlo,
                    b"334 x\r\n",
                    b"334 x\r\n",
                    b"235 ok\r\n",
                ] {
                    m.receive(reply);
                    while let Some(a) = m.poll_action() {
                        if let BackendAction::Send(b) = a {
                            sent.push(b);
                        }
                    }
                }
                for line in &sent {
                    assert_eq!(
                        line.iter().filter(|b| **b == b'\n' || **b == b'\r').count(),
                        2,
                        "one line per Send: {line:?}"
                    );
                    assert!(line.ends_with(b"\r\n"));
                }
                let auth = sent.iter().filter(|l| l.starts_with(b"AUTH ")).count();
                assert_eq!(auth, 1, "{sent:?}");
                assert!(!sent
                    .iter()
                    .any(|l| l.starts_with(b"MAIL") || l.starts_with(b"RSET")));
            }
        }
    }

    #[test]
    fn helo_name_is_sanitized() {
        let mut p = policy(BackendTls::None);
        p.helo = "bad name\r\nRSET".into();
        let mut m = BackendMachine::new(p.clone(), Some(Credentials::bridged("joe".into())));
        assert_eq!(step(&mut m, b"220 mx\r\n").1, "C: EHLO badnameRSET\r\n");
        p.helo = "\r\n".into();
        let mut m = BackendMachine::new(p, Some(Credentials::bridged("joe".into())));
        assert_eq!(step(&mut m, b"220 mx\r\n").1, "C: EHLO localhost\r\n");
    }

    #[test]
    fn no_secret_in_debug() {
        let mode = Some(creds("joe", b"hunter2"));
        assert!(!format!("{mode:?}").contains("hunter2"));
        let mut m = BackendMachine::new(policy(BackendTls::None), mode.clone());
        step(&mut m, b"220 mx\r\n");
        step(&mut m, b"250-mx\r\n250 AUTH LOGIN\r\n");
        step(&mut m, b"334 VXNlcm5hbWU6\r\n");
        let debug = format!("{m:?}");
        assert!(debug.contains("joe"));
        assert!(!debug.contains("hunter2"), "{debug}");
        // The queued AUTH PLAIN line (the password in base64) is not shown.
        let mut m = BackendMachine::new(policy(BackendTls::None), mode);
        m.receive(b"220 mx\r\n");
        m.receive(b"250-mx\r\n250 AUTH PLAIN\r\n");
        let debug = format!("{m:?}");
        assert!(debug.contains("queued_actions: 2"), "{debug}");
        assert!(!debug.contains("Send"), "{debug}");
    }

    #[test]
    fn split_invariance() {
        let script: &[u8] = b"220-a\r\n220 b\r\n250-mx\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n220 go\r\n250-mx\r\n250 AUTH LOGIN\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 ok\r\n250 after\r\n";
        let run = |chunks: &[&[u8]]| {
            let mut m = BackendMachine::new(policy(BackendTls::StartTls), joe());
            let mut buf = Vec::new();
            let mut log = String::new();
            for c in chunks {
                buf.extend_from_slice(c);
                loop {
                    let n = m.receive(&buf);
                    buf.drain(..n);
                    while let Some(a) = m.poll_action() {
                        log.push_str(&format!("{a:?}"));
                        if a == BackendAction::StartTls {
                            m.tls_established();
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
            }
            (log, buf)
        };
        let whole = run(&[script]);
        assert!(whole.0.contains("LoggedIn"), "{whole:?}");
        assert_eq!(whole.1, b"250 after\r\n");
        for cut in 0..=script.len() {
            assert_eq!(run(&[&script[..cut], &script[cut..]]), whole, "cut {cut}");
        }
    }
}

//! The serde mirror of `routes.yaml`, and the one place that knows YAML.
//!
//! YAML is read with `serde_yaml_ng`, a maintained fork of the deprecated `serde_yaml`
//! (same data model and error type, still receiving fixes). `serde_path_to_error` gives
//! the key path of a type error; [`locate`] turns a key path into a line for the
//! validation errors found after parsing.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Host name used in greetings.
    pub hostname: Option<String>,
    /// Certificates served to clients.
    pub tls: Option<RawTls>,
    /// Client-facing listeners.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Backend pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, RawPool>,
    /// Routing rules, first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Prometheus endpoint.
    pub metrics: Option<RawMetrics>,
    /// User name handling.
    pub users: Option<RawUsers>,
    /// Protocol limits and timeouts.
    pub limits: Option<RawLimits>,
    /// Shutdown behaviour.
    pub shutdown: Option<RawShutdown>,
    /// Scheduled stages, each with its own routes.
    #[serde(default)]
    pub stages: Vec<RawStage>,
    /// What happens to open sessions of a user whose pool changes.
    pub on_move: Option<RawOnMove>,
    /// The admin endpoint (kick, hold, release, stragglers).
    pub admin: Option<RawAdmin>,
    /// Straggler tracking.
    pub stragglers: Option<RawStragglers>,
    /// Failed-login throttling.
    pub auth_throttle: Option<RawThrottle>,
    /// DNS for backend host names.
    pub dns: Option<RawDns>,
    /// Session worker threads (0 or absent: one per CPU).
    pub workers: Option<usize>,
    /// This proxy's name in a fleet (default: the host name).
    pub instance_name: Option<String>,
    /// PROXY protocol settings shared by the listeners that accept it.
    pub proxy_protocol: Option<RawProxyProtocol>,
    /// Shared state for a fleet of proxies.
    pub state: Option<RawState>,
    /// Named route lookups in the provider's database.
    #[serde(default)]
    pub lookups: BTreeMap<String, RawLookup>,
    /// Verify OAuth bearer tokens in cutover.
    pub oauth: Option<RawOAuth>,
    /// Zero-downtime binary upgrades.
    pub upgrade: Option<RawUpgrade>,
}

/// `upgrade:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpgrade {
    /// The Unix socket the running process hands its listening sockets over on.
    pub socket: String,
}

/// `oauth:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    /// A JWKS file (re-read when it changes).
    pub jwks_file: Option<String>,
    /// A JWKS URL (fetched, cached, refreshed).
    pub jwks_url: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud` (or one of them).
    pub audience: Option<String>,
    /// The claim holding the identity (default `email`).
    pub claim: Option<String>,
    /// Clock skew allowed for `exp` and `nbf` (default 60s).
    pub leeway: Option<String>,
    /// Refuse tokens without `exp` (default true).
    pub require_exp: Option<bool>,
    /// How often a `jwks_url` is fetched again (default 10m).
    pub refresh: Option<String>,
}

/// `lookups.NAME:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLookup {
    /// A PostgreSQL query.
    pub postgres: Option<RawPostgresLookup>,
    /// A Redis key.
    pub redis: Option<RawRedisLookup>,
    /// Deadline of one query (default 300ms).
    pub timeout: Option<String>,
    /// Answer cache.
    pub cache: Option<RawLookupCache>,
    /// `tempfail` (default) or `next`: what a login gets when the database cannot
    /// answer and nothing is cached.
    pub on_error: Option<String>,
    /// `failover` (default) or `strict`: when a pinned server is down.
    pub pinned: Option<String>,
}

/// `lookups.NAME.postgres:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgresLookup {
    /// Connection string (`postgres://user@host:5432/db?sslmode=require`).
    pub url: Option<String>,
    /// A file holding the connection string (it may carry a password).
    pub url_file: Option<String>,
    /// Parameterised query: `$1` is the normalized user name, `$2` (optional) the
    /// protocol. Returns a `pool` column (or the first column) and optionally `server`.
    pub query: String,
    /// Connections kept open (queries are pipelined on them; default 2).
    pub connections: Option<usize>,
    /// CA certificates (PEM) that sign the server's certificate, for `sslmode=require`
    /// (default: the system's roots).
    pub ca_file: Option<String>,
}

/// `lookups.NAME.redis:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisLookup {
    /// `redis://host:6379/0` (or `rediss://` for TLS).
    pub url: Option<String>,
    /// A file holding the URL.
    pub url_file: Option<String>,
    /// Key template; `{user}` is replaced by the normalized user name.
    pub key: String,
    /// CA certificates (PEM) that sign the server's certificate, for `rediss://`
    /// (default: the system's roots).
    pub ca_file: Option<String>,
}

/// `lookups.NAME.cache:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLookupCache {
    /// How long a found answer is used (default 60s; 0s: not cached).
    pub ttl: Option<String>,
    /// How long "no row" is used (default 10s).
    pub negative_ttl: Option<String>,
    /// Most answers kept (default 1000000).
    pub max_entries: Option<usize>,
    /// How long past its TTL an answer is still used while the database cannot answer
    /// (default 5m).
    pub stale_for: Option<String>,
}

/// `proxy_protocol:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    /// Networks (CIDR) allowed to send PROXY headers.
    #[serde(default)]
    pub trusted: Vec<String>,
    /// Longest wait for a header.
    pub timeout: Option<String>,
}

/// `state:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    /// Redis (or Valkey).
    pub redis: Option<RawRedis>,
}

/// `state.redis:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// One server: `redis://host:6379/0` (or `rediss://` for TLS).
    pub url: Option<String>,
    /// A file holding the URL (it may carry a password).
    pub url_file: Option<String>,
    /// A Redis Cluster instead.
    pub cluster: Option<RawRedisCluster>,
    /// Prefix of every key and channel (default `cutover:`).
    pub key_prefix: Option<String>,
    /// Deadline of every call (default 50ms).
    pub timeout: Option<String>,
}

/// `state.redis.cluster:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisCluster {
    /// Seed nodes.
    pub nodes: Vec<String>,
}

/// `dns:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// Name servers (ip:port) to ask instead of the system's /etc/resolv.conf.
    #[serde(default)]
    pub servers: Vec<String>,
}

/// One scheduled stage.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    /// Name (metric label, logs).
    pub name: String,
    /// RFC 3339 start time.
    pub from: String,
    /// Routes in force from then on.
    pub routes: Vec<RawRoute>,
}

/// `on_move:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOnMove {
    /// kick | keep
    pub action: Option<String>,
    /// Delay before kicking.
    pub grace: Option<String>,
}

/// `admin:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// host:port
    pub listen: String,
    /// File holding the bearer token (required off loopback).
    pub token_file: Option<String>,
    /// Longest time a held login waits before a temporary failure.
    pub hold_max_wait: Option<String>,
}

/// `stragglers:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStragglers {
    /// Most users remembered.
    pub max_users: Option<usize>,
}

/// `tls:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// First is the default; the others are chosen by SNI.
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
}

/// One certificate chain and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM chain, leaf first.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

/// One listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name (metrics label).
    pub name: String,
    /// imap | pop3 | smtp
    pub protocol: String,
    /// host:port
    pub listen: String,
    /// none | starttls | implicit
    pub tls: Option<String>,
    /// Allow authentication before TLS.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// SMTP only: `pop-before-smtp` accepts mail without AUTH from recent POP3/IMAP users.
    pub relay: Option<String>,
    /// With `relay: pop-before-smtp`: how recent the POP3/IMAP login must be.
    pub window: Option<String>,
    /// off | optional | required: connections start with a PROXY protocol header.
    pub proxy_protocol: Option<String>,
    /// SASL mechanisms offered: plain, login, oauthbearer, xoauth2.
    pub sasl: Option<Vec<String>>,
}

/// One pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// first | user-hash
    pub balance: Option<String>,
    /// e.g. "1s"
    pub connect_timeout: Option<String>,
    /// Deadline for a whole backend login (connect, TLS, greeting, replay).
    pub login_timeout: Option<String>,
    /// Health checking.
    pub health: Option<RawHealth>,
    /// When a server with many sessions dies, spread the client disconnects over this long.
    pub disconnect_spread: Option<String>,
    /// Keep using the last addresses of a host name this long past their TTL if DNS fails.
    pub dns_grace: Option<String>,
    /// Silence on a backend connection before TCP keepalive probes it (0s: off).
    pub keepalive: Option<String>,
    /// Tell backends the client's address (IMAP ID, SMTP XCLIENT).
    #[serde(default)]
    pub forward_client_address: bool,
    /// `v2`: send backends a PROXY protocol v2 header.
    pub proxy_protocol: Option<String>,
    /// normalized | original: which user name the backend receives.
    pub login_name: Option<String>,
    /// Counts as a legacy pool for the stragglers report (default: named "legacy").
    pub legacy: Option<bool>,
    /// IMAP servers.
    pub imap: Option<RawPoolProtocol>,
    /// POP3 servers.
    pub pop3: Option<RawPoolProtocol>,
    /// SMTP servers.
    pub smtp: Option<RawPoolProtocol>,
}

/// `health:` of a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Active check interval; "0s" disables active checks.
    pub interval: Option<String>,
    /// Consecutive successes to mark a server up.
    pub rise: Option<u32>,
    /// Consecutive failures to mark a server down.
    pub fall: Option<u32>,
    /// How long a passive failure keeps a server out of rotation.
    pub down_for: Option<String>,
}

/// The servers of one protocol in a pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoolProtocol {
    /// host:port, in failover order.
    pub servers: Vec<String>,
    /// none | starttls | implicit
    pub tls: Option<String>,
    /// CA bundle to verify the servers against (else the system roots).
    pub ca: Option<String>,
    /// Name to verify in the servers' certificates (else the host of each server).
    pub server_name: Option<String>,
    /// SMTP only: forward | pop-before-smtp
    pub auth: Option<String>,
}

/// One routing rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Exact user names.
    pub users: Option<Vec<String>>,
    /// Domains (the part after `@`).
    pub domains: Option<Vec<String>>,
    /// A file of user names, one per line.
    pub users_file: Option<String>,
    /// Stable share of users, 0..=100.
    pub percent: Option<u32>,
    /// Target pool (with `lookup`: the pool any row found means).
    pub pool: Option<String>,
    /// A named lookup (`lookups:`) that gives the pool, and maybe the server.
    pub lookup: Option<String>,
    /// Pool to try when every server of `pool` is unavailable.
    pub fallback: Option<String>,
    /// Also try the fallback when `pool` rejects the credentials.
    #[serde(default)]
    pub fallback_on_auth_failure: bool,
}

/// `metrics:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// host:port of the /metrics endpoint.
    pub listen: String,
}

/// `users:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsers {
    /// Domains stripped from user names before routing and backend login.
    #[serde(default)]
    pub local_domains: Vec<String>,
    /// Lowercase user names before routing and login.
    #[serde(default)]
    pub case_insensitive: bool,
}

/// `limits:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Longest pre-auth command line.
    pub max_line: Option<usize>,
    /// Largest pre-auth literal or SASL payload.
    pub max_literal: Option<usize>,
    /// Failed logins per connection.
    pub max_auth_failures: Option<u32>,
    /// Commands before login.
    pub max_commands: Option<u32>,
    /// Idle time allowed before login.
    pub preauth_timeout: Option<String>,
    /// Longest OAuth SASL response, in bytes of base64 as received.
    pub max_sasl_token: Option<usize>,
    /// Longest a client TLS handshake may take (implicit TLS or STARTTLS).
    pub tls_handshake_timeout: Option<String>,
    /// Client TLS handshakes in progress at once per worker.
    pub tls_handshakes_per_worker: Option<usize>,
    /// Client connections open at once, all listeners together.
    pub max_connections: Option<usize>,
    /// Client connections open at once from one address.
    pub max_connections_per_ip: Option<usize>,
}

/// `auth_throttle:` (password spraying).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThrottle {
    /// Failed logins from one address within `window` before it is blocked.
    pub ip_failures: Option<u32>,
    /// Failed logins for one user name within `window` before it is blocked.
    pub user_failures: Option<u32>,
    /// The window failures are counted in.
    pub window: Option<String>,
    /// How long a blocked address or user is refused.
    pub block: Option<String>,
    /// Delay before answering the first failed login; doubles with each further failure.
    pub delay: Option<String>,
    /// Longest delay.
    pub max_delay: Option<String>,
}

/// `shutdown:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// How long relayed sessions may continue after SIGTERM.
    pub drain_timeout: Option<String>,
}

/// Parses YAML text. On error returns (key path, line, column, message).
pub fn parse(text: &str) -> Result<RawConfig, (String, usize, usize, String)> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let (line, col) = inner
            .location()
            .map(|l| (l.line(), l.column()))
            .or_else(|| locate(text, &path))
            .unwrap_or((0, 0));
        (path, line, col, inner.to_string())
    })
}

/// Finds the line and column (1-based) of a key path such as `routes[2].pool` in YAML
/// text, for block style and for flow mappings written on one line. Best effort: returns
/// the deepest part of the path it could find.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found: Option<(usize, usize)> = None;
    // Search window: [start, end) lines, and the minimum indent of children.
    let mut start = 0usize;
    let mut end = lines.len();
    let mut parent_indent: isize = -1;
    for seg in split_path(path) {
        match seg {
            Seg::Key(key) => {
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().take(end).skip(start) {
                    let content = strip_comment(line);
                    let indent = content.len() - content.trim_start().len();
                    if (indent as isize) <= parent_indent && i > start && !content.trim().is_empty()
                    {
                        break;
                    }
                    if let Some(col) = find_key(content, key) {
                        hit = Some((i, col));
                        break;
                    }
                }
                let (i, col) = hit?;
                found = Some((i + 1, col + 1));
                let content = strip_comment(lines[i]);
                let indent = content.len() - content.trim_start().len();
                // Children are on this line (flow) or on deeper-indented lines below.
                parent_indent = indent as isize;
                start = i;
                end = block_end(&lines, i, indent);
            }
            Seg::Index(n) => {
                // The n-th "- " item below `start` at the first item indent seen.
                let mut count = 0usize;
                let mut item_indent: Option<usize> = None;
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().take(end).skip(start) {
                    let content = strip_comment(line);
                    let trimmed = content.trim_start();
                    let indent = content.len() - trimmed.len();
                    if trimmed.starts_with("- ") || trimmed == "-" {
                        if (indent as isize) < parent_indent {
                            break;
                        }
                        let want = *item_indent.get_or_insert(indent);
                        if indent == want {
                            if count == n {
                                hit = Some((i, indent));
                                break;
                            }
                            count += 1;
                        }
                    }
                }
                let (i, indent) = hit?;
                found = Some((i + 1, indent + 1));
                parent_indent = indent as isize;
                start = i;
                end = block_end(&lines, i, indent);
            }
        }
    }
    found
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(p) => (&part[..p], &part[p..]),
            None => (part, ""),
        };
        if !name.is_empty() && name != "?" {
            out.push(Seg::Key(name));
        }
        // `[n]` groups only; anything else after a name (odd keys) ends the path here.
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(close) = inner.find(']') else { break };
            if let Ok(n) = inner[..close].parse() {
                out.push(Seg::Index(n));
            }
            rest = &inner[close + 1..];
        }
    }
    out
}

fn strip_comment(line: &str) -> &str {
    // A '#' starts a comment when at the start or after whitespace and not inside quotes.
    let bytes = line.as_bytes();
    let mut quote: Option<u8> = None;
    for (i, &b) in bytes.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                return &line[..i];
            }
            None => {}
        }
    }
    line
}

/// Column of `key:` in a line, as a block key (`key:` after indentation or `- `) or a flow
/// key (after `{` or `,`).
fn find_key(content: &str, key: &str) -> Option<usize> {
    let pat = format!("{key}:");
    let mut from = 0;
    while let Some(pos) = content[from..].find(&pat) {
        let at = from + pos;
        let before = content[..at].trim_end();
        let ok = before.is_empty()
            || before.ends_with('{')
            || before.ends_with(',')
            || before.ends_with('-')
            || before.chars().all(|c| c == '-' || c.is_whitespace());
        let quoted_before = content[..at].ends_with('"') || content[..at].ends_with('\'');
        if ok && !quoted_before {
            return Some(at);
        }
        from = at + pat.len();
    }
    None
}

/// The line after the block that starts at line `at` (indented by `indent`): the next
/// non-empty line indented less, or a sibling at the same indent. Sequence items at the
/// same indent as a key line (`routes:` then `- ...`) are that key's children.
fn block_end(lines: &[&str], at: usize, indent: usize) -> usize {
    let at_is_item = strip_comment(lines[at]).trim_start().starts_with('-');
    for (i, line) in lines.iter().enumerate().skip(at + 1) {
        let content = strip_comment(line);
        if content.trim().is_empty() {
            continue;
        }
        let ind = content.len() - content.trim_start().len();
        let is_item = content.trim_start().starts_with('-');
        if ind < indent || (ind == indent && (at_is_item || !is_item)) {
            return i;
        }
    }
    lines.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
listeners:
  - { name: imap, protocol: imap, listen: \"127.0.0.1:11143\" }
  - name: imaps
    protocol: imap
    listen: \"127.0.0.1:11993\"
pools:
  new:
    imap: { servers: [\"127.0.0.10:143\"], tls: starttls }
routes:
  - { users: [joeuser], pool: new }
  - { pool: legacy }   # default
";

    #[test]
    fn locates_block_and_flow_keys() {
        assert_eq!(locate(SAMPLE, "routes[1].pool"), Some((11, 7)));
        assert_eq!(locate(SAMPLE, "routes[0].users"), Some((10, 7)));
        assert_eq!(locate(SAMPLE, "listeners[1].listen"), Some((5, 5)));
        assert_eq!(locate(SAMPLE, "listeners[0].listen"), Some((2, 35)));
        assert_eq!(locate(SAMPLE, "pools.new.imap.tls"), Some((8, 42)));
        assert_eq!(locate(SAMPLE, "pools.new"), Some((7, 3)));
    }

    #[test]
    fn odd_key_paths_do_not_panic() {
        for path in [
            "a[1]é]",
            "é[]",
            "[",
            "]",
            "a[",
            "a[x]",
            "a.[2].b",
            "routes[0]]",
        ] {
            let _ = locate(SAMPLE, path);
        }
    }

    #[test]
    fn type_errors_carry_path_and_line() {
        let text = "listeners:\n  - { name: a, protocol: imap, listen: x, bogus: 1 }\n";
        let (path, line, _, msg) = parse(text).unwrap_err();
        assert_eq!(path, "listeners[0].bogus");
        assert_eq!(line, 2);
        assert!(msg.contains("bogus"), "{msg}");
    }
}

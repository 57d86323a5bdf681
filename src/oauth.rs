//! OAuth 2.0 bearer tokens for SASL OAUTHBEARER (RFC 7628) and XOAUTH2: verifying a
//! signed JWT access token (RFC 7519, JWS compact form) against the identity provider's
//! JSON Web Key Set (JWKS, RFC 7517).
//!
//! [`Verifier::verify_with_keys`] is the whole decision and is pure: no I/O, no clock (the
//! time comes in as `now_unix`), so tests and fuzzing drive it directly. A [`Verifier`]
//! adds the key set: read from a file (re-read when its mtime or size changes; replace it
//! by renaming a complete file over it) or fetched over HTTPS (on first use, every
//! `refresh`, and at most once per 30 s when a token names a `kid` the set does not hold),
//! cached in memory. When a load fails the last good set stays in use and one warning is
//! logged per failure streak.
//!
//! # What is checked, in order
//! 1. Shape: at most [`MAX_TOKEN`] bytes, exactly three base64url parts (padding
//!    tolerated), a JSON header of at most 8 KiB encoded with a string `alg` and no
//!    `crit` (no JWS extension is implemented, so any critical one is refused).
//! 2. Algorithm: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA (Ed25519; also spelled
//!    `Ed25519`). `none`, HS* and anything else is [`TokenError::UnsupportedAlgorithm`].
//!    A key is only ever used with the algorithms of its own type (and only the one its
//!    JWK `alg` names, if it names one): no algorithm confusion, no public key used as an
//!    HMAC secret.
//! 3. Key: the keys with the token's `kid` when it has one, else every key of a fitting
//!    type. Header fields that point at keys elsewhere (`jku`, `jwk`, `x5u`, `x5c`) are
//!    ignored: keys come from the configured set only.
//! 4. Signature, then claims: `exp` (`now < exp + leeway`; a token without one is refused
//!    unless `require_exp` is off, as RFC 9068 makes it required of access tokens), `nbf` when
//!    present (`now + leeway >= nbf`), `iss` and `aud` when configured (`aud` a string or
//!    an array), and the identity claim: a non-empty string of at most 1024 bytes without
//!    control characters (it becomes a user name).
//!
//! No error text and no log line carries the token or a part of it: an unsupported `alg`
//! is reduced to a short label of harmless characters, and a key set's `Debug` shows key
//! ids and types only (private JWK members such as `d` are never even stored).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use rustls::client::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Default clock skew allowed for `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// Default interval between two fetches of a `jwks_url`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// Largest token accepted, in bytes.
pub const MAX_TOKEN: usize = 16 * 1024;
/// Largest key set accepted (file or HTTP body), in bytes.
pub const MAX_JWKS: usize = 1024 * 1024;

/// Largest encoded JOSE header.
const MAX_HEADER: usize = 8 * 1024;
/// Largest signature (RSA-8192).
const MAX_SIGNATURE: usize = 1024;
/// Keys kept from one set; more are skipped (a key-less token tries each fitting key,
/// so this bounds the work one token can cause).
const MAX_KEYS: usize = 64;
/// Largest identity claim value.
const MAX_IDENTITY: usize = 1024;
/// Least time between two fetches caused by unknown `kid`s (and between retries after a
/// failed fetch).
const KID_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Time allowed for one whole fetch: connect, TLS, request, response.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest HTTP response head.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// base64url without padding, tolerating padding on input (canonical trailing bits).
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// OAuth settings (the config module builds them from `oauth:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    /// Where the signing keys come from.
    pub jwks: JwksSource,
    /// The required `iss`, when set.
    pub issuer: Option<String>,
    /// When set, `aud` must equal it or, if an array, contain it.
    pub audience: Option<String>,
    /// The claim holding the identity, e.g. `email`, `preferred_username`, `sub`.
    pub claim: String,
    /// Clock skew allowed for `exp` and `nbf` ([`DEFAULT_LEEWAY`]).
    pub leeway: Duration,
    /// Refuse a token that has no `exp` (on by default: such a token, once leaked, would
    /// log in for ever).
    pub require_exp: bool,
    /// How often a `jwks_url` is fetched again ([`DEFAULT_REFRESH`]); a `jwks_file` is
    /// re-read when its mtime (or size) changes instead.
    pub refresh: Duration,
}

impl OAuthSettings {
    /// Settings with no issuer or audience check, `exp` required, and the default leeway and
    /// refresh.
    pub fn new(jwks: JwksSource, claim: impl Into<String>) -> OAuthSettings {
        OAuthSettings {
            jwks,
            issuer: None,
            audience: None,
            claim: claim.into(),
            leeway: DEFAULT_LEEWAY,
            require_exp: true,
            refresh: DEFAULT_REFRESH,
        }
    }
}

/// Where a key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local JWKS file, re-read when it changes.
    File(PathBuf),
    /// An `https://` URL (`http://` only to a loopback host, for tests), fetched with a
    /// GET and verified against the system roots. See [`check_url`].
    Url(String),
}

impl fmt::Display for JwksSource {
    /// The path, or the URL without user info, query or fragment (fit for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::File(p) => write!(f, "{}", p.display()),
            JwksSource::Url(u) => f.write_str(&redact_url(u)),
        }
    }
}

/// Why a token was refused. No variant carries token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed, bounded JWS compact token (or, from [`Jwks::parse`], not a
    /// JSON Web Key Set).
    #[error("malformed token or key set")]
    Malformed,
    /// No key of the set fits the token's `kid` and algorithm.
    #[error("no key in the key set fits the token's key id and algorithm")]
    UnknownKey,
    /// A fitting key was found, but the signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// The `alg` is not accepted (always the case for `none` and HS*); a short label of
    /// the name, reduced to harmless characters.
    #[error("unsupported token algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// There is no `exp`, and one is required.
    #[error("token has no expiry (exp)")]
    NoExpiry,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("token not valid yet")]
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// `aud` is missing or does not name the configured audience.
    #[error("token audience not accepted")]
    WrongAudience,
    /// The identity claim (named here) is missing, not a string, empty, too long or has
    /// control characters.
    #[error("token has no usable {0:?} claim")]
    MissingClaim(String),
    /// No key set has been loaded (or, from [`Jwks::parse`], the set holds no usable
    /// signing key).
    #[error("no OAuth signing keys available")]
    NoKeys,
}

/// Verified claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The value of the configured identity claim.
    pub identity: String,
    /// `exp`, when the token has one (seconds since the Unix epoch).
    pub expires_at: Option<i64>,
}

/// A key set that could not be loaded (no secret in it: a path, or a URL without user
/// info and query).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key set {origin}: {reason}")]
pub struct JwksError {
    /// The file or redacted URL.
    pub origin: String,
    /// What went wrong.
    pub reason: String,
}

// ---------------------------------------------------------------------------------------
// Algorithms and keys

/// The accepted JWS algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    fn from_name(name: &str) -> Option<Alg> {
        Some(match name {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            // RFC 8037, and the fully specified name of RFC 9864.
            "EdDSA" | "Ed25519" => Alg::EdDsa,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A refused `alg` as a short label of harmless characters (it comes from the token).
fn alg_label(name: &str) -> String {
    let label: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '.'))
        .take(16)
        .collect();
    if label.is_empty() {
        "?".to_string()
    } else {
        label
    }
}

/// Public key material, checked for size when parsed.
#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed point 0x04 || x || y.
    P256(Vec<u8>),
    /// Uncompressed point 0x04 || x || y.
    P384(Vec<u8>),
    /// The 32-byte public key.
    Ed25519(Vec<u8>),
}

impl Material {
    fn fits(&self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (
                Material::Rsa { .. },
                Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256 | Alg::Ps384 | Alg::Ps512
            ) | (Material::P256(_), Alg::Es256)
                | (Material::P384(_), Alg::Es384)
                | (Material::Ed25519(_), Alg::EdDsa)
        )
    }

    fn label(&self) -> String {
        match self {
            Material::Rsa { n, .. } => format!("RSA-{}", n.len() * 8),
            Material::P256(_) => "EC P-256".into(),
            Material::P384(_) => "EC P-384".into(),
            Material::Ed25519(_) => "Ed25519".into(),
        }
    }

    /// Whether `sig` is a valid signature of `msg` under this key with `alg`.
    fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            Material::Rsa { n, e } => {
                let params: &signature::RsaParameters = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                }
                .verify(params, msg, sig)
                .is_ok()
            }
            Material::P256(point) => {
                alg == Alg::Es256
                    && UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                        .verify(msg, sig)
                        .is_ok()
            }
            Material::P384(point) => {
                alg == Alg::Es384
                    && UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                        .verify(msg, sig)
                        .is_ok()
            }
            Material::Ed25519(x) => {
                alg == Alg::EdDsa
                    && UnparsedPublicKey::new(&signature::ED25519, x)
                        .verify(msg, sig)
                        .is_ok()
            }
        }
    }
}

/// One usable signing key.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: the only algorithm the key is used with.
    alg: Option<Alg>,
    material: Material,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg.map(Alg::name))
            .field("type", &self.material.label())
            .finish()
    }
}

/// The JWK members we read; others (including private ones) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn strip_leading_zeros(mut b: Vec<u8>) -> Vec<u8> {
    let zeros = b.iter().take_while(|&&x| x == 0).count();
    b.drain(..zeros);
    b
}

fn uncompressed(x: Vec<u8>, y: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(1 + x.len() + y.len());
    p.push(0x04);
    p.extend_from_slice(&x);
    p.extend_from_slice(y);
    p
}

impl Key {
    /// A usable signing key from one JWK, or None (wrong shape, not for signatures, an
    /// unsupported type, curve or `alg`, or a key of the wrong size).
    fn from_jwk(v: Value) -> Option<Key> {
        if !v.is_object() {
            return None;
        }
        let raw: RawJwk = serde_json::from_value(v).ok()?;
        if raw.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        let alg = match raw.alg.as_deref() {
            None => None,
            Some(a) => Some(Alg::from_name(a)?),
        };
        let dec = |s: Option<String>| B64.decode(s?).ok();
        let material = match raw.kty.as_str() {
            "RSA" => {
                let n = strip_leading_zeros(dec(raw.n)?);
                let e = strip_leading_zeros(dec(raw.e)?);
                // ring takes 2048 to 8192 bits, and exponents up to 33 bits.
                if !(256..=1024).contains(&n.len()) || e.is_empty() || e.len() > 5 {
                    return None;
                }
                Material::Rsa { n, e }
            }
            "EC" => {
                let (x, y) = (dec(raw.x)?, dec(raw.y)?);
                match (raw.crv.as_deref()?, x.len(), y.len()) {
                    ("P-256", 32, 32) => Material::P256(uncompressed(x, &y)),
                    ("P-384", 48, 48) => Material::P384(uncompressed(x, &y)),
                    _ => return None,
                }
            }
            "OKP" => {
                let x = dec(raw.x)?;
                match (raw.crv.as_deref()?, x.len()) {
                    ("Ed25519", 32) => Material::Ed25519(x),
                    _ => return None,
                }
            }
            _ => return None,
        };
        if alg.is_some_and(|a| !material.fits(a)) {
            return None;
        }
        Some(Key {
            kid: raw.kid,
            alg,
            material,
        })
    }

    fn fits(&self, alg: Alg) -> bool {
        self.material.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// A parsed key set: the usable signing keys of a JWKS (public keys only).
#[derive(Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Key>,
    skipped: usize,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks")
            .field("keys", &self.keys)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`), keeping its usable signing keys: RSA
    /// (2048 to 8192 bits), EC P-256 and P-384, OKP Ed25519, with `use` absent or `sig`
    /// and `alg` absent or supported; other keys are skipped and counted, and at most 64
    /// are kept. [`TokenError::Malformed`] if it is not such a document (or larger than
    /// [`MAX_JWKS`]), [`TokenError::NoKeys`] if no key is usable.
    pub fn parse(json: &[u8]) -> Result<Jwks, TokenError> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        if json.len() > MAX_JWKS {
            return Err(TokenError::Malformed);
        }
        let raw: RawSet = json_object(json)?;
        let mut keys = Vec::new();
        let mut skipped = 0;
        for v in raw.keys {
            match Key::from_jwk(v).filter(|_| keys.len() < MAX_KEYS) {
                Some(k) => keys.push(k),
                None => skipped += 1,
            }
        }
        if keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        Ok(Jwks { keys, skipped })
    }

    /// The number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is usable (never true for a set from [`Jwks::parse`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The number of keys of the document that were not usable (or over the limit).
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

// ---------------------------------------------------------------------------------------
// The pure verification

/// The JOSE header members we read.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// A token whose shape, header and algorithm are acceptable, signature not yet checked.
struct Parsed<'a> {
    alg: Alg,
    kid: Option<String>,
    /// `header.payload`, the signing input.
    signed: &'a str,
    payload: &'a str,
    signature: Vec<u8>,
}

/// Deserializes a JSON object only (serde would also build a struct from an array). Into
/// a struct, a duplicate member is refused (so a duplicated `alg` or `kid` cannot mean two
/// things); into a map, the last one wins.
fn json_object<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, TokenError> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(TokenError::Malformed);
    }
    serde_json::from_slice(json).map_err(|_| TokenError::Malformed)
}

fn b64(part: &str, max_encoded: usize) -> Result<Vec<u8>, TokenError> {
    if part.is_empty() || part.len() > max_encoded {
        return Err(TokenError::Malformed);
    }
    B64.decode(part).map_err(|_| TokenError::Malformed)
}

/// Checks everything that needs no key: shape, header and algorithm.
fn parse_token(token: &str) -> Result<Parsed<'_>, TokenError> {
    if token.len() > MAX_TOKEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: Header = json_object(&b64(h, MAX_HEADER)?)?;
    if header.crit.is_some() {
        return Err(TokenError::Malformed);
    }
    let alg = Alg::from_name(&header.alg)
        .ok_or_else(|| TokenError::UnsupportedAlgorithm(alg_label(&header.alg)))?;
    if p.is_empty() {
        return Err(TokenError::Malformed);
    }
    // ceil(1024 * 4 / 3) characters, plus room for tolerated padding.
    let signature = b64(s, MAX_SIGNATURE / 3 * 4 + 8)?;
    Ok(Parsed {
        alg,
        kid: header.kid,
        signed: &token[..h.len() + 1 + p.len()],
        payload: p,
        signature,
    })
}

/// A NumericDate claim: None when absent, Malformed when not a number. Fractions are
/// cut off; values beyond i64 saturate.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                match n.as_f64() {
                    // `as` saturates; NaN cannot come out of JSON.
                    Some(f) if f.is_finite() => Ok(Some(f.floor() as i64)),
                    _ => Err(TokenError::Malformed),
                }
            }
        }
        Some(_) => Err(TokenError::Malformed),
    }
}

fn check_claims(
    parsed: &Parsed<'_>,
    settings: &OAuthSettings,
    now: i64,
) -> Result<Verified, TokenError> {
    let payload = b64(parsed.payload, MAX_TOKEN)?;
    let claims: Map<String, Value> = json_object(&payload)?;
    let leeway = i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = numeric_date(&claims, "exp")?;
    match exp {
        Some(exp) if now >= exp.saturating_add(leeway) => return Err(TokenError::Expired),
        None if settings.require_exp => return Err(TokenError::NoExpiry),
        _ => {}
    }
    if numeric_date(&claims, "nbf")?.is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
        return Err(TokenError::NotYetValid);
    }
    if let Some(issuer) = &settings.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
    }
    if let Some(audience) = &settings.audience {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !ok {
            return Err(TokenError::WrongAudience);
        }
    }
    let identity = claims
        .get(&settings.claim)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= MAX_IDENTITY && !s.chars().any(char::is_control))
        .ok_or_else(|| TokenError::MissingClaim(settings.claim.clone()))?;
    Ok(Verified {
        identity: identity.to_string(),
        expires_at: exp,
    })
}

/// The signature with the fitting keys, then the claims.
fn check_with(
    keys: &Jwks,
    settings: &OAuthSettings,
    parsed: &Parsed<'_>,
    now: i64,
) -> Result<Verified, TokenError> {
    if keys.is_empty() {
        return Err(TokenError::NoKeys);
    }
    let mut candidates = keys
        .keys
        .iter()
        .filter(|k| k.fits(parsed.alg))
        .filter(|k| parsed.kid.is_none() || k.kid == parsed.kid)
        .peekable();
    if candidates.peek().is_none() {
        return Err(TokenError::UnknownKey);
    }
    let signed = parsed.signed.as_bytes();
    if !candidates.any(|k| k.material.verify(parsed.alg, signed, &parsed.signature)) {
        return Err(TokenError::BadSignature);
    }
    check_claims(parsed, settings, now)
}

// ---------------------------------------------------------------------------------------
// The verifier and its key set

/// A verifier with its cached key set; cheap to clone and share (an `Arc` inside).
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OAuthSettings,
    /// The key set in use (the last good one).
    keys: RwLock<Option<Arc<Jwks>>>,
    /// Loading state; held across a load, so one load runs at a time.
    load: tokio::sync::Mutex<LoadState>,
}

#[derive(Default)]
struct LoadState {
    /// URL: when the last fetch started.
    last_fetch: Option<Instant>,
    /// File: the mtime and size of the last read (successful or not).
    file_stamp: Option<FileStamp>,
    /// In a failure streak (warned once).
    failing: bool,
    /// The TLS client settings (system roots), built on the first HTTPS fetch.
    tls: Option<Arc<ClientConfig>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("settings", &self.inner.settings)
            .field("keys", &self.current())
            .finish()
    }
}

/// What a load attempt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Regular: first use, file check, periodic URL refresh.
    Due,
    /// A token named a `kid` the set does not hold.
    UnknownKid,
}

impl Verifier {
    /// A verifier; loads nothing yet (the first [`Verifier::verify`] or
    /// [`Verifier::preload`] does).
    pub fn new(settings: OAuthSettings) -> Verifier {
        Verifier {
            inner: Arc::new(Inner {
                settings,
                keys: RwLock::new(None),
                load: tokio::sync::Mutex::new(LoadState::default()),
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &OAuthSettings {
        &self.inner.settings
    }

    /// Verifies a token at `now_unix`, loading or refreshing the key set as needed. A
    /// token that fails on its shape or algorithm costs no I/O.
    pub async fn verify(&self, token: &str, now_unix: i64) -> Result<Verified, TokenError> {
        let parsed = parse_token(token)?;
        self.refresh(Why::Due).await;
        let keys = self.current().ok_or(TokenError::NoKeys)?;
        match check_with(&keys, &self.inner.settings, &parsed, now_unix) {
            Err(TokenError::UnknownKey)
                if parsed.kid.is_some()
                    && matches!(self.inner.settings.jwks, JwksSource::Url(_)) =>
            {
                if !self.refresh(Why::UnknownKid).await {
                    return Err(TokenError::UnknownKey);
                }
                let keys = self.current().ok_or(TokenError::NoKeys)?;
                check_with(&keys, &self.inner.settings, &parsed, now_unix)
            }
            r => r,
        }
    }

    /// Verifies a token against a given key set: pure, for tests and fuzzing.
    pub fn verify_with_keys(
        keys: &Jwks,
        settings: &OAuthSettings,
        token: &str,
        now_unix: i64,
    ) -> Result<Verified, TokenError> {
        let parsed = parse_token(token)?;
        check_with(keys, settings, &parsed, now_unix)
    }

    /// Loads the key set now, whether due or not (for start-up and `check`): the number
    /// of usable keys, or why it failed (the last good set, if any, stays in use).
    pub async fn preload(&self) -> Result<usize, JwksError> {
        let mut st = self.inner.load.lock().await;
        let (result, _) = self.load(&mut st).await;
        result
    }

    /// The key set in use.
    fn current(&self) -> Option<Arc<Jwks>> {
        match self.inner.keys.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn install(&self, keys: Jwks) {
        let keys = Some(Arc::new(keys));
        match self.inner.keys.write() {
            Ok(mut g) => *g = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
    }

    /// Loads the key set if that is due; true when a changed set was installed. While
    /// a set is in use, a load already under way elsewhere is not waited for.
    async fn refresh(&self, why: Why) -> bool {
        let mut st = if self.current().is_some() {
            match self.inner.load.try_lock() {
                Ok(st) => st,
                Err(_) => return false,
            }
        } else {
            self.inner.load.lock().await
        };
        match &self.inner.settings.jwks {
            JwksSource::File(path) => match tokio::fs::metadata(path).await {
                Ok(m) if st.file_stamp == Some(FileStamp::of(&m)) => return false,
                Ok(_) => {}
                Err(e) => {
                    st.file_stamp = None;
                    self.failed(&mut st, e.to_string());
                    return false;
                }
            },
            JwksSource::Url(_) => {
                let wait = match why {
                    Why::UnknownKid => KID_REFRESH_MIN,
                    Why::Due if st.failing => self.inner.settings.refresh.min(KID_REFRESH_MIN),
                    Why::Due => self.inner.settings.refresh,
                };
                if st.last_fetch.is_some_and(|t| t.elapsed() < wait) {
                    return false;
                }
            }
        }
        self.load(&mut st).await.1
    }

    /// One load attempt, installed or logged: (the key count or error, whether the set
    /// in use changed).
    async fn load(&self, st: &mut LoadState) -> (Result<usize, JwksError>, bool) {
        let origin = self.inner.settings.jwks.to_string();
        let bytes = match &self.inner.settings.jwks {
            JwksSource::File(path) => read_file(path).await.map(|(stamp, bytes)| {
                st.file_stamp = Some(stamp);
                bytes
            }),
            JwksSource::Url(url) => {
                st.last_fetch = Some(Instant::now());
                self.fetch(st, url).await
            }
        };
        let parsed = bytes.and_then(|b| {
            Jwks::parse(&b).map_err(|e| match e {
                TokenError::NoKeys => {
                    "no usable signing key (RSA, EC P-256/P-384, Ed25519)".to_string()
                }
                _ => "not a JSON Web Key Set".to_string(),
            })
        });
        match parsed {
            Ok(keys) => {
                let n = keys.len();
                let changed = self.current().is_none_or(|old| *old != keys);
                if st.failing {
                    tracing::info!(source = %origin, keys = n, "oauth: key set loaded again");
                } else if changed {
                    tracing::info!(source = %origin, keys = n, skipped = keys.skipped, "oauth: key set loaded");
                } else {
                    tracing::debug!(source = %origin, keys = n, "oauth: key set unchanged");
                }
                st.failing = false;
                if changed {
                    self.install(keys);
                }
                (Ok(n), changed)
            }
            Err(reason) => {
                let err = JwksError { origin, reason };
                self.failed(st, err.reason.clone());
                (Err(err), false)
            }
        }
    }

    /// Logs a failed load: a warning at the start of a streak, then debug.
    fn failed(&self, st: &mut LoadState, reason: String) {
        let source = self.inner.settings.jwks.to_string();
        let in_use = self.current().map_or(0, |k| k.len());
        if st.failing {
            tracing::debug!(%source, error = %reason, "oauth: key set still cannot be loaded");
        } else {
            tracing::warn!(%source, error = %reason, keys_in_use = in_use,
                "oauth: cannot load the key set; keeping the last good one");
        }
        st.failing = true;
    }

    async fn fetch(&self, st: &mut LoadState, url: &str) -> Result<Vec<u8>, String> {
        let url = JwksUrl::parse(url)?;
        let tls = if url.https {
            match &st.tls {
                Some(c) => Some(c.clone()),
                None => {
                    let c = crate::tls::client_config(None).map_err(|e| e.to_string())?;
                    st.tls = Some(c.clone());
                    Some(c)
                }
            }
        } else {
            None
        };
        fetch(&url, tls).await
    }
}

async fn read_file(path: &Path) -> Result<(FileStamp, Vec<u8>), String> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    let stamp = FileStamp::of(&file.metadata().await.map_err(|e| e.to_string())?);
    let mut bytes = Vec::new();
    file.take(MAX_JWKS as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    if bytes.len() > MAX_JWKS {
        return Err("larger than 1 MiB".into());
    }
    Ok((stamp, bytes))
}

// ---------------------------------------------------------------------------------------
// Fetching a JWKS over HTTP(S)

/// Checks a `jwks_url` as [`Verifier`] will use it: `https://host[:port]/path` (no user
/// info; visible ASCII only), or `http://` to a loopback host (`localhost`, 127.0.0.0/8,
/// `[::1]`) for tests.
pub fn check_url(url: &str) -> Result<(), String> {
    JwksUrl::parse(url).map(|_| ())
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct JwksUrl {
    https: bool,
    /// Name or IP address, without brackets.
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    path: String,
}

impl JwksUrl {
    fn parse(url: &str) -> Result<JwksUrl, String> {
        if url.is_empty() || !url.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a URL has visible ASCII characters only".into());
        }
        let (https, rest) = if let Some(r) = strip_prefix_ci(url, "https://") {
            (true, r)
        } else if let Some(r) = strip_prefix_ci(url, "http://") {
            (false, r)
        } else {
            return Err("not an https:// URL".into());
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("user info in the URL is not supported".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("not an IPv6 address in [ ]".into());
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("junk after ] in the host")?),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("no host in the URL".into());
        }
        let port = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or("bad port in the URL")?,
        };
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !https && !loopback {
            return Err("http:// is only allowed to a loopback host; use https://".into());
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Ok(JwksUrl {
            https,
            host: host.to_string(),
            port,
            path,
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.https, self.port) {
            (true, 443) | (false, 80) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// A URL for logs: without user info, query or fragment.
fn redact_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            let host = authority.rsplit('@').next().unwrap_or_default();
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// GET the URL (bounded to [`MAX_JWKS`] and [`FETCH_TIMEOUT`]); the body of a 200.
async fn fetch(url: &JwksUrl, tls: Option<Arc<ClientConfig>>) -> Result<Vec<u8>, String> {
    let work = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json, application/jwk-set+json\r\nUser-Agent: cutover/{}\r\nConnection: close\r\n\r\n",
            url.path,
            url.host_header(),
            env!("CARGO_PKG_VERSION"),
        );
        match tls {
            Some(config) => {
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|e| format!("server name: {e}"))?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                exchange(stream, &request).await
            }
            None => exchange(tcp, &request).await,
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| "no complete answer within 5 s".to_string())?
}

/// Sends the request, reads the response (bounded) and returns its body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &str,
) -> Result<Vec<u8>, String> {
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // TLS peers that close without close_notify; the framing still decides.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(format!("read: {e}")),
        };
        if n == 0 {
            return parse_response(&buf, true)?.ok_or_else(|| "truncated response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_JWKS + MAX_RESPONSE_HEAD {
            return Err("response larger than 1 MiB".into());
        }
        if let Some(body) = parse_response(&buf, false)? {
            return Ok(body);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The body of a complete `200` response in `buf`; None while more is needed (never
/// when `eof`). Content-Length, chunked and close-delimited bodies.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Vec<u8>>, String> {
    let more = || {
        if eof {
            Err("truncated response".to_string())
        } else {
            Ok(None)
        }
    };
    let head_area = &buf[..buf.len().min(MAX_RESPONSE_HEAD + 4)];
    let Some(head_len) = find(head_area, b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        return more();
    };
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| "response head not text")?;
    let mut lines = head.split("\r\n");
    let mut status = lines.next().unwrap_or_default().split(' ');
    if !status.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err("not an HTTP/1 response".into());
    }
    let code = status.next().unwrap_or_default();
    if code != "200" {
        let code: String = code.chars().filter(char::is_ascii_digit).take(3).collect();
        return Err(format!("HTTP status {code}"));
    }
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| "bad Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err("unsupported Transfer-Encoding".into());
            }
        }
    }
    let body = &buf[head_len + 4..];
    if chunked {
        // Decode only once the end can be there (the last chunk and an empty line).
        if !eof && !body.ends_with(b"\r\n\r\n") {
            return Ok(None);
        }
        return match dechunk(body)? {
            Some(b) => Ok(Some(b)),
            None => more(),
        };
    }
    match length {
        Some(n) if n > MAX_JWKS => Err("response larger than 1 MiB".into()),
        Some(n) if body.len() >= n => Ok(Some(body[..n].to_vec())),
        Some(_) => more(),
        None if eof => Ok(Some(body.to_vec())),
        None => Ok(None),
    }
}

/// Decodes a chunked body; None if incomplete.
fn dechunk(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let Some(end) = find(&data[i..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&data[i..i + end]).map_err(|_| "bad chunk size")?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "bad chunk size")?;
        i += end + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let Some(end) = find(&data[i..], b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(out));
                }
                i += end + 2;
            }
        }
        if size > MAX_JWKS.saturating_sub(out.len()) {
            return Err("response larger than 1 MiB".into());
        }
        let Some(chunk) = data.get(i..i + size) else {
            return Ok(None);
        };
        out.extend_from_slice(chunk);
        i += size;
        match data.get(i..i + 2) {
            None => return Ok(None),
            Some(b"\r\n") => i += 2,
            Some(_) => return Err("bad chunk framing".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::net::TcpListener;

    const NOW: i64 = 1_700_000_000;
    const ISS: &str = "https://idp.example";

    enum Signer {
        Rsa(RsaKeyPair),
        Ec(EcdsaKeyPair),
        Ed(Ed25519KeyPair),
    }

    struct TestKey {
        kid: &'static str,
        signer: Signer,
        jwk: Value,
    }

    fn enc(b: &[u8]) -> String {
        B64.encode(b)
    }

    fn rsa_key(kid: &'static str) -> TestKey {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/oauth/rsa2048-key.pem"
        ))
        .unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let kp = RsaKeyPair::from_pkcs8(&der).unwrap();
        let c: RsaPublicKeyComponents<Vec<u8>> = kp.public_key().into();
        let jwk = json!({"kty": "RSA", "kid": kid, "use": "sig", "n": enc(&c.n), "e": enc(&c.e)});
        TestKey {
            kid,
            signer: Signer::Rsa(kp),
            jwk,
        }
    }

    fn ec_key(kid: &'static str, p384: bool) -> TestKey {
        let rng = SystemRandom::new();
        let alg = if p384 {
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING
        } else {
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING
        };
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap();
        let point = kp.public_key().as_ref();
        let half = (point.len() - 1) / 2;
        let jwk = json!({
            "kty": "EC", "kid": kid, "crv": if p384 { "P-384" } else { "P-256" },
            "x": enc(&point[1..1 + half]), "y": enc(&point[1 + half..]),
        });
        TestKey {
            kid,
            signer: Signer::Ec(kp),
            jwk,
        }
    }

    fn ed_key(kid: &'static str) -> TestKey {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwk =
            json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": enc(kp.public_key().as_ref())});
        TestKey {
            kid,
            signer: Signer::Ed(kp),
            jwk,
        }
    }

    fn jwks_json(keys: &[&TestKey]) -> Vec<u8> {
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
            .to_string()
            .into_bytes()
    }

    fn jwks(keys: &[&TestKey]) -> Jwks {
        Jwks::parse(&jwks_json(keys)).unwrap()
    }

    /// Signs `header.payload` (raw JSON texts) with `key` under `alg`.
    fn sign_raw(key: &TestKey, alg: &str, header: &[u8], payload: &[u8]) -> String {
        let input = format!("{}.{}", enc(header), enc(payload));
        let rng = SystemRandom::new();
        let sig = match &key.signer {
            Signer::Rsa(kp) => {
                let pad: &'static dyn signature::RsaEncoding = match alg {
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; kp.public_modulus_len()];
                kp.sign(pad, &rng, input.as_bytes(), &mut sig).unwrap();
                sig
            }
            Signer::Ec(kp) => kp.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            Signer::Ed(kp) => kp.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", enc(&sig))
    }

    fn sign(key: &TestKey, alg: &str, claims: &Value) -> String {
        let header = json!({"alg": alg, "typ": "JWT", "kid": key.kid});
        sign_raw(
            key,
            alg,
            header.to_string().as_bytes(),
            claims.to_string().as_bytes(),
        )
    }

    fn claims() -> Value {
        json!({
            "iss": ISS, "aud": "cutover", "sub": "248289761001",
            "email": "joe@example.net", "exp": NOW + 300, "nbf": NOW - 10, "iat": NOW - 10,
        })
    }

    fn with(mut v: Value, key: &str, value: Value) -> Value {
        v[key] = value;
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        v.as_object_mut().unwrap().remove(key);
        v
    }

    fn settings() -> OAuthSettings {
        OAuthSettings {
            jwks: JwksSource::File("/nonexistent/jwks.json".into()),
            issuer: Some(ISS.into()),
            audience: Some("cutover".into()),
            claim: "email".into(),
            leeway: DEFAULT_LEEWAY,
            require_exp: true,
            refresh: DEFAULT_REFRESH,
        }
    }

    fn check(keys: &Jwks, token: &str) -> Result<Verified, TokenError> {
        Verifier::verify_with_keys(keys, &settings(), token, NOW)
    }

    fn ok(identity: &str) -> Result<Verified, TokenError> {
        Ok(Verified {
            identity: identity.into(),
            expires_at: Some(NOW + 300),
        })
    }

    #[test]
    fn valid_tokens_of_every_algorithm() {
        let (rsa, p256, p384, ed) = (
            rsa_key("r"),
            ec_key("p256", false),
            ec_key("p384", true),
            ed_key("ed"),
        );
        let keys = jwks(&[&rsa, &p256, &p384, &ed]);
        assert_eq!(keys.len(), 4);
        for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
            assert_eq!(
                check(&keys, &sign(&rsa, alg, &claims())),
                ok("joe@example.net"),
                "{alg}"
            );
        }
        assert_eq!(
            check(&keys, &sign(&p256, "ES256", &claims())),
            ok("joe@example.net")
        );
        assert_eq!(
            check(&keys, &sign(&p384, "ES384", &claims())),
            ok("joe@example.net")
        );
        assert_eq!(
            check(&keys, &sign(&ed, "EdDSA", &claims())),
            ok("joe@example.net")
        );
        assert_eq!(
            check(&keys, &sign(&ed, "Ed25519", &claims())),
            ok("joe@example.net")
        );
        // Another identity claim; no exp at all: refused unless exp is not required.
        let mut s = settings();
        s.claim = "sub".into();
        let t = sign(&p256, "ES256", &without(claims(), "exp"));
        assert_eq!(
            Verifier::verify_with_keys(&keys, &s, &t, NOW),
            Err(TokenError::NoExpiry)
        );
        s.require_exp = false;
        assert_eq!(
            Verifier::verify_with_keys(&keys, &s, &t, NOW),
            Ok(Verified {
                identity: "248289761001".into(),
                expires_at: None
            })
        );
        // Padding is tolerated: on the signature, and on header and payload when the
        // signer signed them so (the signing input is the text as sent).
        let pad = |p: &str| format!("{p}{}", "=".repeat((4 - p.len() % 4) % 4));
        let t = sign(&ed, "EdDSA", &claims());
        let (signed, sig) = t.rsplit_once('.').unwrap();
        assert_eq!(
            check(&keys, &format!("{signed}.{}", pad(sig))),
            ok("joe@example.net")
        );
        let padded: Vec<String> = t.split('.').map(pad).collect();
        assert_eq!(
            check(&keys, &padded.join(".")),
            Err(TokenError::BadSignature)
        );
        let Signer::Ed(kp) = &ed.signer else {
            unreachable!()
        };
        let input = format!("{}.{}", padded[0], padded[1]);
        let resigned = format!("{input}.{}", pad(&enc(kp.sign(input.as_bytes()).as_ref())));
        assert_eq!(check(&keys, &resigned), ok("joe@example.net"));
    }

    #[test]
    fn tampered_tokens_fail_the_signature() {
        let (rsa, p256, ed) = (rsa_key("r"), ec_key("p", false), ed_key("e"));
        let keys = jwks(&[&rsa, &p256, &ed]);
        for (key, alg) in [(&rsa, "RS256"), (&p256, "ES256"), (&ed, "EdDSA")] {
            let token = sign(key, alg, &claims());
            let (signed, sig) = token.rsplit_once('.').unwrap();
            let mut sig = B64.decode(sig).unwrap();
            sig[5] ^= 0x01;
            assert_eq!(
                check(&keys, &format!("{signed}.{}", enc(&sig))),
                Err(TokenError::BadSignature),
                "{alg}"
            );
            // A changed payload under the original signature.
            let (h, rest) = token.split_once('.').unwrap();
            let (_, s) = rest.split_once('.').unwrap();
            let forged = with(claims(), "email", json!("admin@example.net"));
            let forged = format!("{h}.{}.{s}", enc(forged.to_string().as_bytes()));
            assert_eq!(
                check(&keys, &forged),
                Err(TokenError::BadSignature),
                "{alg}"
            );
            // Truncated signature.
            let short = format!("{signed}.{}", enc(&sig[..sig.len() - 1]));
            assert_eq!(check(&keys, &short), Err(TokenError::BadSignature), "{alg}");
        }
        // Signed by a key of the right type that is not in the set, same kid.
        let other = ec_key("p", false);
        assert_eq!(
            check(&keys, &sign(&other, "ES256", &claims())),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn expiry_and_not_before_with_leeway() {
        let k = ec_key("k", false);
        let keys = jwks(&[&k]);
        let t = |c: Value| check(&keys, &sign(&k, "ES256", &c));
        assert_eq!(
            t(with(claims(), "exp", json!(NOW - 61))),
            Err(TokenError::Expired)
        );
        assert_eq!(
            t(with(claims(), "exp", json!(NOW - 60))),
            Err(TokenError::Expired)
        );
        assert_eq!(
            t(with(claims(), "exp", json!(NOW - 30))).map(|v| v.expires_at),
            Ok(Some(NOW - 30))
        );
        assert_eq!(
            t(with(claims(), "exp", json!(1e300))).map(|v| v.expires_at),
            Ok(Some(i64::MAX))
        );
        assert_eq!(
            t(with(claims(), "exp", json!((NOW - 61) as f64 + 0.5))),
            Err(TokenError::Expired)
        );
        assert_eq!(
            t(with(claims(), "exp", json!("tomorrow"))),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            t(with(claims(), "nbf", json!(NOW + 61))),
            Err(TokenError::NotYetValid)
        );
        assert!(t(with(claims(), "nbf", json!(NOW + 30))).is_ok());
        assert_eq!(
            t(with(claims(), "nbf", json!(null))),
            Err(TokenError::Malformed)
        );
        let mut strict = settings();
        strict.leeway = Duration::ZERO;
        let at = |c: Value| Verifier::verify_with_keys(&keys, &strict, &sign(&k, "ES256", &c), NOW);
        assert_eq!(
            at(with(claims(), "exp", json!(NOW))),
            Err(TokenError::Expired)
        );
        assert!(at(with(claims(), "exp", json!(NOW + 1))).is_ok());
        assert_eq!(
            at(with(claims(), "nbf", json!(NOW + 1))),
            Err(TokenError::NotYetValid)
        );
        assert!(at(with(claims(), "nbf", json!(NOW))).is_ok());
        // Extreme clocks and leeways saturate instead of overflowing.
        let mut wide = settings();
        wide.leeway = Duration::MAX;
        let t = sign(&k, "ES256", &with(claims(), "exp", json!(i64::MAX)));
        assert!(Verifier::verify_with_keys(&keys, &wide, &t, 0).is_ok());
        assert!(Verifier::verify_with_keys(&keys, &wide, &t, i64::MAX).is_err());
    }

    #[test]
    fn issuer_and_audience() {
        let k = ed_key("k");
        let keys = jwks(&[&k]);
        let t = |c: Value| check(&keys, &sign(&k, "EdDSA", &c));
        assert_eq!(
            t(with(claims(), "iss", json!("https://evil.example"))),
            Err(TokenError::WrongIssuer)
        );
        assert_eq!(
            t(with(claims(), "iss", json!(["https://idp.example"]))),
            Err(TokenError::WrongIssuer)
        );
        assert_eq!(t(without(claims(), "iss")), Err(TokenError::WrongIssuer));
        assert_eq!(
            t(with(claims(), "aud", json!("other"))),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            t(with(claims(), "aud", json!(["a", "b"]))),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            t(with(claims(), "aud", json!([]))),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            t(with(claims(), "aud", json!(7))),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(t(without(claims(), "aud")), Err(TokenError::WrongAudience));
        assert!(t(with(claims(), "aud", json!(["a", "cutover"]))).is_ok());
        // Nothing configured: nothing checked.
        let mut open = settings();
        open.issuer = None;
        open.audience = None;
        let c = without(without(claims(), "iss"), "aud");
        assert!(Verifier::verify_with_keys(&keys, &open, &sign(&k, "EdDSA", &c), NOW).is_ok());
    }

    #[test]
    fn the_identity_claim_must_be_usable() {
        let k = ed_key("k");
        let keys = jwks(&[&k]);
        let t = |c: Value| check(&keys, &sign(&k, "EdDSA", &c));
        let missing = Err(TokenError::MissingClaim("email".into()));
        assert_eq!(t(without(claims(), "email")), missing);
        assert_eq!(t(with(claims(), "email", json!(42))), missing);
        assert_eq!(t(with(claims(), "email", json!(null))), missing);
        assert_eq!(t(with(claims(), "email", json!(""))), missing);
        assert_eq!(
            t(with(claims(), "email", json!("joe\r\nA1 LOGOUT"))),
            missing
        );
        assert_eq!(t(with(claims(), "email", json!("joe\u{0}"))), missing);
        assert_eq!(t(with(claims(), "email", json!("x".repeat(1025)))), missing);
        assert_eq!(
            t(with(claims(), "email", json!("jöe@example.net"))),
            ok("jöe@example.net")
        );
    }

    #[test]
    fn keys_are_matched_by_kid_and_type() {
        let (a, b, r) = (ec_key("a", false), ed_key("b"), rsa_key("r"));
        let keys = jwks(&[&a, &b, &r]);
        // A kid the set does not hold.
        let stranger = ec_key("zzz", false);
        assert_eq!(
            check(&keys, &sign(&stranger, "ES256", &claims())),
            Err(TokenError::UnknownKey)
        );
        // A kid of a key of another type (algorithm confusion): no fitting key.
        let hdr = json!({"alg": "ES256", "kid": "r"}).to_string();
        let t = sign_raw(&a, "ES256", hdr.as_bytes(), claims().to_string().as_bytes());
        assert_eq!(check(&keys, &t), Err(TokenError::UnknownKey));
        // No kid: every key of the type is tried.
        let hdr = json!({"alg": "ES256"}).to_string();
        let t = sign_raw(&a, "ES256", hdr.as_bytes(), claims().to_string().as_bytes());
        assert!(check(&keys, &t).is_ok());
        let two = jwks(&[&ec_key("x", false), &a]);
        assert!(check(&two, &t).is_ok());
        let t = sign_raw(
            &stranger,
            "ES256",
            hdr.as_bytes(),
            claims().to_string().as_bytes(),
        );
        assert_eq!(check(&two, &t), Err(TokenError::BadSignature));
        let hdr = json!({"alg": "ES384"}).to_string();
        let p384 = ec_key("q", true);
        let t = sign_raw(
            &p384,
            "ES384",
            hdr.as_bytes(),
            claims().to_string().as_bytes(),
        );
        assert_eq!(check(&two, &t), Err(TokenError::UnknownKey));
        // A JWK that names its alg is used with that alg only.
        let mut pinned = rsa_key("r");
        pinned.jwk["alg"] = json!("RS512");
        let keys = jwks(&[&pinned]);
        assert_eq!(
            check(&keys, &sign(&pinned, "RS256", &claims())),
            Err(TokenError::UnknownKey)
        );
        assert!(check(&keys, &sign(&pinned, "RS512", &claims())).is_ok());
        // An empty set (only constructible in here): NoKeys.
        let empty = Jwks {
            keys: vec![],
            skipped: 0,
        };
        assert_eq!(
            check(&empty, &sign(&a, "ES256", &claims())),
            Err(TokenError::NoKeys)
        );
    }

    #[test]
    fn none_hmac_and_unknown_algorithms_are_refused() {
        let r = rsa_key("r");
        let keys = jwks(&[&r]);
        let payload = enc(claims().to_string().as_bytes());
        let none = format!("{}.{payload}.", enc(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            check(&keys, &none),
            Err(TokenError::UnsupportedAlgorithm("none".into()))
        );
        let none = format!("{}.{payload}.", enc(br#"{"alg":"None","kid":"r"}"#));
        assert_eq!(
            check(&keys, &none),
            Err(TokenError::UnsupportedAlgorithm("None".into()))
        );
        // HS256 "signed" with the RSA public key as the secret: the classic confusion.
        let header = enc(br#"{"alg":"HS256","kid":"r"}"#);
        let input = format!("{header}.{payload}");
        let n = B64.decode(r.jwk["n"].as_str().unwrap()).unwrap();
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &n),
            input.as_bytes(),
        );
        let hs = format!("{input}.{}", enc(tag.as_ref()));
        assert_eq!(
            check(&keys, &hs),
            Err(TokenError::UnsupportedAlgorithm("HS256".into()))
        );
        for alg in ["HS384", "HS512", "ES512", "RS1", "rs256", ""] {
            let h = enc(json!({"alg": alg}).to_string().as_bytes());
            let t = format!("{h}.{payload}.{}", enc(&[1; 64]));
            assert!(
                matches!(check(&keys, &t), Err(TokenError::UnsupportedAlgorithm(_))),
                "{alg}"
            );
        }
        // The label is short and harmless.
        let h = enc(
            json!({"alg": format!("X\r\n\u{1b}[31m{}", "A".repeat(500))})
                .to_string()
                .as_bytes(),
        );
        let Err(TokenError::UnsupportedAlgorithm(label)) =
            check(&keys, &format!("{h}.{payload}.AA"))
        else {
            panic!("not refused");
        };
        assert_eq!(label, "X31mAAAAAAAAAAAA");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let k = ed_key("k");
        let keys = jwks(&[&k]);
        let good = sign(&k, "EdDSA", &claims());
        let (h, rest) = good.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let hdr = |j: &str| enc(j.as_bytes());
        let cases: Vec<String> = vec![
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            "abc".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}.{s}"),
            format!("{h}.{p}.{s}."),
            format!("{h}..{s}"),
            format!(".{p}.{s}"),
            format!("{h}.{p}.!!!"),
            format!("{h}.{p}.{s}x"),
            format!("*{h}.{p}.{s}"),
            format!("{}.{p}.{s}", hdr("not json")),
            format!("{}.{p}.{s}", hdr("[\"EdDSA\"]")),
            format!("{}.{p}.{s}", hdr(r#"{"alg": 256}"#)),
            format!("{}.{p}.{s}", hdr(r#"{"typ": "JWT"}"#)),
            format!("{}.{p}.{s}", hdr(r#"{"alg": "EdDSA", "kid": 7}"#)),
            format!("{}.{p}.{s}", hdr(r#"{"alg": "EdDSA", "alg": "EdDSA"}"#)),
            format!(
                "{}.{p}.{s}",
                hdr(r#"{"alg": "EdDSA", "crit": ["exp"], "exp": 1}"#)
            ),
            format!(
                "{}.{p}.{s}",
                hdr(&format!(
                    r#"{{"alg": "EdDSA", "x": "{}"}}"#,
                    "a".repeat(7000)
                ))
            ),
            format!(
                "{}.{p}.{s}",
                hdr(&format!("{}{}", "[".repeat(2000), "]".repeat(2000)))
            ),
            format!("{h}.{p}.{}", "A".repeat(2000)),
            format!("{h}.{p}.{s}{}", "=".repeat(10)),
            "a".repeat(MAX_TOKEN + 1),
            format!("{h}.{p}.{s}{}", " ".repeat(MAX_TOKEN)),
            format!(" {good}"),
        ];
        for (i, t) in cases.iter().enumerate() {
            assert_eq!(check(&keys, t), Err(TokenError::Malformed), "case {i}");
        }
        // Signed, but the payload is not a JSON object.
        let hdr = json!({"alg": "EdDSA", "kid": "k"}).to_string();
        for payload in [
            &b"not json"[..],
            b"[1,2]",
            b"\"str\"",
            b"{\"email\": \"a\"} x",
        ] {
            let t = sign_raw(&k, "EdDSA", hdr.as_bytes(), payload);
            assert_eq!(check(&keys, &t), Err(TokenError::Malformed));
        }
    }

    /// A tiny xorshift, so the mutation test is deterministic.
    struct Rng(u64);
    impl Rng {
        fn step(&mut self) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 as usize
        }
    }

    #[test]
    fn mutated_tokens_never_panic_and_never_pass() {
        let (k, r) = (ec_key("k", false), rsa_key("r"));
        let keys = jwks(&[&k, &r]);
        let good = [sign(&k, "ES256", &claims()), sign(&r, "RS256", &claims())];
        let alphabet = b"AZaz09-_.=!{}\"\x00\xff";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let mut t = good[round % 2].clone().into_bytes();
            for _ in 0..1 + rng.step() % 4 {
                if t.is_empty() {
                    break;
                }
                let i = rng.step() % t.len();
                match rng.step() % 4 {
                    0 => t[i] = alphabet[rng.step() % alphabet.len()],
                    1 => {
                        t.remove(i);
                    }
                    2 => t.insert(i, alphabet[rng.step() % alphabet.len()]),
                    _ => t.truncate(i),
                }
            }
            let t = String::from_utf8_lossy(&t).into_owned();
            if t != good[round % 2] {
                let r = check(&keys, &t);
                // Padding-only changes can keep the token valid; nothing else can.
                if r.is_ok() {
                    assert_eq!(t.replace('=', ""), good[round % 2], "{t}");
                }
            }
        }
        // Random garbage with dots.
        for _ in 0..3000 {
            let len = rng.step() % 200;
            let t: String = (0..len)
                .map(|_| ['.', 'e', 'y', 'J', '_', '-', '='][rng.step() % 7])
                .collect();
            assert!(check(&keys, &t).is_err());
        }
    }

    #[test]
    fn jwks_parsing_keeps_usable_signing_keys_only() {
        let (r, e, d) = (rsa_key("r"), ec_key("e", false), ed_key("d"));
        let mut enc_key = ec_key("enc", false).jwk;
        enc_key["use"] = json!("enc");
        let mut short_rsa = r.jwk.clone();
        short_rsa["n"] = json!(enc(&[0xff; 128]));
        let mut bad_b64 = e.jwk.clone();
        bad_b64["x"] = json!("***");
        let mut p521 = e.jwk.clone();
        p521["crv"] = json!("P-521");
        let mut wrong_alg = d.jwk.clone();
        wrong_alg["alg"] = json!("RS256");
        let mut odd_kid = d.jwk.clone();
        odd_kid["kid"] = json!(12);
        let mut leading_zero = r.jwk.clone();
        let mut n = vec![0u8, 0];
        n.extend(B64.decode(r.jwk["n"].as_str().unwrap()).unwrap());
        leading_zero["n"] = json!(enc(&n));
        leading_zero["kid"] = json!("r0");
        let doc = json!({"keys": [
            r.jwk.clone(), e.jwk.clone(), d.jwk.clone(), enc_key, short_rsa, bad_b64, p521, wrong_alg, odd_kid, leading_zero,
            {"kty": "oct", "k": "c2VjcmV0"}, {"kty": "RSA"}, "string", 5, null, {},
        ]});
        let keys = Jwks::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!((keys.len(), keys.skipped()), (4, 12));
        let hdr = json!({"alg": "RS256", "kid": "r0"}).to_string();
        assert!(check(
            &keys,
            &sign_raw(&r, "RS256", hdr.as_bytes(), claims().to_string().as_bytes())
        )
        .is_ok());
        for bad in [
            &b""[..],
            b"{}",
            b"[]",
            b"{\"keys\": {}}",
            b"not json",
            b"{\"keys\": [] } x",
        ] {
            assert_eq!(
                Jwks::parse(bad),
                Err(TokenError::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(Jwks::parse(b"{\"keys\": []}"), Err(TokenError::NoKeys));
        assert_eq!(
            Jwks::parse(b"{\"keys\": [{\"kty\":\"oct\",\"k\":\"AA\"}]}"),
            Err(TokenError::NoKeys)
        );
        let huge = format!("{{\"keys\": [], \"pad\": \"{}\"}}", "a".repeat(MAX_JWKS));
        assert_eq!(Jwks::parse(huge.as_bytes()), Err(TokenError::Malformed));
        // At most MAX_KEYS are kept.
        let many: Vec<Value> = (0..MAX_KEYS + 5).map(|_| e.jwk.clone()).collect();
        let keys = Jwks::parse(json!({ "keys": many }).to_string().as_bytes()).unwrap();
        assert_eq!((keys.len(), keys.skipped()), (MAX_KEYS, 5));
    }

    #[test]
    fn no_token_or_private_key_text_in_errors_or_debug() {
        let k = ed_key("kid-1");
        let mut jwk = k.jwk.clone();
        jwk["d"] = json!("PRIVATEPARTNEVERSHOWN");
        let keys = Jwks::parse(json!({ "keys": [jwk] }).to_string().as_bytes()).unwrap();
        let debug = format!("{keys:?}");
        assert!(
            debug.contains("kid-1") && debug.contains("Ed25519"),
            "{debug}"
        );
        assert!(
            !debug.contains("PRIVATE") && !debug.contains(k.jwk["x"].as_str().unwrap()),
            "{debug}"
        );
        let v = Verifier::new(settings());
        v.install(keys.clone());
        let debug = format!("{v:?}");
        assert!(
            !debug.contains("PRIVATE") && debug.contains("kid-1"),
            "{debug}"
        );
        let good = sign(&k, "EdDSA", &claims());
        let tokens = [
            sign(&k, "EdDSA", &with(claims(), "exp", json!(0))),
            sign(&k, "EdDSA", &with(claims(), "iss", json!("x"))),
            sign(&k, "EdDSA", &without(claims(), "email")),
            sign(&ed_key("kid-1"), "EdDSA", &claims()),
            sign(&ed_key("other"), "EdDSA", &claims()),
            good.replace('.', "!"),
            format!("{good}.x"),
        ];
        for t in &tokens {
            let e = check(&keys, t).unwrap_err();
            for text in [e.to_string(), format!("{e:?}")] {
                for part in t.split(['.', '!']).filter(|p| p.len() > 4) {
                    assert!(!text.contains(part), "{text}");
                }
                assert!(!text.contains("joe@example.net"), "{text}");
            }
        }
        // Redacted URLs for logs.
        let src = JwksSource::Url("https://user:pw@idp.example:8443/keys?secret=1#x".into());
        assert_eq!(src.to_string(), "https://idp.example:8443/keys");
    }

    #[test]
    fn jwks_urls() {
        let u = JwksUrl::parse("https://idp.example/.well-known/jwks.json").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.path.as_str()),
            (true, "idp.example", 443, "/.well-known/jwks.json")
        );
        assert_eq!(u.host_header(), "idp.example");
        let u = JwksUrl::parse("HTTPS://idp.example:8443?x=1#frag").unwrap();
        assert_eq!(
            (u.port, u.path.as_str(), u.host_header().as_str()),
            (8443, "/?x=1", "idp.example:8443")
        );
        let u = JwksUrl::parse("http://[::1]:8080/k").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.host_header().as_str()),
            (false, "::1", "[::1]:8080")
        );
        assert!(JwksUrl::parse("http://127.0.0.9/k").is_ok());
        assert!(JwksUrl::parse("http://localhost:1/k").is_ok());
        assert!(check_url("https://idp.example").is_ok());
        for bad in [
            "",
            "idp.example/jwks",
            "ftp://idp.example/",
            "http://idp.example/jwks",
            "http://10.0.0.1/",
            "https://",
            "https://:443/",
            "https://u:p@idp.example/",
            "https://idp.example:0/",
            "https://idp.example:99999/",
            "https://idp.example:x/",
            "https://[::1/",
            "https://[nope]/",
            "https://[::1]x/",
            "https://idp.example/a b",
            "https://idp.example/\r\nX: y",
            "https://idp.example/ü",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_responses() {
        let ok = |r: &str, eof| parse_response(r.as_bytes(), eof);
        let body = Some(b"{}".to_vec());
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", false),
            Ok(body.clone())
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}junk", false),
            Ok(body.clone())
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}", false),
            Ok(None)
        );
        assert!(ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}", true).is_err());
        assert_eq!(ok("HTTP/1.0 200 OK\r\n\r\n{}", false), Ok(None));
        assert_eq!(ok("HTTP/1.0 200 OK\r\n\r\n{}", true), Ok(body.clone()));
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=1\r\n{\r\n1\r\n}\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(ok(chunked, false), Ok(body.clone()));
        assert_eq!(ok(&chunked[..chunked.len() - 2], false), Ok(None));
        assert!(ok(&chunked[..chunked.len() - 2], true).is_err());
        assert!(ok(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            false
        )
        .is_err());
        assert!(ok(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n",
            false
        )
        .is_err());
        assert!(ok(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n\r\n\r\n",
            true
        )
        .is_err());
        assert!(ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", true).is_err());
        assert_eq!(
            ok("HTTP/1.1 404 Not Found\r\n\r\n", true),
            Err("HTTP status 404".into())
        );
        assert_eq!(
            ok("HTTP/1.1 301 Moved\r\nLocation: x\r\n\r\n", false),
            Err("HTTP status 301".into())
        );
        assert!(ok("SSH-2.0-OpenSSH\r\n\r\n", true).is_err());
        assert!(ok(
            "HTTP/1.1 200 OK\r\nContent-Length: 9999999999\r\n\r\n",
            false
        )
        .is_err());
        assert!(ok(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            false
        )
        .is_err());
        assert_eq!(ok("HTTP/1.1 200 OK\r\nContent-", false), Ok(None));
        assert!(ok("HTTP/1.1 200 OK\r\nContent-", true).is_err());
        assert!(parse_response(&vec![b'a'; MAX_RESPONSE_HEAD + 10], false).is_err());
    }

    #[tokio::test]
    async fn jwks_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!(
            "cutover-oauth-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        let _ = std::fs::remove_file(&path);
        let (a, b) = (ec_key("a", false), ed_key("b"));
        let (ta, tb) = (sign(&a, "ES256", &claims()), sign(&b, "EdDSA", &claims()));
        let mut s = settings();
        s.jwks = JwksSource::File(path.clone());
        let v = Verifier::new(s);
        // No file yet.
        assert_eq!(v.verify(&ta, NOW).await, Err(TokenError::NoKeys));
        assert!(v.preload().await.is_err());
        // Malformed tokens fail before any load.
        assert_eq!(v.verify("x.y", NOW).await, Err(TokenError::Malformed));
        let write = |keys: &[u8], mtime: u64| {
            std::fs::write(&path, keys).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
                .unwrap();
        };
        write(&jwks_json(&[&a]), 1_000);
        assert_eq!(v.verify(&ta, NOW).await, ok("joe@example.net"));
        assert_eq!(v.verify(&tb, NOW).await, Err(TokenError::UnknownKey));
        write(&jwks_json(&[&b]), 2_000);
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        assert_eq!(v.verify(&ta, NOW).await, Err(TokenError::UnknownKey));
        // A broken file: the last good set stays.
        write(b"{\"keys\": [", 3_000);
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        assert!(v.preload().await.is_err());
        // The file disappears: still the last good set.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        // Back, with both keys.
        write(&jwks_json(&[&a, &b]), 4_000);
        assert_eq!(v.verify(&ta, NOW).await, ok("joe@example.net"));
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        assert_eq!(v.preload().await, Ok(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What the test HTTP server answers.
    #[derive(Clone)]
    enum Answer {
        Json(Vec<u8>),
        Chunked(Vec<u8>),
        Status(u16),
    }

    struct Server {
        addr: std::net::SocketAddr,
        answer: Arc<Mutex<Answer>>,
        requests: Arc<AtomicUsize>,
    }

    impl Server {
        fn set(&self, a: Answer) {
            *self.answer.lock().unwrap() = a;
        }
        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, answer: Answer) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while find(&buf, b"\r\n\r\n").is_none() {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        assert!(
            buf.starts_with(b"GET /jwks.json HTTP/1.1\r\nHost: 127.0.0.1:"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        let resp = match answer {
            Answer::Json(b) => {
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()).into_bytes();
                r.extend(b);
                r
            }
            Answer::Chunked(b) => {
                let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for c in b.chunks(100) {
                    r.extend(format!("{:x}\r\n", c.len()).into_bytes());
                    r.extend(c);
                    r.extend(b"\r\n");
                }
                r.extend(b"0\r\n\r\n");
                r
            }
            Answer::Status(code) => {
                format!("HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\n\r\n").into_bytes()
            }
        };
        let _ = s.write_all(&resp).await;
        let _ = s.shutdown().await;
    }

    async fn server(answer: Answer, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, r) = (answer.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                r.fetch_add(1, Ordering::SeqCst);
                let answer = a.lock().unwrap().clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(sock).await {
                                respond(s, answer).await;
                            }
                        }
                        None => respond(sock, answer).await,
                    }
                });
            }
        });
        Server {
            addr,
            answer,
            requests,
        }
    }

    impl Verifier {
        /// Test hook: pretend the last fetch was `by` earlier.
        async fn age_last_fetch(&self, by: Duration) {
            let mut st = self.inner.load.lock().await;
            st.last_fetch = st.last_fetch.map(|t| t.checked_sub(by).unwrap());
        }
    }

    #[tokio::test]
    async fn jwks_url_is_fetched_cached_and_refreshed() {
        let (a, b) = (ec_key("a", false), rsa_key("b"));
        let (ta, tb) = (sign(&a, "ES256", &claims()), sign(&b, "RS256", &claims()));
        let srv = server(Answer::Json(jwks_json(&[&a])), None).await;
        let mut s = settings();
        s.jwks = JwksSource::Url(format!("http://{}/jwks.json", srv.addr));
        let v = Verifier::new(s);
        // Malformed tokens and refused algorithms cost no fetch.
        assert_eq!(v.verify("a.b", NOW).await, Err(TokenError::Malformed));
        assert_eq!(srv.requests(), 0);
        // First use: one fetch for many concurrent logins.
        let logins: Vec<_> = (0..8)
            .map(|_| {
                let (v, t) = (v.clone(), ta.clone());
                tokio::spawn(async move { v.verify(&t, NOW).await })
            })
            .collect();
        for l in logins {
            assert_eq!(l.await.unwrap(), ok("joe@example.net"));
        }
        assert_eq!(srv.requests(), 1);
        assert_eq!(v.verify(&ta, NOW).await, ok("joe@example.net"));
        assert_eq!(srv.requests(), 1);
        // A new kid: not fetched again within 30 s of the last fetch.
        srv.set(Answer::Chunked(jwks_json(&[&a, &b])));
        assert_eq!(v.verify(&tb, NOW).await, Err(TokenError::UnknownKey));
        assert_eq!(srv.requests(), 1);
        v.age_last_fetch(Duration::from_secs(31)).await;
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        assert_eq!(srv.requests(), 2);
        // Unknown kids again: at most one fetch per 30 s.
        let tc = sign(&ec_key("c", false), "ES256", &claims());
        for _ in 0..3 {
            assert_eq!(v.verify(&tc, NOW).await, Err(TokenError::UnknownKey));
        }
        assert_eq!(srv.requests(), 2);
        v.age_last_fetch(Duration::from_secs(31)).await;
        assert_eq!(v.verify(&tc, NOW).await, Err(TokenError::UnknownKey));
        assert_eq!(srv.requests(), 3);
        // The server fails: the last good set stays in use.
        srv.set(Answer::Status(500));
        v.age_last_fetch(Duration::from_secs(601)).await;
        assert_eq!(v.verify(&ta, NOW).await, ok("joe@example.net"));
        assert_eq!(srv.requests(), 4);
        assert!(v
            .preload()
            .await
            .unwrap_err()
            .to_string()
            .contains("HTTP status 500"));
        srv.set(Answer::Json(b"<html>".to_vec()));
        v.age_last_fetch(Duration::from_secs(31)).await;
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        assert_eq!(srv.requests(), 6);
        // Periodic refresh: a rotated set replaces the old one.
        srv.set(Answer::Json(jwks_json(&[&b])));
        v.age_last_fetch(Duration::from_secs(601)).await;
        assert_eq!(v.verify(&ta, NOW).await, Err(TokenError::UnknownKey));
        assert_eq!(v.verify(&tb, NOW).await, ok("joe@example.net"));
        assert_eq!(srv.requests(), 7);
    }

    #[tokio::test]
    async fn jwks_url_unreachable_gives_no_keys() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let k = ed_key("k");
        let mut s = settings();
        s.jwks = JwksSource::Url(format!("http://{addr}/jwks.json"));
        let v = Verifier::new(s);
        assert_eq!(
            v.verify(&sign(&k, "EdDSA", &claims()), NOW).await,
            Err(TokenError::NoKeys)
        );
        // A URL that is not allowed: no keys, and it says why.
        let mut s = settings();
        s.jwks = JwksSource::Url("http://idp.example/jwks.json".into());
        let v = Verifier::new(s);
        assert_eq!(
            v.verify(&sign(&k, "EdDSA", &claims()), NOW).await,
            Err(TokenError::NoKeys)
        );
        assert!(v.preload().await.unwrap_err().reason.contains("loopback"));
    }

    #[tokio::test]
    async fn jwks_url_over_https() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let certs = crate::tls::load_certs(&dir.join("proxy.pem")).unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("proxy-key.pem")).unwrap();
        let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let k = rsa_key("k");
        let srv = server(
            Answer::Chunked(jwks_json(&[&k])),
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg))),
        )
        .await;
        let mut s = settings();
        s.jwks = JwksSource::Url(format!("https://{}/jwks.json", srv.addr));
        let v = Verifier::new(s);
        v.inner.load.lock().await.tls =
            Some(crate::tls::client_config(Some(&dir.join("ca.pem"))).unwrap());
        assert_eq!(
            v.verify(&sign(&k, "RS256", &claims()), NOW).await,
            ok("joe@example.net")
        );
        assert_eq!(srv.requests(), 1);
        // A server the roots do not vouch for: refused.
        let other = tempfile_ca();
        let v2 = Verifier::new(v.settings().clone());
        v2.inner.load.lock().await.tls = Some(crate::tls::client_config(Some(&other)).unwrap());
        let err = v2.preload().await.unwrap_err();
        assert!(err.reason.starts_with("TLS"), "{err}");
        assert_eq!(srv.requests(), 2);
    }

    /// A CA file that did not sign the demo certificates: the untrusted test certificate.
    fn tempfile_ca() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/untrusted.pem")
    }

    #[test]
    fn verify_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        let v = Verifier::new(settings());
        send(&v.verify("t", 0));
        send(&v.preload());
    }
}

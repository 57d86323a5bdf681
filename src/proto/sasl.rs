//! SASL helpers shared by the three protocols: base64 and the PLAIN message (RFC 4616).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::{Credentials, Mechanism, Secret};

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
}

/// Decodes base64 (whitespace is not allowed, as in IMAP/POP3/SMTP SASL exchanges).
pub fn decode_base64(input: &[u8]) -> Result<Vec<u8>, SaslError> {
    STANDARD.decode(input).map_err(|_| SaslError::Base64)
}

/// Encodes base64.
pub fn encode_base64(input: &[u8]) -> String {
    STANDARD.encode(input)
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
    Ok(Credentials {
        user,
        secret: Secret::new(pass.to_vec()),
        mechanism: Mechanism::Plain,
    })
}

/// Builds the PLAIN message `NUL user NUL password`, base64 encoded, for a backend.
/// The intermediate buffer is wiped. Returns `None` if the password contains NUL (PLAIN
/// cannot carry it).
pub fn encode_plain(creds: &Credentials) -> Option<String> {
    let pass = creds.secret.expose();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_round_trip() {
        let creds = Credentials {
            user: "joe".into(),
            secret: Secret::new(b"s3cret".to_vec()),
            mechanism: Mechanism::Plain,
        };
        let enc = encode_plain(&creds).unwrap();
        assert_eq!(enc, "AGpvZQBzM2NyZXQ=");
        let back = parse_plain(decode_base64(enc.as_bytes()).unwrap()).unwrap();
        assert_eq!(back.user, "joe");
        assert_eq!(back.secret.expose(), b"s3cret");
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
    }
}

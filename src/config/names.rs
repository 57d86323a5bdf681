//! User names as routing sees them: normalization, and the stable hash behind `percent`
//! rules, `user-hash` balancing and cohort sets. Here, in the configuration layer, because
//! validation normalizes cohort files the same way routing normalizes logins.

use super::Users;

/// Normalizes a user name: trims surrounding white space, lowercases it when
/// `case_insensitive` is set, and strips `@domain` when the domain is local.
pub fn normalize(users: &Users, raw: &str) -> String {
    let mut user = raw.trim().to_string();
    if users.case_insensitive {
        user = user.to_lowercase();
    }
    if let Some((local, domain)) = user.rsplit_once('@') {
        if !local.is_empty()
            && users
                .local_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
        {
            user = local.to_string();
        }
    }
    user
}

/// FNV-1a 64 over `salt:user`. Pinned by golden tests: changing it would move users
/// between pools on upgrade, so it is not std's `DefaultHasher` (whose algorithm is
/// unspecified).
pub fn stable_hash(salt: &[u8], user: &str) -> u64 {
    salt.iter()
        .chain(b":")
        .chain(user.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The bucket (0..100) a user falls in for `percent` rules.
pub fn bucket(user: &str) -> u8 {
    (stable_hash(b"percent", user) % 100) as u8
}

//! A set of user names built for big cohorts: one contiguous string arena plus a sorted
//! index of (hash, offset, length). A million names take about 16 bytes of index each
//! plus the names themselves, load in well under a second, and are looked up with a
//! binary search and one string comparison.

use std::fmt;

/// An immutable set of normalized user names.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UserSet {
    arena: String,
    index: Vec<(u64, u32, u32)>,
}

impl fmt::Debug for UserSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserSet({} users)", self.index.len())
    }
}

fn hash(name: &str) -> u64 {
    crate::config::stable_hash(b"userset", name)
}

impl UserSet {
    /// Builds a set from names (already normalized). Duplicates are kept once.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<UserSet, String> {
        let mut set = UserSet::default();
        for name in names {
            set.push(name)?;
        }
        Ok(set.finish())
    }

    pub(crate) fn push(&mut self, name: &str) -> Result<(), String> {
        let offset = u32::try_from(self.arena.len())
            .map_err(|_| "user list larger than 4 GiB".to_string())?;
        let len = u32::try_from(name.len()).map_err(|_| "user name too long".to_string())?;
        self.arena.push_str(name);
        self.index.push((hash(name), offset, len));
        Ok(())
    }

    /// Sorts and deduplicates after adding.
    pub(crate) fn finish(mut self) -> UserSet {
        let arena = std::mem::take(&mut self.arena);
        let key = |e: &(u64, u32, u32)| (e.0, set_name(&arena, e));
        self.index.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
        self.index.dedup_by(|a, b| key(a) == key(b));
        self.arena = arena;
        self.arena.shrink_to_fit();
        self.index.shrink_to_fit();
        self
    }

    /// Reads a cohort file: one name per line, `#` starts a comment, blank lines ignored;
    /// each name goes through `normalize`. Returns the set, or (line number, message).
    pub fn parse_file(
        text: &str,
        normalize: impl Fn(&str) -> String,
    ) -> Result<UserSet, (usize, String)> {
        let mut set = UserSet::default();
        set.add_lines(text, normalize)?;
        Ok(set.finish())
    }

    /// Adds the names of a cohort file (see [`UserSet::parse_file`]); call
    /// [`UserSet::finish`] when done adding.
    pub(crate) fn add_lines(
        &mut self,
        text: &str,
        normalize: impl Fn(&str) -> String,
    ) -> Result<(), (usize, String)> {
        self.arena.reserve(text.len());
        self.index.reserve(text.len() / 8);
        for (n, raw) in text.lines().enumerate() {
            let line = match raw.find('#') {
                Some(p) => &raw[..p],
                None => raw,
            }
            .trim();
            if line.is_empty() {
                continue;
            }
            if line.chars().any(char::is_whitespace) {
                return Err((
                    n + 1,
                    format!("{line:?}: one user name per line, without spaces"),
                ));
            }
            self.push(&normalize(line)).map_err(|e| (n + 1, e))?;
        }
        Ok(())
    }

    /// True if `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        let h = hash(name);
        let start = self.index.partition_point(|e| e.0 < h);
        self.index[start..]
            .iter()
            .take_while(|e| e.0 == h)
            .any(|e| set_name(&self.arena, e) == name)
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Approximate heap bytes used.
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity() + self.index.capacity() * std::mem::size_of::<(u64, u32, u32)>()
    }
}

fn set_name<'a>(arena: &'a str, e: &(u64, u32, u32)) -> &'a str {
    arena.get(e.1 as usize..(e.1 + e.2) as usize).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_and_comments() {
        let set = UserSet::parse_file("# wave 1\njoeuser\n  Alice  # vip\n\nbob\njoeuser\n", |s| {
            s.to_lowercase()
        })
        .unwrap();
        assert_eq!(set.len(), 3);
        assert!(set.contains("joeuser") && set.contains("alice") && set.contains("bob"));
        assert!(!set.contains("Alice") && !set.contains("carol") && !set.contains(""));
        assert_eq!(UserSet::parse_file("a b\n", |s| s.into()).unwrap_err().0, 1);
    }

    #[test]
    fn a_million_names() {
        let text: String = (0..1_000_000)
            .map(|i| format!("user{i:07}@example.net\n"))
            .collect();
        let t = std::time::Instant::now();
        let set = UserSet::parse_file(&text, |s| s.to_string()).unwrap();
        let took = t.elapsed();
        assert_eq!(set.len(), 1_000_000);
        assert!(set.contains("user0999999@example.net"));
        assert!(!set.contains("user1000000@example.net"));
        // Memory bound (the time bound is measured in release by the bench; here only
        // reported, debug builds are slow).
        assert!(
            set.heap_bytes() < 100 * 1024 * 1024,
            "{} bytes",
            set.heap_bytes()
        );
        eprintln!(
            "1M names: {:?}, {} MB",
            took,
            set.heap_bytes() / (1024 * 1024)
        );
    }
}

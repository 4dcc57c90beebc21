//! Release ordering: `version_code` (a u64 that strictly increases per product and channel)
//! decides what is newer; the semver `version` is for people and for minimum-version checks.

use std::cmp::Ordering;

use semver::Version;

/// Longest version string accepted.
pub const MAX_VERSION_LEN: usize = 64;

/// A version that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionError {
    /// Not semver.
    #[error("{0:?} is not a semantic version like 1.4.2")]
    NotSemver(String),
    /// Too long.
    #[error("version string is longer than {MAX_VERSION_LEN} characters")]
    TooLong,
    /// version_code does not increase.
    #[error("version_code {offered} is not greater than the latest {latest}; use {next} or higher")]
    NotGreater {
        /// Latest on the channel.
        latest: u64,
        /// Offered.
        offered: u64,
        /// The smallest acceptable.
        next: u64,
    },
}

/// Parses a semver string with a length bound.
///
/// # Errors
/// Too long or not semver.
pub fn parse_version(s: &str) -> Result<Version, VersionError> {
    if s.len() > MAX_VERSION_LEN {
        return Err(VersionError::TooLong);
    }
    Version::parse(s).map_err(|_| VersionError::NotSemver(s.to_owned()))
}

/// Whether `offered` may replace `installed` (strictly greater; anything on a fresh device).
pub fn is_upgrade(installed: Option<u64>, offered: u64) -> bool {
    installed.is_none_or(|i| offered > i)
}

/// Checks that `offered` may follow `latest` on a channel.
///
/// # Errors
/// [`VersionError::NotGreater`] with the smallest acceptable code.
pub fn check_next(latest: Option<u64>, offered: u64) -> Result<(), VersionError> {
    match latest {
        Some(latest) if offered <= latest => {
            Err(VersionError::NotGreater { latest, offered, next: latest.saturating_add(1) })
        }
        _ => Ok(()),
    }
}

/// The default next version_code on a channel.
pub fn next_version_code(latest: Option<u64>) -> u64 {
    latest.map_or(1, |l| l.saturating_add(1))
}

/// Whether `actual` is at least `minimum` (semver precedence; build metadata ignored).
pub fn meets_minimum(actual: &Version, minimum: &Version) -> bool {
    actual.cmp_precedence(minimum) != Ordering::Less
}

/// A release's position: ordered by version_code, then semver precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseVersion {
    /// Human version.
    pub version: Version,
    /// Ordering key.
    pub version_code: u64,
}

impl Ord for ReleaseVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.version_code
            .cmp(&other.version_code)
            .then_with(|| self.version.cmp_precedence(&other.version))
            .then_with(|| self.version.build.cmp(&other.version.build))
    }
}

impl PartialOrd for ReleaseVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_rules() {
        assert!(is_upgrade(None, 1));
        assert!(is_upgrade(Some(4), 5));
        assert!(!is_upgrade(Some(5), 5));
        assert!(!is_upgrade(Some(5), 4));
        assert_eq!(check_next(Some(7), 7), Err(VersionError::NotGreater { latest: 7, offered: 7, next: 8 }));
        assert_eq!(next_version_code(None), 1);
        assert!(meets_minimum(&parse_version("1.2.0").unwrap(), &parse_version("1.2.0-rc.1").unwrap()));
        assert!(!meets_minimum(&parse_version("1.1.9").unwrap(), &parse_version("1.2.0").unwrap()));
        assert!(parse_version(&"1".repeat(65)).is_err());
    }
}

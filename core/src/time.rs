//! Timestamps in signed documents, and the trusted-time rule.
//!
//! Expiry is checked against [`trusted_now`]: the latest of the device clock, the persisted
//! time floor and the last coordinator-signed time, so a device whose clock was reset to
//! 1970 cannot be fed stale metadata.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A UTC instant with one-second resolution, written as RFC 3339 (`2026-11-23T12:00:00Z`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

/// A timestamp that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timestamp {0:?}: expected RFC 3339 UTC like 2026-11-23T12:00:00Z")]
pub struct TimestampError(pub String);

impl Timestamp {
    /// Seconds since the Unix epoch.
    pub const fn from_unix(secs: u64) -> Self {
        Self(secs)
    }

    /// Seconds since the Unix epoch.
    pub const fn as_unix(self) -> u64 {
        self.0
    }

    /// The current system time (seconds precision; before 1970 counts as 1970).
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// This instant plus `d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d.as_secs()))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        UNIX_EPOCH + Duration::from_secs(t.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(SystemTime::from(*self)))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;

    fn from_str(s: &str) -> Result<Self, TimestampError> {
        // Only the canonical form is accepted, so each instant has one spelling.
        if s.len() != 20 || !s.ends_with('Z') {
            return Err(TimestampError(s.to_owned()));
        }
        let t = humantime::parse_rfc3339(s).map_err(|_| TimestampError(s.to_owned()))?;
        Ok(Self::from(t))
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The time to check expiry against: the latest of the device clock, the persisted floor
/// and the last time a coordinator signed.
pub fn trusted_now(
    device_clock: Timestamp,
    persisted_floor: Option<Timestamp>,
    coordinator_signed: Option<Timestamp>,
) -> Timestamp {
    [Some(device_clock), persisted_floor, coordinator_signed].into_iter().flatten().max().unwrap_or(device_clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_roundtrip_and_canonical_only() {
        let t: Timestamp = "2026-11-23T12:00:00Z".parse().unwrap();
        assert_eq!(t.to_string(), "2026-11-23T12:00:00Z");
        assert!("2026-11-23T12:00:00.5Z".parse::<Timestamp>().is_err());
        assert!("2026-11-23T12:00:00+01:00".parse::<Timestamp>().is_err());
    }

    #[test]
    fn clock_reset_does_not_rewind_trusted_time() {
        let floor = Timestamp::from_unix(2_000_000_000);
        assert_eq!(trusted_now(Timestamp::from_unix(0), Some(floor), None), floor);
        let signed = Timestamp::from_unix(2_000_000_500);
        assert_eq!(trusted_now(Timestamp::from_unix(0), Some(floor), Some(signed)), signed);
    }
}

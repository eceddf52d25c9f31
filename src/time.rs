//! Timestamps: RFC 3339, UTC, with milliseconds (`2026-11-23T05:00:00.123Z`), so that the
//! task journal orders steps within a second.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn now() -> String {
    format(Utc::now())
}

pub fn format(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Whole seconds from `from` to `to`, never negative.
pub fn seconds_between(from: &str, to: &str) -> Option<u64> {
    let (a, b) = (parse(from)?, parse(to)?);
    Some((b - a).num_seconds().max(0) as u64)
}

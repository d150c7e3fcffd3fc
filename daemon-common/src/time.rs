//! Time formats of the contract: RFC 3339 UTC instants, Go-style durations
//! out, and one duration grammar in for every flag of both daemons.

use std::time::{Duration, SystemTime};

use jiff::{Span, SpanRelativeTo, Timestamp};

/// `2026-11-25T12:34:56Z`, truncated to seconds, as `metav1.Time` serialises.
/// Instants before 1970 (a broken clock) print as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    date_time(secs) + "Z"
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch, in UTC, without a zone.
pub fn date_time(secs: u64) -> String {
    // Past year 9999 jiff refuses; no clock of ours gets there.
    let ts = i64::try_from(secs)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX);
    ts.strftime("%Y-%m-%dT%H:%M:%S").to_string()
}

/// A duration as Go prints it, truncated to milliseconds: `3.139s`, `1m2.5s`, `0s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s = (ms / 1000) % 60;
    let frac = ms % 1000;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let f = format!("{frac:03}");
        out.push_str(&format!("{s}.{}s", f.trim_end_matches('0')));
    }
    out
}

/// Parses a duration flag: a bare number is seconds (`90`), otherwise units
/// `ms`, `s`, `m`, `h`, `d` (24 hours), combinable (`1m30s`, `1d12h`).
/// jiff's "friendly" grammar, so its long unit names (`2 hours`) pass too.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("'{text}' is not a duration like 90s, 250ms, 1m30s, 24h or 7d");
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let span: Span = text.parse().map_err(|_| bad())?;
    let signed = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|_| bad())?;
    Duration::try_from(signed).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn formats_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_608_000)),
            "2026-11-25T12:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_709_210_096_999)),
            "2024-02-29T12:34:56Z"
        );
    }

    #[test]
    fn formats_durations_like_go() {
        assert_eq!(go_duration(Duration::from_millis(3139)), "3.139s");
        assert_eq!(go_duration(Duration::from_millis(62_500)), "1m2.5s");
        assert_eq!(go_duration(Duration::from_millis(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_micros(1500)), "1ms");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn parses_both_daemons_durations() {
        let s = Duration::from_secs;
        for (text, want) in [
            ("90", s(90)),
            ("0", s(0)),
            ("90s", s(90)),
            ("15m", s(900)),
            ("24h", s(86_400)),
            ("7d", s(7 * 86_400)),
            ("1m30s", s(90)),
            ("1d12h", s(129_600)),
            ("250ms", Duration::from_millis(250)),
            (" 30s ", s(30)),
            ("0s", s(0)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for text in ["soon", "", "s", "1x", "-5s", "1mo", "1y"] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(text.trim()), "{err}");
        }
    }
}

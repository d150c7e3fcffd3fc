//! Log lines on stderr: our formats and upstream's zap time encodings.

use std::time::Duration;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Time stamps of log lines, `--zap-time-encoding` or tracing's default.
#[derive(Debug, Clone, Copy)]
pub enum TimeFormat {
    Default,
    Epoch,
    Millis,
    Nano,
    Iso8601,
    Rfc3339,
    Rfc3339Nano,
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl TimeFormat {
    pub fn render(self, since_epoch: Duration) -> String {
        let secs = since_epoch.as_secs() as i64;
        let nanos = since_epoch.subsec_nanos();
        let date = || {
            let (y, mo, d) = civil(secs.div_euclid(86_400));
            let t = secs.rem_euclid(86_400);
            format!(
                "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
                t / 3600,
                t / 60 % 60,
                t % 60
            )
        };
        match self {
            TimeFormat::Epoch => format!("{secs}.{nanos:09}"),
            TimeFormat::Millis => format!("{}.{:06}", since_epoch.as_millis(), nanos % 1_000_000),
            TimeFormat::Nano => since_epoch.as_nanos().to_string(),
            TimeFormat::Iso8601 => format!("{}.{:03}Z", date(), nanos / 1_000_000),
            TimeFormat::Rfc3339 => format!("{}Z", date()),
            TimeFormat::Rfc3339Nano | TimeFormat::Default => format!("{}.{nanos:09}Z", date()),
        }
    }
}

impl tracing_subscriber::fmt::time::FormatTime for TimeFormat {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        if let TimeFormat::Default = self {
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        w.write_str(&self.render(now))
    }
}

pub fn init_logging(level: &str, format: LogFormat, time: TimeFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(time);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_encodings() {
        let t = Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(TimeFormat::Epoch.render(t), "1700000000.123456789");
        assert_eq!(TimeFormat::Millis.render(t), "1700000000123.456789");
        assert_eq!(TimeFormat::Nano.render(t), "1700000000123456789");
        assert_eq!(TimeFormat::Iso8601.render(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(TimeFormat::Rfc3339.render(t), "2023-11-14T22:13:20Z");
        assert_eq!(
            TimeFormat::Rfc3339Nano.render(t),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            TimeFormat::Rfc3339.render(Duration::ZERO),
            "1970-01-01T00:00:00Z"
        );
    }
}

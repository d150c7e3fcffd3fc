//! Log lines on stderr, one per event: both daemons' formats and upstream's
//! zap time encodings (clientmountd's `--zap-time-encoding`).

use std::time::Duration;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Time stamps of log lines: tracing's default, or a zap time encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    Default,
    Epoch,
    Millis,
    Nano,
    Iso8601,
    Rfc3339,
    Rfc3339Nano,
}

impl TimeFormat {
    /// The instant `since_epoch` as this encoding writes it.
    pub fn render(self, since_epoch: Duration) -> String {
        let secs = since_epoch.as_secs();
        let nanos = since_epoch.subsec_nanos();
        let date = || crate::time::date_time(secs);
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

/// How a daemon logs.
#[derive(Debug, Clone)]
pub struct Logging<'a> {
    /// The environment variable whose filter, when set and valid, wins over
    /// `default_filter` (`NNF_DM_LOG`, `RUST_LOG`).
    pub filter_env: &'a str,
    pub default_filter: &'a str,
    pub format: LogFormat,
    pub time: TimeFormat,
    /// Whether a line names the module that logged it.
    pub target: bool,
}

impl Logging<'_> {
    /// Installs the global subscriber: stderr (journald takes it), no
    /// colours.
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_env(self.filter_env)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(self.default_filter));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(self.target)
            .with_timer(self.time);
        match self.format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
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

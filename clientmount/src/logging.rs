//! clientmountd's log setup: `RUST_LOG` (or the `--zap-*` level) over the
//! shared formats and zap time encodings of `daemon_common::logging`.

use daemon_common::logging::{LogFormat, Logging, TimeFormat};

pub fn init_logging(level: &str, format: LogFormat, time: TimeFormat) {
    Logging {
        filter_env: "RUST_LOG",
        default_filter: level,
        format,
        time,
        target: false,
    }
    .init();
}

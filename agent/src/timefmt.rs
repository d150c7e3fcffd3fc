//! Time formats of the contract, shared with clientmountd.

pub use daemon_common::time::{go_duration, parse_duration, rfc3339};

//! What both compute-node daemons (nnf-dm and clientmountd) share.

pub mod error;
pub mod logging;
pub mod metrics_http;
pub mod signals;
pub mod time;

//! What both compute-node daemons (nnf-dm and clientmountd) share.

pub mod metrics_http;

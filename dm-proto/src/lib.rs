//! The upstream `datamovement` gRPC API: messages, the `DataMover` server
//! trait and a transport-agnostic client, generated from
//! `agent/proto/datamovement.proto` at build time.

#![allow(clippy::all, missing_docs)]

/// Package `datamovement`.
pub mod datamovement {
    tonic::include_proto!("datamovement");
}

pub use datamovement::*;

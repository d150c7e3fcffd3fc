//! A gRPC client of the agent's socket run as another user (SO_PEERCRED is
//! the identity): one action from the environment, `key=value` lines out.
//! Started by `grpc_client::helper_command`; not a test.

#[path = "../grpc_client.rs"]
mod grpc_client;

fn main() {
    if std::env::var_os(grpc_client::HELPER_ACTION).is_none() {
        eprintln!(
            "grpc-helper: {} is not set (run by the integration tests' helper_command)",
            grpc_client::HELPER_ACTION
        );
        std::process::exit(2);
    }
    grpc_client::helper_main();
}

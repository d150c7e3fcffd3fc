//! The NNF data-movement agent as a library: the `nnf-dm` binary is
//! `run(parse())`. How the parts fit: ARCHITECTURE.md.

mod agent;
mod cli;
mod daemon;
mod environ;
mod flags;
mod grpc;
mod kube;
mod local;
mod metrics;
mod op;
mod profiles;
mod request;
mod shellword;
mod simulated;
mod store;
mod sys;
mod timefmt;

use std::process::ExitCode;
use std::time::Duration;

pub use daemon::Error;
pub use flags::{parse, Cli};

use flags::Cmd;

/// Runs what the command line asks: the agent, a service command, a user
/// command, or a copy worker.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Cmd::Service(cmd)) => daemon_svc::execute::<Cli>(&daemon_svc::NNF_DM, cmd),
        Some(Cmd::User(cmd)) => cli::run(&cli.mount, cmd),
        Some(Cmd::CopyWorker {
            workers,
            journal_fd,
            source,
            target,
        }) => {
            let code = copy_engine::run_worker(
                &source,
                &target,
                workers,
                Duration::from_millis(250),
                journal_fd,
            );
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        None => match daemon::run(cli.run) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // Once, with every cause: the log goes to the same stderr.
                eprintln!("nnf-dm: {}", daemon_common::error::Causes(&e));
                ExitCode::FAILURE
            }
        },
    }
}

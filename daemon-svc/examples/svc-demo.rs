//! A stand-in for a daemon's `main`, wired as nnf-dm and clientmountd are
//! meant to be, so the crate's tests drive the real clap parsing and exit
//! codes without building the daemons.
//!
//! It takes the daemon's identity from its file name: copied to
//! `clientmountd` it is clientmountd (unit, man pages, completions), anything
//! else is nnf-dm. That lets rpm/build.sh be tried with stand-in binaries.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "nnf-dm", version, about = "Demo of the daemon-svc wiring")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// A daemon flag, to show service subcommands coexist with the daemon's own.
    #[arg(long)]
    node_name: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Service(daemon_svc::ServiceCommand),
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let is_clientmountd = std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == "clientmountd");
    let (spec, name) = if is_clientmountd {
        (&daemon_svc::CLIENTMOUNTD, "clientmountd")
    } else {
        (&daemon_svc::NNF_DM, "nnf-dm")
    };
    let command = Cli::command().name(name).bin_name(name);
    let cli = match Cli::from_arg_matches(&command.clone().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        // A real daemon just calls execute::<Cli>; the stand-in renames its
        // command first, so it documents itself here.
        Some(Cmd::Service(daemon_svc::ServiceCommand::GenerateDocs { out_dir })) => {
            match daemon_svc::write_docs(command, &out_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("Error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Cmd::Service(cmd)) => daemon_svc::execute::<Cli>(spec, cmd),
        None => {
            println!("daemon would run (node {:?})", cli.node_name);
            ExitCode::SUCCESS
        }
    }
}

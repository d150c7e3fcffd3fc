//! `nnf-dm`: the NNF data-movement agent.

fn main() -> std::process::ExitCode {
    nnf_dm::run(nnf_dm::parse())
}

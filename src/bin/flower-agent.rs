//! `flower-agent`: the appliance agent for the SuperLink and SuperNode images.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    flower_reconcile::agent::cli::main()
}

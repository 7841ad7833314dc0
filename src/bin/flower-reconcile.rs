//! `flower-reconcile`: the controller and its command line.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    flower_reconcile::cli::main()
}

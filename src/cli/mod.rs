//! The `flower-reconcile` command line: argument parsing (clap) and human or JSON
//! reports. This is the only place typed library errors become readable reports.

use std::process::ExitCode;

/// Entry point of the `flower-reconcile` binary.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}

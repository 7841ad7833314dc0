//! The `flower-agent` command line.

use std::process::ExitCode;

/// Entry point of the `flower-agent` binary.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}

//! The `tokenbroker` binary: parses the command line and hands it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tokenbroker::cli::execute(tokenbroker::cli::Cli::parse())
}

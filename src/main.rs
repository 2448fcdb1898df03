//! The `tokenbroker` binary: parses the command line and hands it to the library.

use clap::Parser;

/// jemalloc, for the reasons BENCHMARKS.md measures: less CPU per request than glibc's malloc,
/// and memory given back to the system once connections close.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation (the `MALLOC_CONF` environment variable
/// still overrides them). A background thread purges unused pages on a timer, so that an idle
/// process shrinks too; pages unused for 5 s are returned (`dirty_decay_ms`), with no lazy
/// `MADV_FREE` stage (`muzzy_decay_ms:0`) that would keep them counted in RSS.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    tokenbroker::cli::execute(tokenbroker::cli::Cli::parse())
}

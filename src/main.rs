//! The `tokenbroker` binary: parses the command line and calls into the library.

fn main() {
    eprintln!("tokenbroker: not yet wired");
    std::process::exit(64);
}

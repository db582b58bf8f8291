//! The `fedcdd` binary; everything is in the library (`fedcdd_host::cli`).

fn main() -> std::process::ExitCode {
    fedcdd_host::cli::main()
}

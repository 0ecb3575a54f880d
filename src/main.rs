//! Entry point: parse, run, exit code. Nothing else.

fn main() -> std::process::ExitCode {
    gigastt::cli::run(std::env::args_os().skip(1).collect())
}

//! Entry point: parse, run, exit code, and the memory allocator.

/// mimalloc instead of the C library's malloc. musl's (the static release
/// binary) made the encoder about 2x slower; glibc's keeps freed load-time
/// buffers, so peak memory sat at ~1.8x the weights (docs/perf.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gigastt::cli::run(std::env::args_os().skip(1).collect())
}

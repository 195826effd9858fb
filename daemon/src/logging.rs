//! Log output of the binaries. The library logs through `tracing` and installs nothing: an embedding
//! trainer chooses its own subscriber.

/// Sends `tracing` events at INFO and above to stderr, one line each. Write errors (a closed stderr) are
/// ignored, so that a closed pipe never stops a daemon.
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

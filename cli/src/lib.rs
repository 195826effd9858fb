//! What both halves of the `gainguard` command line share: `inspect` (the safetensors reader, the rows,
//! the table), the output formats, and how a run ends (exit code 2 for bad input, quiet on a closed pipe).
//!
//! The `gainguard` binary (this package) runs `inspect` on the CPU itself, with the libtorch-free
//! estimator of `gainguard-spectra`; `gainguard-torch` (the plugin's binary, linked with libtorch) runs
//! `rules`, `calibrate`, `inspect --full` and `inspect --device cuda`, and `gainguard` executes it for them.

pub mod inspect;

/// What `gainguard --help` says the command line is (both binaries print it).
pub const ABOUT: &str = "Width-scaled AdamW (arXiv 2510.15262) and live singular-value spectra for tch trainers";

/// What `gainguard --help` says of `inspect` (both binaries run it).
pub const INSPECT_ABOUT: &str = "Singular-value statistics (sigma_max, stable rank, Frobenius norm, quantiles) of every matrix in a safetensors file";

/// Output format of the subcommands: `table` for people, `json` for programs.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A failure caused by the user's input: reported on stderr with exit code 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for BadInput {}

/// A reader that stops early (`gainguard inspect --format json | head -1`) closes stdout. The output is then
/// nobody's, and that ends the command quietly with exit code 0, whichever subcommand was writing: an error
/// returned from a write ([`finish`]), or the panic of `println!` on EPIPE, caught here (Rust ignores
/// SIGPIPE, so a write to a closed pipe fails with EPIPE instead of ending the process).
pub fn quiet_on_closed_stdout() {
    let closed = format!("failed printing to stdout: {}", std::io::Error::from_raw_os_error(libc::EPIPE));
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload_as_str() == Some(closed.as_str()) {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Ends the process with a subcommand's result: 0 on success or a closed stdout, 2 for [`BadInput`]
/// (the message names the culprit), 1 otherwise.
pub fn finish(result: anyhow::Result<()>) -> ! {
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) if stdout_closed(&e) => std::process::exit(0),
        Err(e) => {
            eprintln!("gainguard: {e:#}");
            let code = if e.downcast_ref::<BadInput>().is_some() { 2 } else { 1 };
            std::process::exit(code);
        }
    }
}

fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

//! `gainguard`: the command line of the plugin.
//!
//! - `gainguard rules`: print the per-parameter decision of the width-scaling rule.
//! - `gainguard calibrate MEASUREMENTS.json`: recommend gamma from sigma_max at several widths and gammas.
//! - `gainguard inspect FILE.safetensors`: singular-value statistics of every weight matrix in a file.
//!
//! Exit code 2 means bad input; the message names the culprit. A closed stdout (`| head`) ends any of them
//! quietly with exit code 0.

mod inspect;
mod calibrate;
mod rules;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gainguard", version, about = "Width-scaled AdamW (arXiv 2510.15262) and live singular-value spectra for tch trainers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the per-parameter decision (class, width multiplier m, lr, wd) for a base and a target model.
    Rules(rules::Args),
    /// Singular-value statistics (sigma_max, stable rank, Frobenius norm, quantiles) of every matrix in a safetensors file.
    Inspect(inspect::Args),
    /// Recommend gamma (wd ∝ m^gamma) from sigma_max measured at 3+ widths and 2+ gammas along the μP path.
    Calibrate(calibrate::Args),
}

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

fn main() {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Rules(a) => rules::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Calibrate(a) => calibrate::run(a),
    };
    if let Err(e) = result {
        if stdout_closed(&e) {
            std::process::exit(0);
        }
        eprintln!("gainguard: {e:#}");
        let code = if e.downcast_ref::<BadInput>().is_some() { 2 } else { 1 };
        std::process::exit(code);
    }
}

/// A reader that stops early (`gainguard inspect --format json | head -1`) closes stdout. The output is then
/// nobody's, and that ends the command quietly with exit code 0, whichever subcommand was writing: an error
/// returned from a write ([`stdout_closed`]), or the panic of `println!` on EPIPE, caught here (Rust ignores
/// SIGPIPE, so a write to a closed pipe fails with EPIPE instead of ending the process).
fn quiet_on_closed_stdout() {
    let closed = format!("failed printing to stdout: {}", std::io::Error::from_raw_os_error(libc::EPIPE));
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload_as_str() == Some(closed.as_str()) {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

//! `gainguard`: the command line of the plugin.
//!
//! - `gainguard rules`: print the per-parameter decision of the width-scaling rule.
//! - `gainguard calibrate MEASUREMENTS.json`: recommend gamma from sigma_max at several widths and gammas.
//! - `gainguard inspect FILE.safetensors`: singular-value statistics of every weight matrix in a file.
//!
//! Exit code 2 means bad input; the message names the culprit.

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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Rules(a) => rules::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Calibrate(a) => calibrate::run(a),
    };
    if let Err(e) = result {
        eprintln!("gainguard: {e:#}");
        let code = if e.downcast_ref::<BadInput>().is_some() { 2 } else { 1 };
        std::process::exit(code);
    }
}

//! `gainguard-torch`: the half of the `gainguard` command line that needs libtorch. `gainguard` (the
//! `gainguard-cli` package) runs `inspect` on the CPU itself and executes this binary, with the same
//! arguments, for everything else:
//!
//! - `gainguard rules`: print the per-parameter decision of the width-scaling rule.
//! - `gainguard calibrate MEASUREMENTS.json`: recommend gamma from sigma_max at several widths and gammas.
//! - `gainguard inspect FILE.safetensors --full` or `--device cuda|auto`: singular-value statistics of every
//!   weight matrix in a file, with libtorch's SVD or on a GPU (it also runs the CPU estimator, for direct use).
//!
//! Exit code 2 means bad input; the message names the culprit. A closed stdout (`| head`) ends any of them
//! quietly with exit code 0.

mod inspect;
mod calibrate;
mod rules;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gainguard", version, about = gainguard_cli::ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the per-parameter decision (class, width multiplier m, lr, wd) for a base and a target model.
    Rules(rules::Args),
    #[command(about = gainguard_cli::INSPECT_ABOUT)]
    Inspect(gainguard_cli::inspect::Args),
    /// Recommend gamma (wd ∝ m^gamma) from sigma_max measured at 3+ widths and 2+ gammas along the μP path.
    Calibrate(calibrate::Args),
}

pub use gainguard_cli::{BadInput, Format};

fn main() {
    gainguard_cli::quiet_on_closed_stdout();
    let cli = Cli::parse();
    gainguard_cli::finish(match cli.command {
        Command::Rules(a) => rules::run(a),
        Command::Inspect(a) => inspect::Torch::new(&a).and_then(|backend| gainguard_cli::inspect::run(&a, &backend)),
        Command::Calibrate(a) => calibrate::run(a),
    })
}

//! `gainguard`: the command line of the plugin.
//!
//! - `gainguard inspect FILE.safetensors`: singular-value statistics of every weight matrix in a file, run
//!   here without libtorch (`gainguard_cli::inspect::Host`).
//! - `gainguard rules`, `gainguard calibrate`, `gainguard inspect --full` and `gainguard inspect --device
//!   cuda|auto`: executed by `gainguard-torch`, the libtorch-linked half, found through the
//!   `GAINGUARD_TORCH` variable, beside this executable, or on `PATH` (in that order). It takes the same
//!   arguments and prints the same help, so `gainguard --help` lists every subcommand.
//!
//! Why two binaries: a process linked with libtorch spends 0.2 s registering operators before `main`,
//! which was a third of an inspect of a 51M-parameter checkpoint (BENCHMARKS.md, "gainguard inspect").
//!
//! Exit code 2 means bad input; the message names the culprit. A closed stdout (`| head`) ends any of them
//! quietly with exit code 0.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use gainguard_cli::inspect;

/// The subcommands this binary runs itself.
#[derive(Parser)]
#[command(name = "gainguard", version, about = gainguard_cli::ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(about = gainguard_cli::INSPECT_ABOUT)]
    Inspect(inspect::Args),
}

/// The libtorch half's executable name.
const TORCH_BIN: &str = "gainguard-torch";

fn main() {
    gainguard_cli::quiet_on_closed_stdout();
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "inspect") {
        let cli = Cli::parse_from(&args);
        let Command::Inspect(a) = cli.command;
        if !a.needs_libtorch() {
            gainguard_cli::finish(inspect::run(&a, &inspect::Host));
        }
    }
    hand_over(&args[1..]);
}

/// Replaces this process with `gainguard-torch ARGS…` (same stdio, same exit code).
fn hand_over(args: &[OsString]) -> ! {
    let Some(bin) = torch_binary() else {
        let what = args.first().map_or("gainguard".into(), |a| format!("gainguard {}", a.to_string_lossy()));
        eprintln!(
            "gainguard: `{what}` runs in {TORCH_BIN} (the half of gainguard linked with libtorch), which is neither in \
             $GAINGUARD_TORCH, nor beside this executable, nor on PATH; build it with `cargo build --release -p gainguard --bin {TORCH_BIN}` \
             (only `gainguard inspect` on the CPU, without --full, runs without it)"
        );
        std::process::exit(1);
    };
    let err = std::process::Command::new(&bin).arg0("gainguard").args(args).exec();
    eprintln!("gainguard: cannot run {}: {err}", bin.display());
    std::process::exit(1);
}

fn torch_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GAINGUARD_TORCH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(TORCH_BIN)));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return Some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(TORCH_BIN)).find(|p| p.is_file())
}

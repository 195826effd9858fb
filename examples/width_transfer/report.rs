//! What both experiments' reports share: the setup lines, the machine, CPU time, and how hidden matrices are
//! grouped.

use std::fmt::Write as _;

use crate::{Args, Data, Plan, Runner};

/// CPU time of this process so far (user + sys), in seconds, from `/proc/self/stat` (0 where unavailable).
/// Presets are sized by it: wall time on a shared machine says more about the neighbours than the run.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields overall.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux this runs on (sysconf(_SC_CLK_TCK)).
    (ticks(11) + ticks(12)) / 100.0
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{} logical CPUs ({cpu}); load average at the end: {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

/// `blocks.0.attn.q.weight` → `b0.attn.q`.
pub fn short(name: &str) -> String {
    name.trim_end_matches(".weight").replace("blocks.", "b")
}

/// The kind of hidden matrix, for fits that treat attention and MLP separately.
pub fn kind_of(param: &str) -> &'static str {
    if param.contains(".attn.") {
        "attention"
    } else if param.contains(".mlp.") {
        "MLP"
    } else {
        "other"
    }
}

/// The title, the command that reproduces the report, the settings and the cost.
pub fn setup_section(r: &mut String, title: &str, a: &Args, plan: &Plan, runner: &Runner, data: &Data) {
    let _ = writeln!(r, "# {title}: preset `{}`\n", plan.name);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _ = writeln!(r, "Command: `cargo run --release --example width_transfer -- {}`{}\n", args.join(" "),
        a.shared_runs.as_ref().map(|_| " (one of several processes sharing the runs)").unwrap_or_default());
    let _ = writeln!(r, "- data: {}", data.describe());
    let _ = writeln!(
        r,
        "- model: LLaMA-style, {} layers, base width {}, seq {} × batch {}, grad clip 1.0, Adam betas (0.9, {})",
        plan.layers, plan.base_width, plan.seq_len, plan.batch, plan.beta2
    );
    let _ = writeln!(
        r,
        "- steady-state protocol: lr constant after a {}-step linear warmup; every hidden matrix runs to decay horizon H = Σ lr_t·wd_t ≥ {} (width-scaled, schedule included); sigma_max = mean over its last timescale (float64 SVD, 8 samples per timescale); drift = that mean over the one before, minus 1",
        plan.warmup, plan.horizon
    );
    let _ = writeln!(
        r,
        "- cost: {} runs trained, {} served from the cache of identical runs; CPU time {:.0} s ({:.1} min, user + sys, {} libtorch thread(s)); wall time {:.0} s",
        runner.trained,
        runner.reused,
        cpu_seconds(),
        cpu_seconds() / 60.0,
        tch::get_num_threads(),
        runner.start.elapsed().as_secs_f64()
    );
    let _ = writeln!(r, "- machine: {}\n", machine());
}

pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

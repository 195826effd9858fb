//! The examples are part of the product: `make test` runs each one end to end (small settings).

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> Command {
    // Test binaries live in target/<profile>/deps; cargo builds the examples into target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let path: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(path.exists(), "{} was not built (cargo test builds examples)", path.display());
    Command::new(path)
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn the_llama_example_trains_and_prints_the_rule_table_and_a_falling_loss() {
    let mut cmd = example("llama");
    cmd.args(["--d-model", "64", "--base-d-model", "32", "--steps", "30", "--metrics", "127.0.0.1:0"]);
    let out = run_ok(cmd);
    assert!(out.contains("matrix_like") && out.contains("blocks.0.attn.q.weight"), "{out}");
    let line = out.lines().find(|l| l.starts_with("loss: first")).expect("a loss summary line");
    let after = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("`{key}` in {line}")) + key.len()..];
        rest.split(|c: char| c == ',' || c == ' ').next().unwrap().parse().unwrap()
    };
    assert!(after("mean ") < after("first "), "the loss fell: {line}");
}

#[test]
fn the_teacher_student_example_runs() {
    let out = run_ok(example("teacher_student"));
    assert!(out.to_lowercase().contains("sigma"), "{out}");
}

#[test]
fn the_width_transfer_smoke_preset_writes_a_report_and_a_plot() {
    let dir = std::env::temp_dir().join(format!("gainguard-wt-smoke-{}", std::process::id()));
    let mut cmd = example("width_transfer");
    cmd.args(["--preset", "smoke", "--out"]).arg(&dir);
    run_ok(cmd);
    assert!(dir.join("report.md").exists());
    let pngs = std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count();
    assert!(pngs >= 1, "no PNG in {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_gpu_check_passes_its_dry_run_on_the_cpu() {
    // scripts/device-check.sh runs this example on a GPU machine, where time is short: a broken check
    // must show up here first. With --cpu it runs every comparison on the CPU.
    let mut cmd = example("device_check");
    cmd.arg("--cpu");
    let out = run_ok(cmd);
    let passes = out.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(passes >= 15 && !out.lines().any(|l| l.starts_with("FAIL ")), "{out}");
    assert!(out.contains("0 check(s) failed"), "{out}");
}

#[test]
fn the_gpu_check_says_so_and_fails_without_cuda() {
    if tch::Cuda::is_available() {
        return;
    }
    let out = example("device_check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("CUDA is not available") && text.contains("--cpu"), "{text}");
}

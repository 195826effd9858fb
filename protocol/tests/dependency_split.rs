//! The point of this crate: a trainer that only talks to a standalone gainguardd builds no web server, no
//! async runtime and no NVML binding. Checked on the resolved dependency graph, as `cargo tree` prints it
//! (from the lock file and the local registry cache, `--offline`: no network).

use std::process::Command;

/// Crates that only the embedded daemon needs.
const DAEMON_ONLY: [&str; 5] = ["tokio", "hyper", "nvml-wrapper", "prometheus", "gainguard-daemon"];

/// Every package in `cargo tree`'s graph for `args`, all edge kinds (normal, build and dev) included.
fn packages(args: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(&cargo)
        .args(["tree", "--offline", "--manifest-path", manifest, "--prefix", "none", "--format", "{p}"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} tree: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    // `{p}` prints `name vX.Y.Z (path)`; the name is the first word.
    stdout.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

fn assert_none_of(graph: &[String], forbidden: &[&str], what: &str) {
    let found: Vec<&str> = forbidden.iter().copied().filter(|f| graph.iter().any(|p| p == f)).collect();
    assert!(found.is_empty(), "{what} pulls in {found:?}");
}

#[test]
fn the_plugin_without_default_features_depends_on_no_daemon_crate() {
    let graph = packages(&["-p", "gainguard", "--no-default-features"]);
    assert!(graph.iter().any(|p| p == "gainguard-protocol"), "the plugin sends through the protocol crate: {graph:?}");
    assert!(graph.iter().any(|p| p == "tch"), "the listing is the plugin's own graph: {graph:?}");
    assert_none_of(&graph, &DAEMON_ONLY, "gainguard --no-default-features");
}

#[test]
fn the_plugin_with_default_features_embeds_the_daemon() {
    // The other side of the feature: if this failed, the test above would pass for the wrong reason.
    let graph = packages(&["-p", "gainguard"]);
    for want in DAEMON_ONLY {
        assert!(graph.iter().any(|p| p == want), "gainguard (default features) lacks {want}");
    }
}

#[test]
fn the_protocol_crate_links_no_libtorch_and_runs_no_async_runtime() {
    let graph = packages(&["-p", "gainguard-protocol", "-e", "normal"]);
    assert_none_of(&graph, &[&DAEMON_ONLY[..], &["tch", "torch-sys", "gainguard"]].concat(), "gainguard-protocol");
}

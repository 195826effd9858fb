//! The README's "monitoring in three lines" block, run as written: the macro below compiles the very tokens it
//! is given, and the test first checks that they are the README block's (comments and spacing aside), so
//! the README cannot drift from code that runs. The events must reach the embedded daemon: its `/metrics`
//! shows the run's loss, step and a sigma_max per sampled matrix.

use gainguard::{AdamWConfig, BaseShapes, WidthScaledAdamW};
use gainguard_examples::model;
use gainguard_test_support::http::http_get;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// Compiles and runs `$code`, and records its tokens in `SNIPPET` for the comparison with the README.
macro_rules! snippet {
    ($($code:tt)*) => {
        const SNIPPET: &str = stringify!($($code)*);
        $($code)*
    };
}

/// The README's block after the `monitor-snippet` marker.
fn readme_block() -> String {
    let readme = include_str!("../README.md");
    let at = readme.find("<!-- monitor-snippet").expect("the README marks its monitoring snippet");
    let rest = &readme[at..];
    let start = rest.find("```rust\n").expect("a rust block after the marker") + "```rust\n".len();
    let len = rest[start..].find("```").expect("the block ends");
    rest[start..start + len].to_string()
}

/// The code without line comments and whitespace: what both the README and `stringify!` agree on.
fn code_tokens(code: &str) -> String {
    code.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

fn metric(body: &str, name: &str, labels: &[&str]) -> Vec<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn the_readme_monitoring_snippet_runs_as_written_and_its_loss_and_sigma_max_reach_the_embedded_daemon() -> anyhow::Result<()> {
    // The only test in this binary, so that no other thread reads the environment meanwhile.
    std::env::remove_var(gainguard::monitor::ADDR_ENV);
    std::env::set_var(gainguard::monitor::LISTEN_ENV, "127.0.0.1:0");

    tch::manual_seed(0);
    let config = |d| model::Config::new(48, d, 16, 2, 16);
    let base_vs = VarStore::new(Device::Cpu);
    let _ = model::llama(base_vs.root(), &config(16));
    let vs = VarStore::new(Device::Cpu);
    let model = model::llama(vs.root(), &config(32));
    let mut opt = WidthScaledAdamW::new(&vs, &BaseShapes::from_var_store(&base_vs), AdamWConfig { lr: 3e-3, ..Default::default() })?;
    let corpus = gainguard::data::MarkovCorpus::new(48, 4, 0);
    let steps = 30u64;
    let data: Vec<Tensor> = (0..steps).map(|s| Tensor::from_slice(&corpus.batch(s, 4, 16)).view([4, 16])).collect();
    let tokens = 4 * 16;

    snippet! {
        let mut mon = gainguard::Monitor::from_env("my-run")?.attach(&mut opt)?;
        for batch in data {
            opt.zero_grad();
            let loss = model.loss(&batch);
            loss.backward();
            mon.step(&opt.step(), loss.double_value(&[]), tokens);
        }
        mon.finish()?;
    }
    assert_eq!(code_tokens(&readme_block()), code_tokens(SNIPPET), "the README's block is not the code this test runs:\n{}", readme_block());

    let addr = mon.metrics_addr().expect("from_env without GAINGUARD_ADDR starts the embedded daemon");
    let (status, body) = http_get(addr, "/metrics")?;
    assert_eq!(status, 200);
    let run = r#"run="my-run""#;
    let loss = metric(&body, "gainguard_loss", &[run]);
    assert!(loss.len() == 1 && loss[0].is_finite() && loss[0] > 0.0, "one finite loss for my-run:\n{body}");
    assert_eq!(metric(&body, "gainguard_step", &[run]), vec![steps as f64], "the last step reported");
    // The sampler's default interval (10) samples steps 10, 20 and 30; `finish` lets it drain, so every
    // matrix-like parameter it covered has a positive sigma_max.
    let sampled = opt.plan().decisions.iter().filter(|d| d.class == gainguard::ParamClass::MatrixLike).count();
    let sigma = metric(&body, "gainguard_sigma_max", &[run]);
    assert!(!sigma.is_empty() && sigma.len() <= sampled && sigma.iter().all(|s| *s > 0.0), "sigma_max series for my-run:\n{body}");
    assert_eq!(mon.sampler().map(|s| s.dropped_total()), Some(0), "no sample dropped on a 30-step run");
    Ok(())
}

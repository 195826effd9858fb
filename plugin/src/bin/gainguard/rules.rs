//! `gainguard rules --base-shapes BASE.json --shapes TARGET.json --lr LR --wd WD --rule RULE`

use anyhow::Result;
use gainguard::classify::{BaseShapes, Override};
use gainguard::plan::{ParamSpec, ScalingPlan};
use gainguard::Rule;
use std::path::PathBuf;

use crate::{BadInput, Format};

#[derive(clap::Args)]
pub struct Args {
    /// Shapes of the base (proxy) model: a JSON object mapping each parameter name to its shape, or
    /// {"base": {...}, "delta": {...}} with the same model at a second width (declares the width dims).
    #[arg(long)]
    base_shapes: PathBuf,
    /// Shapes of the target model, in the same format.
    #[arg(long)]
    shapes: PathBuf,
    /// The proxy's tuned learning rate.
    #[arg(long)]
    lr: f64,
    /// The proxy's tuned weight decay.
    #[arg(long)]
    wd: f64,
    /// paper (gamma 0.5), mup-coupled (gamma 1), mup-fixed-wd (gamma 0), standard, or gamma=G[,lr_exponent=E].
    #[arg(long, default_value = "paper")]
    rule: String,
    /// Overrides as a JSON array of objects: {"pattern": "blocks.*.attn.*", "class": "vector_like",
    /// "width_multiplier": 2.0, "fan_in_dim": 1, "lr_multiplier": 0.5, "wd_multiplier": 1.0, "weight_decay": 0.01}.
    #[arg(long)]
    overrides: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

pub fn run(a: Args) -> Result<()> {
    let bad = |e: &dyn std::fmt::Display| BadInput(e.to_string());
    let base = BaseShapes::from_json_file(&a.base_shapes).map_err(|e| bad(&e))?;
    let target = BaseShapes::from_json_file(&a.shapes).map_err(|e| bad(&e))?;
    let rule = Rule::parse(&a.rule).map_err(|e| bad(&e))?;
    let overrides: Vec<Override> = match &a.overrides {
        None => Vec::new(),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| BadInput(format!("overrides file `{}`: {e}", p.display())))?;
            serde_json::from_str(&text).map_err(|e| BadInput(format!("overrides file `{}`: {e}", p.display())))?
        }
    };
    let specs: Vec<ParamSpec> =
        target.base.iter().map(|(n, s)| ParamSpec { name: n.clone(), shape: s.clone(), storage: None }).collect();
    let plan = ScalingPlan::build(&specs, &base, &overrides, rule, a.lr, a.wd).map_err(|e| bad(&e))?;
    match a.format {
        Format::Table => print!("{}", plan.to_table()),
        Format::Json => println!("{}", plan.to_json()),
    }
    Ok(())
}

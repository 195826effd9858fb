//! `gainguard rules --base-shapes BASE.json --shapes TARGET.json --lr LR --wd WD --rule RULE`

use anyhow::Result;
use gainguard::classify::{BaseShapes, Override};
use gainguard::plan::{ParamSpec, ScalingPlan};
use gainguard::rule::RuleError;
use gainguard::Rule;
use std::io::Write;
use std::path::PathBuf;

use crate::{BadInput, Format};

/// Every form `--rule` accepts.
const RULE_FORMS: &str = "paper, mup-coupled, mup-fixed-wd, standard, or gamma=G[,lr_exponent=E] with numbers G and E (e.g. gamma=0.5,lr_exponent=1)";

#[derive(clap::Args)]
pub struct Args {
    /// Shapes of the base (proxy) model: a JSON object mapping each parameter name to its shape, or
    /// {"base": {...}, "delta": {...}} with the same model at a second width (declares the width dims).
    #[arg(long, value_name = "BASE.json")]
    base_shapes: PathBuf,
    /// Shapes of the target model: a JSON object mapping each parameter name to its shape. A
    /// {"base": {...}, "delta": {...}} file here stands for its base model (say, to see the proxy's own
    /// plan); its delta is not used, and a note on stderr says so.
    #[arg(long, value_name = "TARGET.json")]
    shapes: PathBuf,
    /// The proxy's tuned learning rate (finite, >= 0).
    #[arg(long, allow_hyphen_values = true)]
    lr: f64,
    /// The proxy's tuned weight decay (finite, >= 0).
    #[arg(long, allow_hyphen_values = true)]
    wd: f64,
    /// paper (gamma 0.5), mup-coupled (gamma 1), mup-fixed-wd (gamma 0), standard, or gamma=G[,lr_exponent=E].
    #[arg(long, default_value = "paper")]
    rule: String,
    /// Overrides: a path to a JSON file, or the JSON itself (an argument starting with `[` or `{`). A JSON
    /// array of objects such as {"pattern": "blocks.*.attn.*", "class": "matrix_like"}; the fields are
    /// pattern, class, width_multiplier, fan_in_dim, lr_multiplier, wd_multiplier, weight_decay, width_dims,
    /// fixed_size, role (readout or embedding) and may_match_nothing (README: "Overrides").
    #[arg(long, value_name = "FILE|JSON")]
    overrides: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

fn parse_rule(given: &str) -> Result<Rule, BadInput> {
    Rule::parse(given).map_err(|e| {
        BadInput(match e {
            RuleError::UnknownPreset(_) if given.starts_with("gamma=") => {
                format!("--rule `{given}`: gamma=G[,lr_exponent=E] takes a number for G and for E; accepted forms: {RULE_FORMS}")
            }
            RuleError::UnknownPreset(_) => format!("unknown rule `{given}` (--rule): expected one of {RULE_FORMS}"),
            other => format!("--rule `{given}`: {other}; accepted forms: {RULE_FORMS}"),
        })
    })
}

fn read_overrides(arg: &str) -> Result<Vec<Override>, BadInput> {
    let inline = arg.trim_start().starts_with(['[', '{']);
    let parsed = if inline {
        Override::parse_list(arg, "the --overrides argument")
    } else {
        let text = std::fs::read_to_string(arg).map_err(|e| {
            BadInput(format!("overrides file `{arg}` (--overrides takes a path to a JSON file, or the JSON itself): {e}"))
        })?;
        Override::parse_list(&text, &format!("`{arg}`"))
    };
    parsed.map_err(|e| BadInput(e.to_string()))
}

pub fn run(a: Args) -> Result<()> {
    let bad = |e: &dyn std::fmt::Display| BadInput(e.to_string());
    for (flag, what, value) in [("--lr", "learning rate", a.lr), ("--wd", "weight decay", a.wd)] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(BadInput(format!("{flag} {value}: the base {what} must be finite and >= 0")).into());
        }
    }
    let base = BaseShapes::read_json_file(&a.base_shapes, "base").map_err(|e| bad(&e))?;
    let target = BaseShapes::read_json_file(&a.shapes, "target").map_err(|e| bad(&e))?;
    let rule = parse_rule(&a.rule)?;
    let overrides = match &a.overrides {
        None => Vec::new(),
        Some(arg) => read_overrides(arg)?,
    };
    let specs: Vec<ParamSpec> =
        target.base.iter().map(|(n, s)| ParamSpec { name: n.clone(), shape: s.clone(), storage: None }).collect();
    let plan = ScalingPlan::build(&specs, &base, &overrides, rule, a.lr, a.wd).map_err(|e| bad(&e))?;
    if target.delta.is_some() {
        eprintln!(
            "gainguard: note: target shapes file `{}` holds {{\"base\", \"delta\"}} shapes: planned for its `base` shapes, the \
             model that file describes; its `delta` is not used (the width dimensions come from --base-shapes)",
            a.shapes.display()
        );
    }
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Table => write!(out, "{}", plan.to_table())?,
        Format::Json => {
            writeln!(out, "{}", plan.to_json())?;
            for w in &plan.warnings {
                eprintln!("gainguard: warning ({}): {}", w.kind.as_str(), w.message);
            }
        }
    }
    out.flush()?;
    Ok(())
}

//! The paper's minimal synthetic setting (arXiv 2510.15262): a teacher–student feed-forward network
//! whose hidden matrix sits between two RMSNorms, so it is scale-invariant and AdamW with weight decay
//! alone sets its scale. Trained with gainguard's `WidthScaledAdamW` at several widths under each rule;
//! prints sigma_max of the hidden matrix per width and rule, and its spread across widths.
//!
//! ```text
//! cargo run --release --example teacher_student            # widths 32..128, 300 steps, one thread: about a minute
//! cargo run --release --example teacher_student -- --steps 1500 --widths 64,128,256,512,1024
//! ```
//!
//! Student: `x → W_in (d × d_in, vector-like) → RMSNorm → W_hidden (d × d, matrix-like) → RMSNorm → ReLU →
//! μP readout (d_out × d, output / m)`. Teacher: the same architecture at width 64 with fixed random
//! weights. The loss is the mean squared error to the teacher's output on fresh Gaussian inputs.

use clap::Parser;
use gainguard::mup::mu_readout;
use gainguard::{AdamWConfig, BaseShapes, Override, ParamClass, Preset, Rule, WidthScaledAdamW};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
#[command(about = "Teacher–student FFN with RMSNorm: sigma_max of the hidden matrix per width under each rule")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    widths: Vec<i64>,
    #[arg(long, default_value_t = 300)]
    steps: u64,
    #[arg(long, default_value_t = 2e-2)]
    lr: f64,
    #[arg(long, default_value_t = 1.0)]
    wd: f64,
    #[arg(long, default_value_t = 64)]
    batch: i64,
}

const D_IN: i64 = 32;
const D_OUT: i64 = 8;

fn rms_norm(x: &Tensor) -> Tensor {
    x * (x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt()
}

fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs, i, o, nn::LinearConfig { bias: false, ..Default::default() })
}

/// The network at width `d`, its readout divided by `d / base`.
fn network(vs: nn::Path, d: i64, base: i64) -> impl Module {
    let w_in = linear(&vs / "w_in", D_IN, d);
    let hidden = linear(&vs / "hidden", d, d);
    let readout = mu_readout(&vs / "readout", d, D_OUT, base, false);
    nn::func(move |x| rms_norm(&rms_norm(&x.apply(&w_in)).apply(&hidden)).relu().apply(&readout))
}

fn sigma_max(t: &Tensor) -> f64 {
    let (_, s, _) = t.to_kind(Kind::Double).svd(true, false);
    s.max().double_value(&[])
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    // One thread: the models are small, and two threads stall badly on a shared 2-core machine.
    tch::set_num_threads(1);
    let base = *a.widths.first().ok_or_else(|| anyhow::anyhow!("--widths is empty"))?;
    let base_vs = nn::VarStore::new(Device::Cpu);
    let _ = network(base_vs.root(), base, base);
    let base_shapes = BaseShapes::from_var_store(&base_vs);

    tch::manual_seed(12345);
    let mut teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = network(teacher_vs.root(), 64, 64);
    teacher_vs.freeze();

    println!("teacher–student FFN, widths {:?} (base {base}), {} steps, base lr {}, base wd {}", a.widths, a.steps, a.lr, a.wd);
    println!("{:<14} {}  {:>8}  {:>10}", "rule", a.widths.iter().map(|w| format!("{:>9}", format!("d={w}"))).collect::<String>(), "spread", "final loss");
    for preset in Preset::ALL {
        let rule = Rule::preset(preset);
        let mut sigmas = Vec::new();
        let mut losses = Vec::new();
        for &d in &a.widths {
            tch::manual_seed(d);
            let vs = nn::VarStore::new(Device::Cpu);
            let student = network(vs.root(), d, base);
            // At the base width the shape test finds no width dimension and would call the hidden
            // matrix vector-like (no decay); it is matrix-like at every width, with m = 1 at the base.
            let hidden_is_matrix = Override { class: Some(ParamClass::MatrixLike), ..Override::new("hidden.weight") };
            let config = AdamWConfig { lr: a.lr, weight_decay: a.wd, rule, overrides: vec![hidden_is_matrix], ..Default::default() };
            let mut opt = WidthScaledAdamW::new(&vs, &base_shapes, config)?;
            let hidden = opt.plan().get("hidden.weight").expect("hidden.weight is planned");
            assert_eq!((hidden.class, hidden.width_multiplier), (ParamClass::MatrixLike, d as f64 / base as f64));
            let mut tail = Vec::new();
            for step in 0..a.steps {
                let x = Tensor::randn([a.batch, D_IN], (Kind::Float, Device::Cpu));
                let y = tch::no_grad(|| teacher.forward(&x));
                let loss = (student.forward(&x) - y).pow_tensor_scalar(2).mean(Kind::Float);
                opt.zero_grad();
                loss.backward();
                opt.step();
                if step >= a.steps - a.steps / 10 {
                    tail.push(loss.double_value(&[]));
                }
            }
            sigmas.push(sigma_max(&vs.variables()["hidden.weight"]));
            losses.push(tail.iter().sum::<f64>() / tail.len().max(1) as f64);
        }
        println!(
            "{:<14} {}  {:>8.2}  {:>10}",
            preset.name(),
            sigmas.iter().map(|s| format!("{s:>9.3}")).collect::<String>(),
            gainguard::fit::spread(&sigmas),
            losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>().join("/")
        );
    }
    println!("spread = max/min of sigma_max across widths (1 = width-invariant gain)");
    Ok(())
}

//! A small LLaMA-style language model in one file: RMSNorm, rotary embeddings, SwiGLU MLP, causal
//! multi-head attention, untied embedding and a μP readout. Width (`d_model`) and depth are settings.
//!
//! Parameter names (what the rule table shows):
//! `tok_emb.weight`, `blocks.{i}.attn_norm.weight`, `blocks.{i}.attn.{q,k,v,o}.weight`,
//! `blocks.{i}.mlp_norm.weight`, `blocks.{i}.mlp.{gate,up,down}.weight`, `norm.weight`, `lm_head.weight`.

use gainguard::mup::{mu_readout, MuReadout};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct Config {
    pub vocab: i64,
    pub d_model: i64,
    /// Width of the proxy model; the readout divides its output by d_model / base_d_model.
    pub base_d_model: i64,
    pub n_layers: i64,
    /// Head dimension stays fixed across widths; wider models get more heads.
    pub head_dim: i64,
    pub seq_len: i64,
}

impl Config {
    pub fn new(vocab: i64, d_model: i64, base_d_model: i64, n_layers: i64, seq_len: i64) -> Config {
        Config { vocab, d_model, base_d_model, n_layers, head_dim: 16.min(d_model), seq_len }
    }

    pub fn n_heads(&self) -> i64 {
        self.d_model / self.head_dim
    }

    /// SwiGLU hidden size: 8/3 · d, rounded up to a multiple of 8.
    pub fn d_ff(&self) -> i64 {
        ((8 * self.d_model / 3) + 7) / 8 * 8
    }
}

/// RMSNorm with a learned gain (a vector-like parameter named `weight`).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
}

pub fn rms_norm(vs: nn::Path, dim: i64) -> RmsNorm {
    RmsNorm { weight: vs.ones("weight", &[dim]) }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let rms = (xs.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt();
        xs * rms * &self.weight
    }
}

fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs, i, o, nn::LinearConfig { bias: false, ..Default::default() })
}

/// Rotary position embedding tables `[seq_len, head_dim / 2]`.
fn rotary_tables(cfg: &Config, device: Device) -> (Tensor, Tensor) {
    let half = cfg.head_dim / 2;
    // inv_freq_i = 10000^(-2i / head_dim)
    let inv_freq = (Tensor::arange(half, (Kind::Float, device)) * (-2.0 * 10000f64.ln() / cfg.head_dim as f64)).exp();
    let pos = Tensor::arange(cfg.seq_len, (Kind::Float, device));
    let angles = pos.unsqueeze(1) * inv_freq.unsqueeze(0);
    (angles.cos(), angles.sin())
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    // x: [B, H, T, hd]; rotate pairs (x1, x2) of the two halves.
    let t = x.size()[2];
    let half = x.size()[3] / 2;
    let (cos, sin) = (cos.narrow(0, 0, t), sin.narrow(0, 0, t));
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x1 * &cos - &x2 * &sin, &x1 * &sin + &x2 * &cos], -1)
}

fn causal_attention(vs: nn::Path, cfg: &Config) -> impl Module {
    let (d, h, hd) = (cfg.d_model, cfg.n_heads(), cfg.head_dim);
    let q = linear(&vs / "q", d, d);
    let k = linear(&vs / "k", d, d);
    let v = linear(&vs / "v", d, d);
    let o = linear(&vs / "o", d, d);
    let (cos, sin) = rotary_tables(cfg, vs.device());
    nn::func(move |xs| {
        let (b, t, _) = xs.size3().unwrap();
        let split = |x: Tensor| x.view([b, t, h, hd]).transpose(1, 2);
        let qh = apply_rotary(&split(xs.apply(&q)), &cos, &sin);
        let kh = apply_rotary(&split(xs.apply(&k)), &cos, &sin);
        let vh = split(xs.apply(&v));
        let y = Tensor::scaled_dot_product_attention(&qh, &kh, &vh, None::<Tensor>, 0.0, true, None, false);
        y.transpose(1, 2).contiguous().view([b, t, d]).apply(&o)
    })
}

fn swiglu(vs: nn::Path, cfg: &Config) -> impl Module {
    let gate = linear(&vs / "gate", cfg.d_model, cfg.d_ff());
    let up = linear(&vs / "up", cfg.d_model, cfg.d_ff());
    let down = linear(&vs / "down", cfg.d_ff(), cfg.d_model);
    nn::func(move |xs| (xs.apply(&gate).silu() * xs.apply(&up)).apply(&down))
}

fn block(vs: nn::Path, cfg: &Config) -> impl Module {
    let attn_norm = rms_norm(&vs / "attn_norm", cfg.d_model);
    let attn = causal_attention(&vs / "attn", cfg);
    let mlp_norm = rms_norm(&vs / "mlp_norm", cfg.d_model);
    let mlp = swiglu(&vs / "mlp", cfg);
    nn::func(move |xs| {
        let xs = xs + xs.apply(&attn_norm).apply(&attn);
        &xs + xs.apply(&mlp_norm).apply(&mlp)
    })
}

#[derive(Debug)]
pub struct Llama {
    tok_emb: nn::Embedding,
    blocks: Vec<Box<dyn Module>>,
    norm: RmsNorm,
    lm_head: MuReadout,
}

pub fn llama(vs: nn::Path, cfg: &Config) -> Llama {
    let tok_emb = nn::embedding(&vs / "tok_emb", cfg.vocab, cfg.d_model, Default::default());
    let blocks = (0..cfg.n_layers).map(|i| Box::new(block(&vs / "blocks" / i, cfg)) as Box<dyn Module>).collect();
    let norm = rms_norm(&vs / "norm", cfg.d_model);
    let lm_head = mu_readout(&vs / "lm_head", cfg.d_model, cfg.vocab, cfg.base_d_model, false);
    Llama { tok_emb, blocks, norm, lm_head }
}

impl Module for Llama {
    /// Token ids `[B, T]` → logits `[B, T, vocab]`.
    fn forward(&self, ids: &Tensor) -> Tensor {
        let mut xs = ids.apply(&self.tok_emb);
        for b in &self.blocks {
            xs = b.forward(&xs);
        }
        xs.apply(&self.norm).apply(&self.lm_head)
    }
}

impl Llama {
    /// Mean next-token cross-entropy of `ids[:, :-1]` predicting `ids[:, 1:]`.
    pub fn loss(&self, ids: &Tensor) -> Tensor {
        let t = ids.size()[1];
        let inputs = ids.narrow(1, 0, t - 1);
        let targets = ids.narrow(1, 1, t - 1);
        let logits = self.forward(&inputs);
        let v = logits.size()[2];
        logits.view([-1, v]).cross_entropy_for_logits(&targets.reshape([-1]))
    }
}

//! The spectra maths against an independent float64 SVD (LAPACK through libtorch's `svd`).

use gainguard::spectra::{all_finite, full_spectrum, Estimator, EstimatorConfig, FullPrecision, MatrixLayout, SpectraError};
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

/// Descending singular values of `a`, in float64, by LAPACK.
fn reference_sigmas(a: &Tensor) -> Vec<f64> {
    let (_, s, _) = a.to_kind(Kind::Double).svd(true, false);
    Vec::<f64>::try_from(&s).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// A random orthogonal `[n, r]` from the QR of a Gaussian.
fn orthogonal(n: i64, r: i64) -> Tensor {
    Tensor::linalg_qr(&Tensor::randn([n, r], F64), "reduced").0
}

/// `U diag(s) Vᵀ` with random orthogonal U and V.
fn with_spectrum(m: i64, n: i64, s: &[f64]) -> Tensor {
    let r = s.len() as i64;
    let u = orthogonal(m, r);
    let v = orthogonal(n, r);
    (u * Tensor::from_slice(s).unsqueeze(0)).matmul(&v.tr())
}

fn cold() -> Estimator {
    Estimator::new(EstimatorConfig::default())
}

#[test]
fn cold_start_on_gaussian_matrices_without_a_top_gap_is_within_1e_3() {
    for (m, n) in [(1024, 1024), (2048, 512)] {
        let a = Tensor::randn([m, n], (Kind::Float, Device::Cpu));
        let truth = reference_sigmas(&a);
        let e = cold().estimate(&a).unwrap();
        eprintln!("gaussian {m}x{n}: sigma_max {} vs {} ({} iterations, rel err {:e})", e.sigma_max, truth[0], e.iterations, rel(e.sigma_max, truth[0]));
        assert!(rel(e.sigma_max, truth[0]) <= 1e-3, "{m}x{n}: {} vs {}", e.sigma_max, truth[0]);
        assert!(e.sigma_max <= truth[0] * (1.0 + 1e-6), "Ritz values are lower bounds");
        assert_eq!(e.top_k.len(), 4);
        for w in e.top_k.windows(2) {
            assert!(w[0] >= w[1], "top_k is descending: {:?}", e.top_k);
        }
    }
}

#[test]
fn low_rank_plus_noise_gets_the_top_k_right() {
    let s: Vec<f64> = (0..10).map(|i| 10.0 - i as f64).collect();
    let a = with_spectrum(1024, 768, &s) + Tensor::randn([1024, 768], F64) * 0.01;
    let a = a.to_kind(Kind::Float);
    let truth = reference_sigmas(&a);
    let e = cold().estimate(&a).unwrap();
    for i in 0..4 {
        assert!(rel(e.top_k[i], truth[i]) <= 1e-3, "sigma_{i}: {} vs {}", e.top_k[i], truth[i]);
    }
}

#[test]
fn a_near_degenerate_top_pair_is_resolved() {
    // sigma_1 / sigma_2 = 1.01, then a slowly decaying bulk.
    let mut s = vec![1.01, 1.0];
    s.extend((0..510).map(|i| 0.95 * (1.0 - i as f64 / 600.0)));
    let a = with_spectrum(512, 512, &s).to_kind(Kind::Float);
    let truth = reference_sigmas(&a);
    let e = cold().estimate(&a).unwrap();
    assert!(rel(e.sigma_max, truth[0]) <= 1e-3, "{} vs {}", e.sigma_max, truth[0]);
    assert!(rel(e.top_k[1], truth[1]) <= 1e-3, "{} vs {}", e.top_k[1], truth[1]);
}

#[test]
fn tall_and_wide_rectangles_agree_with_the_svd() {
    let a = Tensor::randn([4096, 1024], (Kind::Float, Device::Cpu));
    let truth = reference_sigmas(&a);
    let tall = cold().estimate(&a).unwrap();
    let wide = cold().estimate(&a.tr().contiguous()).unwrap();
    assert!(rel(tall.sigma_max, truth[0]) <= 1e-3, "4096x1024: {} vs {}", tall.sigma_max, truth[0]);
    assert!(rel(wide.sigma_max, truth[0]) <= 1e-3, "1024x4096: {} vs {}", wide.sigma_max, truth[0]);
}

#[test]
fn bf16_weights_match_the_float64_svd_of_their_values() {
    let a = Tensor::randn([1024, 512], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let truth = reference_sigmas(&a);
    let e = cold().estimate(&a).unwrap();
    assert!(rel(e.sigma_max, truth[0]) <= 1e-3, "{} vs {}", e.sigma_max, truth[0]);
    let f = full_spectrum(&a, FullPrecision::Device).unwrap();
    assert!(rel(f.sigma_max, truth[0]) <= 1e-6, "{} vs {}", f.sigma_max, truth[0]);
}

#[test]
fn a_warm_start_after_a_small_update_converges_in_two_iterations() {
    // Trained weights have a top gap; a Gaussian bulk under a decaying top.
    let s: Vec<f64> = (1..=64).map(|i| 3.0 / (i as f64).sqrt()).collect();
    let w = with_spectrum(768, 512, &s) + Tensor::randn([768, 512], F64) * 0.02;
    let w = w.to_kind(Kind::Float);
    let mut est = cold();
    let first = est.estimate(&w).unwrap();
    assert!(first.iterations > 2, "the cold start did real work ({} iterations)", first.iterations);
    for _ in 0..3 {
        // An update of relative size 1e-3 in spectral norm.
        let noise = Tensor::randn([768, 512], (Kind::Float, Device::Cpu));
        let scale = 1e-3 * reference_sigmas(&w)[0] / reference_sigmas(&noise)[0];
        let w2 = &w + noise * scale;
        let truth = reference_sigmas(&w2);
        let e = est.estimate(&w2).unwrap();
        assert!(e.iterations <= 2, "warm start took {} iterations", e.iterations);
        assert!(rel(e.sigma_max, truth[0]) <= 1e-4, "{} vs {}", e.sigma_max, truth[0]);
        // The warm block has k columns and no oversampling: the whole top k it reports still holds 1e-3.
        assert_eq!(e.top_k.len(), 4);
        for (i, (got, want)) in e.top_k.iter().zip(&truth).enumerate() {
            assert!(rel(*got, *want) <= 1e-3, "sigma_{}: {got} vs {want}", i + 1);
        }
    }
}

#[test]
fn a_warm_start_after_a_real_adamw_step_converges_in_two_iterations() {
    let s: Vec<f64> = (1..=32).map(|i| 2.0 / (i as f64).sqrt()).collect();
    // Entries of size ~0.2 and lr 1e-4: one step moves the weights by ~1e-3 relative, as in training.
    let w = ((with_spectrum(512, 256, &s) + Tensor::randn([512, 256], F64) * 0.02) * 10.0).to_kind(Kind::Float).set_requires_grad(true);
    let mut opt = tch::COptimizer::adamw(1e-4, 0.9, 0.999, 0.1, 1e-8, false).unwrap();
    opt.add_parameters(&w, 0).unwrap();
    let mut est = cold();
    est.estimate(&w.detach()).unwrap();
    let x = Tensor::randn([64, 512], (Kind::Float, Device::Cpu));
    opt.zero_grad().unwrap();
    x.matmul(&w).tanh().sum(Kind::Float).backward();
    opt.step().unwrap();
    let truth = reference_sigmas(&w.detach());
    let e = est.estimate(&w.detach()).unwrap();
    assert!(e.iterations <= 2, "warm start took {} iterations", e.iterations);
    assert!(rel(e.sigma_max, truth[0]) <= 1e-4, "{} vs {}", e.sigma_max, truth[0]);
}

#[test]
fn a_zero_matrix_has_sigma_zero_and_no_nan() {
    let z = Tensor::zeros([64, 48], (Kind::Float, Device::Cpu));
    let e = cold().estimate(&z).unwrap();
    assert_eq!(e.sigma_max, 0.0);
    assert!(e.top_k.iter().all(|s| *s == 0.0));
    let f = full_spectrum(&z, FullPrecision::Device).unwrap();
    assert_eq!(f.sigma_max, 0.0);
    for v in [f.frobenius_norm, f.stable_rank, f.effective_rank, f.quantiles.p10, f.quantiles.p99] {
        assert!(v.is_finite() && v == 0.0, "{f:?}");
    }
}

#[test]
fn nan_or_inf_weights_are_reported_not_panicked_on() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let a = Tensor::randn([300, 200], (Kind::Float, Device::Cpu));
        let _ = a.get(17).get(3).fill_(bad);
        assert!(!all_finite(&a));
        let mut est = cold();
        assert!(matches!(est.estimate(&a), Err(SpectraError::NonFinite(_))));
        assert!(!est.is_warm());
        assert!(matches!(full_spectrum(&a, FullPrecision::Device), Err(SpectraError::NonFinite(_))));
    }
}

#[test]
fn row_and_column_vectors_have_their_2_norm_as_sigma() {
    let v = Tensor::randn([1, 777], (Kind::Float, Device::Cpu));
    let norm = v.to_kind(Kind::Double).square().sum(Kind::Double).sqrt().double_value(&[]);
    for a in [v.shallow_clone(), v.tr()] {
        let e = cold().estimate(&a).unwrap();
        assert!(rel(e.sigma_max, norm) <= 1e-6, "{:?}: {} vs {norm}", a.size(), e.sigma_max);
        assert_eq!(e.top_k.len(), 1);
        let f = full_spectrum(&a, FullPrecision::Device).unwrap();
        assert!(rel(f.sigma_max, norm) <= 1e-9 && (f.stable_rank - 1.0).abs() < 1e-9);
    }
}

#[test]
fn an_estimate_that_runs_out_of_directions_is_exact() {
    // 50 columns are not a whole number of 8-column blocks, and a flat spectrum keeps the iteration
    // from converging early: the estimate must span all 50 directions, not stop at 48.
    let s: Vec<f64> = (0..50).map(|i| 1.0 - i as f64 / 100.0).collect();
    let a = with_spectrum(200, 50, &s).to_kind(Kind::Float);
    let truth = reference_sigmas(&a);
    // Tall, and wide in memory (a contiguous 50 × 200, whose Krylov space is the 200-wide side: the
    // basis is complete once it spans the 50-dimensional row space and the start block).
    for a in [a.shallow_clone(), a.tr().contiguous()] {
        let mut est = Estimator::new(EstimatorConfig { tol: 0.0, ..EstimatorConfig::default() });
        let e = est.estimate(&a).unwrap();
        assert!(e.converged, "a basis of every direction is converged");
        for i in 0..4 {
            assert!(rel(e.top_k[i], truth[i]) <= 1e-6, "{:?} sigma_{i}: {} vs {} after {} iterations", a.size(), e.top_k[i], truth[i], e.iterations);
        }
    }
}

#[test]
fn higher_rank_tensors_are_flattened_with_the_fan_in_side_as_columns() {
    let conv = Tensor::randn([96, 40, 3, 3], (Kind::Float, Device::Cpu));
    // Independent flattening: PyTorch's `weight.view(out, -1)`.
    let truth = reference_sigmas(&conv.reshape([96, 360]));
    let m = MatrixLayout::leading_rows(4).apply(&conv).unwrap();
    assert_eq!(m.size(), vec![96, 360]);
    let e = cold().estimate(&m).unwrap();
    assert!(rel(e.sigma_max, truth[0]) <= 1e-3);
    // Stacked experts [E, out, in] with fan-in last: rows E·out.
    let experts = Tensor::randn([4, 50, 30], (Kind::Float, Device::Cpu));
    let m = MatrixLayout { col_dims: vec![2] }.apply(&experts).unwrap();
    let truth = reference_sigmas(&experts.reshape([200, 30]));
    assert!(rel(cold().estimate(&m).unwrap().sigma_max, truth[0]) <= 1e-6);
    // Experts stored [E, in, out] (fan-in overridden to dim 1): the in dim becomes the columns.
    let m = MatrixLayout { col_dims: vec![1] }.apply(&experts).unwrap();
    let by_hand = experts.permute([0, 2, 1]).reshape([120, 50]);
    assert!(m.equal(&by_hand), "[E, in, out] flattens to rows E·out, columns in");
    let truth = reference_sigmas(&by_hand);
    assert!(rel(cold().estimate(&m).unwrap().sigma_max, truth[0]) <= 1e-6);
}

#[test]
fn the_full_spectrum_statistics_match_formulas_on_the_reference_svd() {
    let s: Vec<f64> = (1..=200).map(|i| 1.0 / (i as f64).powf(0.7)).collect();
    let a = (with_spectrum(400, 300, &s) + Tensor::randn([400, 300], F64) * 1e-3).to_kind(Kind::Float);
    let truth = reference_sigmas(&a);
    let f = full_spectrum(&a, FullPrecision::Device).unwrap();
    assert_eq!(f.singular_values.len(), 300);
    for (i, (x, t)) in f.singular_values.iter().zip(&truth).enumerate() {
        assert!((x - t).abs() <= 1e-6 * truth[0], "sigma_{i}: {x} vs {t}");
    }
    let fro = a.to_kind(Kind::Double).square().sum(Kind::Double).sqrt().double_value(&[]);
    assert!(rel(f.frobenius_norm, fro) <= 1e-9);
    assert!(rel(f.stable_rank, fro * fro / (truth[0] * truth[0])) <= 1e-6);
    let total: f64 = truth.iter().sum();
    let entropy: f64 = truth.iter().map(|x| x / total).map(|p| -p * p.ln()).sum();
    assert!(rel(f.effective_rank, entropy.exp()) <= 1e-6);
    // Quantile by hand: linear interpolation at p·(n−1) in ascending order.
    let mut asc = truth.clone();
    asc.reverse();
    let q = |p: f64| {
        let pos = p * (asc.len() - 1) as f64;
        let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
        asc[lo] * (1.0 - frac) + asc[(lo + 1).min(asc.len() - 1)] * frac
    };
    for (got, p) in [(f.quantiles.p10, 0.1), (f.quantiles.p50, 0.5), (f.quantiles.p90, 0.9), (f.quantiles.p99, 0.99)] {
        assert!((got - q(p)).abs() <= 1e-6 * truth[0], "p{p}: {got} vs {}", q(p));
    }
}

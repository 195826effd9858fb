//! The vector loops of the dense algebra and how they are dispatched: each function written once and
//! compiled for AVX-512, AVX2+FMA and the baseline, the copy chosen at run time ([`level`]).

use crate::pass::Flavour;

/// The instructions the loops below are compiled for, chosen once at run time like the pass's (the
/// default x86-64 target has neither AVX nor FMA, and these loops are a fifth of a cold estimate).
pub(super) fn level() -> Flavour {
    crate::pass::flavour()
}

/// Calls `$body` (an expression over the arguments) compiled for the best available level.
macro_rules! dispatch {
    (fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn inner($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) -> $ret {
                inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                inner($($arg),*)
            }
            match level() {
                // SAFETY: the CPU has the features these copies were compiled for.
                #[cfg(target_arch = "x86_64")]
                Flavour::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Flavour::Avx2 => unsafe { avx2($($arg),*) },
                _ => inner($($arg),*),
            }
        }
    };
}
pub(super) use dispatch;

/// `Σ a_i b_i` with sixteen independent sums (lets the compiler vectorise the reduction).
#[inline(always)]
pub(super) fn dot_lanes(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            s[k] += x[k] * y[k];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    let mut h = [0f64; 8];
    for k in 0..8 {
        h[k] = s[k] + s[k + 8];
    }
    ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7])) + tail
}

/// `y += alpha · x`.
#[inline(always)]
pub(super) fn axpy_lanes(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (u, v) in y.iter_mut().zip(x) {
        *u += alpha * v;
    }
}

dispatch! {
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        dot_lanes(a, b)
    }
}

// `out = Σ_i coef[i] · basis column i` (`n` rows): the Ritz vectors from the basis.
dispatch! {
    fn combine(out: &mut [f64], basis: &[f64], coef: &[f64], n: usize) -> () {
        out[..n].iter_mut().for_each(|v| *v = 0.0);
        for (i, &c) in coef.iter().enumerate() {
            axpy_lanes(&mut out[..n], c, &basis[i * n..(i + 1) * n]);
        }
    }
}

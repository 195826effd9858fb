//! What the kernels and the pass agree on: the block and group sizes, the float32 code path of this process
//! ([`Flavour`]) with the packed layout of a block it reads, and the rows to prefetch.

use std::sync::OnceLock;

/// Columns of `Q` in one packed block; the AVX-512 kernels take them four at a time, the AVX2 ones two.
pub(crate) const LANES: usize = 8;
/// Rows of `A` read together; each row of `Q` (or `W`) is loaded once per group.
pub(crate) const R: usize = 4;
/// Products summed in float32 registers along a row before they are folded into float64 (a multiple
/// of 16: the SIMD kernels read lines of 16 or 8).
pub(crate) const SEGMENT: usize = 1024;
/// Row groups accumulated into `W` in float32 before it is folded into float64 (256 rows).
pub(crate) const FOLD_GROUPS: usize = 64;

/// The path float32 passes take, chosen once: the fastest this CPU runs, or a slower one that
/// `GAINGUARD_SPECTRA_KERNELS` names (`avx2` or `portable`; benchmarks use it to time the paths of CPUs
/// without AVX-512 on one that has it). A name this CPU cannot run, or any other value, is ignored.
pub(crate) fn flavour() -> Flavour {
    static FLAVOUR: OnceLock<Flavour> = OnceLock::new();
    *FLAVOUR.get_or_init(|| {
        let asked = match std::env::var("GAINGUARD_SPECTRA_KERNELS").as_deref() {
            Ok("avx2") => Some(Flavour::Avx2),
            Ok("portable") => Some(Flavour::Portable),
            _ => None,
        };
        asked.filter(|f| f.runs_here()).unwrap_or_else(Flavour::detect)
    })
}

/// Which SIMD code path computes a float32 pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    Portable,
    Avx2,
    Avx512,
}

impl Flavour {
    /// The fastest path this CPU runs.
    pub(crate) fn detect() -> Flavour {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Flavour::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Flavour::Avx2;
            }
        }
        Flavour::Portable
    }

    /// Whether this CPU can run the path.
    pub(crate) fn runs_here(self) -> bool {
        match self {
            Flavour::Portable => true,
            Flavour::Avx2 => matches!(Flavour::detect(), Flavour::Avx2 | Flavour::Avx512),
            Flavour::Avx512 => Flavour::detect() == Flavour::Avx512,
        }
    }

    /// Length of one packed `n × 8` block of `Q` or `W`. The SIMD paths store it column by column, each
    /// column zero-padded to [`column_stride`] (a whole number of registers), so that one load of
    /// consecutive elements of a row meets as many consecutive elements of a column, and a block of 4
    /// columns or fewer (a warm start's) touches only those. The portable path stores rows of 8.
    pub(crate) fn packed_len(self, n: usize) -> usize {
        match self {
            Flavour::Avx512 | Flavour::Avx2 => column_stride(n) * LANES,
            Flavour::Portable => n * LANES,
        }
    }

    /// `f(j, position of (j, col))` for `j < n` in one packed block, in order of `j`.
    #[inline(always)]
    pub(crate) fn each_row(self, col: usize, n: usize, mut f: impl FnMut(usize, usize)) {
        match self {
            Flavour::Avx512 | Flavour::Avx2 => {
                let base = col * column_stride(n);
                for j in 0..n {
                    f(j, base + j);
                }
            }
            _ => {
                for j in 0..n {
                    f(j, j * LANES + col);
                }
            }
        }
    }

    /// The parts of a packed block of `plen` with `live` columns that the kernels touch, as
    /// `(step, take)`: `take` values from every `step`-th one. The SIMD paths touch the first `live` columns.
    pub(crate) fn live_spans(self, plen: usize, live: usize) -> (usize, usize) {
        match self {
            Flavour::Avx512 | Flavour::Avx2 => (plen, live * plen / LANES),
            Flavour::Portable => (plen, plen),
        }
    }
}

/// The distance between two columns of a packed block (SIMD paths): `n` rounded up to 16.
pub(crate) fn column_stride(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// The rows of the group after the current one, to prefetch while the current one is multiplied.
pub(crate) struct Prefetch {
    pub(crate) rows: [*const u8; R],
    pub(crate) elem_size: usize,
}

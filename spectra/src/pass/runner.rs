//! The thread pool the threaded parts of a pass run on: rayon's, or one the embedding program installs.

use std::sync::OnceLock;

/// Runs `f(i)` for every `i < count`, in parallel, returning when all are done: the shape of a hook
/// ([`set_parallel_runner`]) that a program embedding this crate may install to run passes on its own
/// thread pool.
pub type ParallelRunner = fn(count: usize, f: &(dyn Fn(usize) + Sync));

static RUNNER: OnceLock<ParallelRunner> = OnceLock::new();

/// Runs the threaded parts of every later pass with `runner` instead of rayon's pool. A trainer linked
/// with libtorch installs libgomp's (gainguard does): libgomp's workers spin for a while after each
/// parallel region, and on a 2-core machine threads of another pool would wait behind them after every
/// libtorch call (a cold estimate took seconds instead of 50 ms that way). The first call wins; returns
/// whether this one did.
pub fn set_parallel_runner(runner: ParallelRunner) -> bool {
    RUNNER.set(runner).is_ok()
}

fn rayon_runner(count: usize, f: &(dyn Fn(usize) + Sync)) {
    rayon::in_place_scope(|s| {
        for i in 1..count {
            s.spawn(move |_| f(i));
        }
        f(0);
    });
}

/// A pointer to the parts that the threads of one region share, each touching only its own index.
struct PartsPtr<P>(*mut P);
// SAFETY: every thread dereferences a different index (see for_each_part).
unsafe impl<P: Send> Sync for PartsPtr<P> {}

/// Runs `f(i, &mut parts[i])` for every part, in parallel, on the installed runner.
pub(crate) fn for_each_part<P: Send>(parts: &mut [P], f: impl Fn(usize, &mut P) + Sync) {
    let runner = RUNNER.get().copied().unwrap_or(rayon_runner);
    let len = parts.len();
    let base = PartsPtr(parts.as_mut_ptr());
    let base = &base;
    runner(len, &|i| {
        assert!(i < len, "a parallel runner called part {i} of {len}");
        // SAFETY: a runner calls each index once, so no two threads hold the same part, and `parts`
        // outlives the call.
        f(i, unsafe { &mut *base.0.add(i) })
    });
}

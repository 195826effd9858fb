//! The sharded estimator against the unsharded one, over an in-process all-reduce between threads.

use std::sync::{Arc, Barrier, Mutex};

use super::*;

/// An in-process all-reduce between `ranks` threads: each adds its buffer into a shared sum, and after a
/// barrier copies the sum back; a last barrier lets the leader clear it for the next call.
struct ThreadReduce {
    sum: Mutex<Vec<f64>>,
    barrier: Barrier,
    calls: Mutex<usize>,
}

impl ThreadReduce {
    fn all_reduce_sum(&self, buf: &mut [f64]) {
        {
            let mut sum = self.sum.lock().unwrap();
            if sum.is_empty() {
                sum.resize(buf.len(), 0.0);
            }
            assert_eq!(sum.len(), buf.len(), "the ranks reduce buffers of different lengths");
            for (s, b) in sum.iter_mut().zip(buf.iter()) {
                *s += *b;
            }
        }
        self.barrier.wait();
        buf.copy_from_slice(&self.sum.lock().unwrap());
        if self.barrier.wait().is_leader() {
            self.sum.lock().unwrap().clear();
            *self.calls.lock().unwrap() += 1;
        }
        self.barrier.wait();
    }
}

/// One rank's side of the in-process all-reduce, as a trainer implements [`Reduction`] over its own
/// collective.
struct Rank(Arc<ThreadReduce>);

impl Reduction for Rank {
    type Error = ();
    fn all_reduce_sum(&mut self, buffer: &mut [f64]) -> Result<(), ()> {
        self.0.all_reduce_sum(buffer);
        Ok(())
    }
}

fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    // A spectrum with a slow decay, as trained weights have, and no exact gap at the top.
    (0..rows * cols).map(|i| gauss(&mut state) * (1.0 + 0.5 * ((i % cols) as f64 / cols as f64))).collect()
}

fn host(data: &[f64], rows: usize, cols: usize) -> HostMatrix<'_> {
    assert_eq!(data.len(), rows * cols);
    // SAFETY: `data` holds rows·cols f64 values and outlives the matrix.
    unsafe { HostMatrix::from_raw(data.as_ptr() as *const u8, rows, cols, Elem::F64) }
}

fn config() -> EstimatorConfig {
    EstimatorConfig { tol: 1e-10, max_iters: 60, ..Default::default() }
}

/// Estimates of `shards` (row blocks of one matrix, as owned data) on one thread each.
fn sharded(shards: Vec<(Vec<f64>, usize)>, cols: usize) -> (Vec<Estimate>, usize) {
    let reduce = Arc::new(ThreadReduce { sum: Mutex::new(Vec::new()), barrier: Barrier::new(shards.len()), calls: Mutex::new(0) });
    let handles: Vec<_> = shards
        .into_iter()
        .map(|(data, rows)| {
            let reduce = Arc::clone(&reduce);
            std::thread::spawn(move || {
                let mut k = Krylov::new(config());
                let a = host(&data, rows, cols);
                match k.estimate_host_sharded(&a, 1, &mut Rank(reduce)) {
                    Ok(Outcome::Done(e)) => e,
                    other => panic!("sharded estimate: {other:?}"),
                }
            })
        })
        .collect();
    let estimates = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let calls = *reduce.calls.lock().unwrap();
    (estimates, calls)
}

fn unsharded(data: &[f64], rows: usize, cols: usize) -> Estimate {
    match Krylov::new(config()).estimate_host(&host(data, rows, cols), 1) {
        Outcome::Done(e) => e,
        other => panic!("unsharded estimate: {other:?}"),
    }
}

#[test]
fn two_row_shards_reduced_in_process_give_the_unsharded_estimate() {
    let (rows, cols) = (120, 80);
    let a = matrix(rows, cols, 7);
    let top = a[..70 * cols].to_vec();
    let bottom = a[70 * cols..].to_vec();
    let (estimates, calls) = sharded(vec![(top, 70), (bottom, rows - 70)], cols);
    let want = unsharded(&a, rows, cols);
    assert!(calls >= 3, "the estimate reduced {calls} times (the row count, then once per pass)");
    for e in &estimates {
        assert_eq!(e.top_k.len(), want.top_k.len());
        for (got, exp) in e.top_k.iter().zip(&want.top_k) {
            assert!((got - exp).abs() <= 1e-8 * exp, "sharded {got} vs unsharded {exp}");
        }
        assert!((e.frobenius_norm - want.frobenius_norm).abs() <= 1e-12 * want.frobenius_norm);
    }
    // Both ranks took the same decisions: the same values to the last bit and the same iteration count.
    assert_eq!(estimates[0], estimates[1]);
}

#[test]
fn a_column_split_is_the_row_split_of_the_transpose() {
    let (rows, cols) = (64, 100);
    let a = matrix(rows, cols, 11);
    // Rank i holds columns [c0, c1) of A; it hands them transposed (cols_i × rows, row-major).
    let shard = |c0: usize, c1: usize| -> (Vec<f64>, usize) {
        let mut t = Vec::with_capacity((c1 - c0) * rows);
        for c in c0..c1 {
            for r in 0..rows {
                t.push(a[r * cols + c]);
            }
        }
        (t, c1 - c0)
    };
    let (estimates, _) = sharded(vec![shard(0, 50), shard(50, cols)], rows);
    let want = unsharded(&a, rows, cols);
    // The two iterate in different spaces (rows' and columns'), each to its own stopping point.
    for (got, exp) in estimates[0].top_k.iter().zip(&want.top_k) {
        assert!((got - exp).abs() <= 1e-6 * exp, "column-sharded {got} vs unsharded {exp}");
    }
    assert_eq!(estimates[0], estimates[1]);
}

#[test]
fn a_nan_on_one_rank_is_nonfinite_on_every_rank() {
    let (rows, cols) = (80, 48);
    let mut a = matrix(rows, cols, 5);
    a[75 * cols + 3] = f64::NAN;
    let reduce = Arc::new(ThreadReduce { sum: Mutex::new(Vec::new()), barrier: Barrier::new(2), calls: Mutex::new(0) });
    let halves = [a[..40 * cols].to_vec(), a[40 * cols..].to_vec()];
    let outcomes: Vec<Outcome> = halves
        .into_iter()
        .map(|data| {
            let reduce = Arc::clone(&reduce);
            std::thread::spawn(move || {
                let mut r = |b: &mut [f64]| -> Result<(), ()> {
                    reduce.all_reduce_sum(b);
                    Ok(())
                };
                Krylov::new(config()).estimate_host_sharded(&host(&data, 40, cols), 1, &mut r).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(outcomes.iter().all(|o| *o == Outcome::NonFinite), "{outcomes:?}");
}

#[test]
fn a_failed_reduction_ends_the_estimate_with_its_error_and_forgets_the_warm_start() {
    let (rows, cols) = (60, 40);
    let a = matrix(rows, cols, 3);
    let mut k = Krylov::new(config());
    // One rank: the identity reduction is the unsharded estimate, to the last bit.
    let alone = k.estimate_host_sharded(&host(&a, rows, cols), 1, &mut Local);
    assert_eq!(alone, Ok(Outcome::Done(unsharded(&a, rows, cols))));
    assert!(k.is_warm());
    let mut calls = 0;
    let mut dead = |_: &mut [f64]| -> Result<(), &'static str> {
        calls += 1;
        if calls > 2 { Err("rank 1 is gone") } else { Ok(()) }
    };
    assert_eq!(k.estimate_host_sharded(&host(&a, rows, cols), 1, &mut dead), Err("rank 1 is gone"));
    assert!(!k.is_warm());
}

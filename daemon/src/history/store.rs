//! The bounded store: one ring of points per series, at most one point per interval, and a byte budget for
//! all of them that a series takes in full when it is created.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One sample: seconds since the history's epoch in tenths (u32: 13 years) and the value as f32 (a chart
/// and a 5-minute average need no more). 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub t: u32,
    pub v: f32,
}

/// Bytes one point costs.
pub const POINT_BYTES: usize = std::mem::size_of::<Point>();
/// What a series costs besides its points: the ring's header and its slot in its owner (an upper bound).
pub const SERIES_OVERHEAD: usize = 64;

/// The last `capacity` points of one series, at most one per interval bucket: a sample in the bucket of the
/// latest point replaces it (the latest value wins, as a scrape would see it).
#[derive(Debug)]
pub struct Ring {
    points: VecDeque<Point>,
    capacity: usize,
}

impl Ring {
    fn new(capacity: usize) -> Ring {
        Ring { points: VecDeque::new(), capacity }
    }

    /// Adds a point at tenth-second `t` whose bucket is `bucket`; returns the change in allocated bytes.
    fn push(&mut self, t: u32, v: f32, bucket: impl Fn(u32) -> u64) -> isize {
        if let Some(last) = self.points.back_mut() {
            if t < last.t {
                return 0;
            }
            if bucket(last.t) == bucket(t) {
                *last = Point { t, v };
                return 0;
            }
        }
        let before = self.points.capacity();
        if self.points.len() == self.capacity {
            self.points.pop_front();
        } else if self.points.len() == self.points.capacity() {
            // Grow by doubling, but never past the capacity, so that a full ring holds exactly its budget.
            let want = (self.points.len() * 2).max(16).min(self.capacity);
            self.points.reserve_exact(want - self.points.len());
        }
        self.points.push_back(Point { t, v });
        (self.points.capacity() as isize - before as isize) * POINT_BYTES as isize
    }

    pub fn points(&self) -> &VecDeque<Point> {
        &self.points
    }

    pub fn last(&self) -> Option<Point> {
        self.points.back().copied()
    }

    /// The latest point at or before `t`.
    pub fn at(&self, t: u32) -> Option<Point> {
        let i = self.points.partition_point(|p| p.t <= t);
        (i > 0).then(|| self.points[i - 1])
    }

    /// The points in `(from, to]`.
    pub fn window(&self, from: u32, to: u32) -> impl Iterator<Item = Point> + '_ {
        let a = self.points.partition_point(|p| p.t <= from);
        let b = self.points.partition_point(|p| p.t <= to);
        self.points.range(a..b).copied()
    }

    fn allocated(&self) -> usize {
        self.points.capacity() * POINT_BYTES
    }
}

/// A series' place in its owner: not created yet, kept, or refused because the budget was spent (counted
/// once).
#[derive(Debug, Default)]
pub enum Slot {
    #[default]
    Unset,
    Kept(Ring),
    Refused,
}

impl Slot {
    pub fn ring(&self) -> Option<&Ring> {
        match self {
            Slot::Kept(r) => Some(r),
            _ => None,
        }
    }
}

/// The byte budget of every series, and the clock that turns Unix times into points.
#[derive(Debug)]
pub struct Budget {
    /// Unix time of tenth-second 0.
    pub epoch: f64,
    /// Interval between kept points, in tenths of a second (at least 1).
    pub interval_ds: u32,
    /// Points per series.
    pub capacity: usize,
    pub max_bytes: usize,
    /// Bytes promised to existing series (their full rings and overhead); never above `max_bytes`.
    reserved: AtomicUsize,
    /// Bytes actually allocated to points, plus each series' overhead.
    used: AtomicUsize,
    series: AtomicUsize,
    refused: AtomicUsize,
}

impl Budget {
    pub fn new(epoch: f64, interval_ds: u32, capacity: usize, max_bytes: usize) -> Budget {
        Budget {
            epoch,
            interval_ds: interval_ds.max(1),
            capacity,
            max_bytes,
            reserved: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
            series: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        }
    }

    /// Bytes one series may grow to.
    pub fn series_bytes(&self) -> usize {
        self.capacity * POINT_BYTES + SERIES_OVERHEAD
    }

    /// Unix seconds as tenths since the epoch (times before the epoch are 0).
    pub fn tenths(&self, unix: f64) -> u32 {
        let d = ((unix - self.epoch) * 10.0).round();
        if d.is_nan() || d <= 0.0 {
            0
        } else {
            d.min(u32::MAX as f64) as u32
        }
    }

    pub fn unix(&self, t: u32) -> f64 {
        self.epoch + t as f64 / 10.0
    }

    fn bucket(&self, t: u32) -> u64 {
        (t / self.interval_ds) as u64
    }

    /// Records `v` at Unix time `unix` in `slot`, creating its ring if the budget allows.
    pub fn record(&self, slot: &mut Slot, unix: f64, v: f64) {
        if let Slot::Unset = slot {
            *slot = if self.reserve() { Slot::Kept(Ring::new(self.capacity)) } else { Slot::Refused };
        }
        if let Slot::Kept(ring) = slot {
            let delta = ring.push(self.tenths(unix), v as f32, |t| self.bucket(t));
            if delta >= 0 {
                self.used.fetch_add(delta as usize, Ordering::Relaxed);
            } else {
                self.used.fetch_sub((-delta) as usize, Ordering::Relaxed);
            }
        }
    }

    fn reserve(&self) -> bool {
        let cost = self.series_bytes();
        let ok = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_add(cost).filter(|n| *n <= self.max_bytes))
            .is_ok();
        if ok {
            self.used.fetch_add(SERIES_OVERHEAD, Ordering::Relaxed);
            self.series.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Gives a removed series' bytes back.
    pub fn release(&self, slot: Slot) {
        if let Slot::Kept(ring) = slot {
            self.reserved.fetch_sub(self.series_bytes(), Ordering::AcqRel);
            self.used.fetch_sub(ring.allocated() + SERIES_OVERHEAD, Ordering::Relaxed);
            self.series.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn series(&self) -> usize {
        self.series.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_keeps_one_point_per_interval_and_at_most_its_capacity() {
        let b = Budget::new(1000.0, 150, 4, 1 << 20);
        let mut s = Slot::Unset;
        // Three samples in one 15 s bucket: the latest wins.
        for (dt, v) in [(0.0, 1.0), (5.0, 2.0), (14.0, 3.0)] {
            b.record(&mut s, 1000.0 + dt, v);
        }
        let r = s.ring().unwrap();
        assert_eq!(r.points().len(), 1);
        assert_eq!(r.last().unwrap(), Point { t: 140, v: 3.0 });
        for k in 1..10 {
            b.record(&mut s, 1000.0 + 15.0 * k as f64, k as f64);
        }
        let r = s.ring().unwrap();
        assert_eq!(r.points().iter().map(|p| p.v).collect::<Vec<_>>(), vec![6.0, 7.0, 8.0, 9.0]);
        assert!(b.used_bytes() <= b.series_bytes(), "{} > {}", b.used_bytes(), b.series_bytes());
        assert_eq!(r.at(15 * 70).unwrap().v, 7.0);
        assert_eq!(r.window(15 * 60, 15 * 80).map(|p| p.v).collect::<Vec<_>>(), vec![7.0, 8.0]);
    }

    #[test]
    fn series_beyond_the_byte_budget_are_refused_and_counted_and_released_bytes_are_reused() {
        let b = Budget::new(0.0, 10, 100, 2 * (100 * POINT_BYTES + SERIES_OVERHEAD) + 10);
        let mut slots: Vec<Slot> = (0..3).map(|_| Slot::Unset).collect();
        for s in &mut slots {
            for k in 0..500 {
                b.record(s, k as f64, 1.0);
            }
        }
        assert!(matches!(slots[2], Slot::Refused));
        assert_eq!((b.series(), b.refused()), (2, 1));
        assert!(b.used_bytes() <= b.max_bytes, "{} > {}", b.used_bytes(), b.max_bytes);
        b.release(std::mem::take(&mut slots[0]));
        let mut again = Slot::Unset;
        b.record(&mut again, 1.0, 1.0);
        assert!(again.ring().is_some());
    }
}

//! The worker thread's tuning: its libtorch thread count and nice value, and the CPU time it has used (what
//! the budget charges a CPU round).

use std::time::Duration;

/// CPU time the calling thread has used (Linux `CLOCK_THREAD_CPUTIME_ID`); None elsewhere.
pub(super) fn thread_cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: writes into the timespec we own.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
    }
    None
}

/// Applies [`super::SamplerConfig::worker_threads`] and [`super::SamplerConfig::worker_nice`] to the calling thread.
/// Either can fail (no shim, a nice the process may not set); the worker then runs as it is, after one
/// log line.
pub(super) fn configure_worker_thread(threads: usize, nice: i32) {
    if threads > 0 && !crate::shim::limit_this_thread(threads) {
        eprintln!("gainguard: cannot limit the spectra worker to {threads} libtorch thread(s) in this build; it uses libtorch's default");
    }
    #[cfg(target_os = "linux")]
    if nice != 0 {
        // SAFETY: setpriority on this thread's own id; no memory is shared.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if rc != 0 {
            eprintln!("gainguard: cannot set the spectra worker's nice to {nice}: {}", std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

//! What the daemon's benchmark examples share: child processes that die with the bench, a minimal HTTP GET,
//! and what /proc says about a process. Loopback only.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};

/// Kills and reaps a child when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes a child die with this process, even when this one is killed before `Guard` can drop.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// GET over HTTP/1.0; the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Option<Vec<u8>> {
    get_with(addr, path, "")
}

/// [`get`] with extra header lines (each ending in `\r\n`); the body as sent (not decompressed).
pub fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    raw.get(..12).filter(|h| h.ends_with(b"200"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(raw[split + 4..].to_vec())
}

/// A field of /proc/PID/status in MiB (`VmRSS:`, `VmHWM:`).
pub fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// User plus system CPU seconds in a `/proc/.../stat` file (of a process or of one thread).
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// User plus system CPU seconds a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds of the process's threads whose name starts with one of `prefixes` (names are cut to 15
/// bytes: `gainguard-inges`).
pub fn threads_cpu_seconds(pid: u32, prefixes: &[&str]) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    tasks
        .flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            prefixes.iter().any(|p| comm.starts_with(p))
        })
        .map(|t| stat_cpu_seconds(&t.path().join("stat").to_string_lossy()))
        .sum()
}

/// A binary built beside this example (target/release/NAME).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let p = dir.join(name);
    assert!(p.exists(), "{} missing: build with `cargo build --release -p gainguard-daemon --bins --examples`", p.display());
    p
}

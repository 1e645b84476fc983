//! Where the benchmark's threads run, as the machine shows it: the round trip of one
//! cache line between two CPUs. On a VM the host places the vCPUs, and moves them: on
//! the 2-vCPU development machine the round trip between vCPU 0 and 1 switches between
//! about 130 ns and about 500 ns every few seconds (two vCPUs near each other, or far
//! apart), and with it every cost of a ring shared by a frontend thread and an iothread
//! (docs/performance.md, "Prefetching a batch's chains"). vubd-bench samples it before
//! each run, so that a table says which placements its runs saw.

use std::sync::atomic::{AtomicU64, Ordering};

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it for
    // cpu < CPU_SETSIZE (checked), and sched_setaffinity reads it for the calling thread.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The mean time, in ns, for a value written on CPU `a` to be seen on CPU `b` and
/// answered, over `rounds` round trips; `None` if the threads cannot be placed there.
/// The calling thread's own affinity is left alone (the work runs on two new threads).
pub fn round_trip_ns(a: usize, b: usize, rounds: u64) -> Option<f64> {
    #[repr(align(128))]
    struct Line(AtomicU64);
    let (ping, pong) = (Line(AtomicU64::new(0)), Line(AtomicU64::new(0)));
    std::thread::scope(|s| {
        let answer = s.spawn(|| {
            if !pin(b) {
                // Let the other side stop waiting.
                pong.0.store(u64::MAX, Ordering::Release);
                return false;
            }
            for i in 1..=rounds {
                while ping.0.load(Ordering::Acquire) != i {
                    if ping.0.load(Ordering::Relaxed) == u64::MAX {
                        return false;
                    }
                    std::hint::spin_loop();
                }
                pong.0.store(i, Ordering::Release);
            }
            true
        });
        let asked = s.spawn(|| {
            if !pin(a) {
                ping.0.store(u64::MAX, Ordering::Release);
                return None;
            }
            let start = std::time::Instant::now();
            for i in 1..=rounds {
                ping.0.store(i, Ordering::Release);
                loop {
                    let v = pong.0.load(Ordering::Acquire);
                    if v == i {
                        break;
                    }
                    if v == u64::MAX {
                        return None;
                    }
                    std::hint::spin_loop();
                }
            }
            Some(start.elapsed().as_nanos() as f64 / rounds as f64)
        });
        let t = asked.join().ok().flatten();
        let ok = answer.join().unwrap_or(false);
        t.filter(|_| ok)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_between_two_cpus_takes_time() {
        // SAFETY: sysconf has no memory-safety preconditions.
        let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        if ncpu < 2 {
            return;
        }
        let t = round_trip_ns(0, 1, 20_000).expect("two CPUs");
        assert!(t > 1.0 && t < 1e6, "{t} ns");
        assert_eq!(round_trip_ns(0, libc::CPU_SETSIZE as usize, 10), None);
    }
}

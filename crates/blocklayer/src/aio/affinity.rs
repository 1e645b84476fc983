//! CPU affinity of helper threads. A thread inherits its creator's affinity: a helper
//! started by an iothread that an operator confined to one CPU would compete with that
//! iothread for it, so helpers take the whole process's set instead.

/// The CPUs the process may run on: its main thread's affinity (the process id is the
/// main thread's id).
pub fn process_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data, all zeroes a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of the size given.
    let r = unsafe {
        libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    (r == 0).then_some(set)
}

/// Lets the calling thread run on every CPU the process may (see the module).
pub fn use_process_cpus() {
    if let Some(set) = process_cpus() {
        // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is this thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    }
}

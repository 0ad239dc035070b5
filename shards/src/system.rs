//! Process-level set-up the executors need.

/// glommio registers io_uring buffers, which count against RLIMIT_MEMLOCK;
/// raise the soft limit to the hard limit so that every shard fits
/// (FIELD-NOTES.md "glommio and memlock"). Without CAP_SYS_RESOURCE the hard
/// limit cannot be raised, so this is all we can do.
pub fn raise_memlock_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read/write only the struct we pass, which
    // lives on our stack for the duration of the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                tracing::warn!("could not raise the memlock soft limit");
            }
        }
    }
}

/// Raise the open-files soft limit to the hard limit: every device is a
/// socket. Returns the limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// Blocks the termination signals in the calling thread until the guard is
/// dropped. Threads spawned meanwhile inherit the blocked mask, so the
/// shard threads never take SIGINT/SIGTERM: a handler that interrupts a
/// shard inside `io_uring_enter` can leave the executor parked without its
/// timer armed, and then the shutdown flag is never seen (observed: a
/// gateway that ignored SIGTERM). The signals go to the thread that
/// started the runtime instead.
pub struct SignalMask {
    previous: libc::sigset_t,
    /// The mask is per thread: restore it on the thread that set it.
    _not_send: std::marker::PhantomData<*const ()>,
}

const TERMINATION_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

impl SignalMask {
    pub fn block_termination_signals() -> SignalMask {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise
        // it; pthread_sigmask only reads `set` and writes `previous`, both
        // valid for the duration of the calls.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in TERMINATION_SIGNALS {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous);
            SignalMask {
                previous,
                _not_send: std::marker::PhantomData,
            }
        }
    }
}

impl Drop for SignalMask {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `block_termination_signals`
        // on this same thread (the guard is not Send).
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}

/// The CPUs the calling thread may run on (its affinity mask: `taskset`,
/// cgroup cpusets), in order; all online CPUs if the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills for the
    // calling thread (pid 0); its size is passed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let cpus: Vec<usize> = if rc == 0 {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` < CPU_SETSIZE, inside `set`.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        (0..online_cpus()).collect()
    } else {
        cpus
    }
}

/// CPUs online on the machine (whatever this process's affinity mask).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf reads a system value; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// Widens the calling thread's affinity to every online CPU until dropped
/// (then the previous mask is restored). A process started meanwhile
/// inherits the wide mask: a load generator confined with `taskset -c 1`
/// starts the server it measures on the whole machine, not on its own core.
pub struct WideAffinity {
    previous: libc::cpu_set_t,
    restore: bool,
    /// The mask is per thread: restore it on the thread that set it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl WideAffinity {
    pub fn online() -> WideAffinity {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: plain bit sets on our stack, sizes passed; only the
        // calling thread (pid 0) is read and changed.
        unsafe {
            let mut previous: libc::cpu_set_t = std::mem::zeroed();
            let read = libc::sched_getaffinity(0, size, &mut previous) == 0;
            let mut all: libc::cpu_set_t = std::mem::zeroed();
            for cpu in 0..online_cpus().min(libc::CPU_SETSIZE as usize) {
                libc::CPU_SET(cpu, &mut all);
            }
            let set = read && libc::sched_setaffinity(0, size, &all) == 0;
            WideAffinity {
                previous,
                restore: set,
                _not_send: std::marker::PhantomData,
            }
        }
    }
}

impl Drop for WideAffinity {
    fn drop(&mut self) {
        if self.restore {
            // SAFETY: restores the mask read in `online`, on the same thread.
            unsafe {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.previous);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confined_thread_widens_to_every_online_cpu_and_back() {
        let online = online_cpus();
        let last = online - 1;
        std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            unsafe { libc::CPU_SET(last, &mut one) };
            let rc =
                unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) };
            assert_eq!(rc, 0);
            assert_eq!(allowed_cpus(), vec![last]);
            {
                let _wide = WideAffinity::online();
                assert_eq!(allowed_cpus(), (0..online).collect::<Vec<_>>());
            }
            assert_eq!(allowed_cpus(), vec![last]);
        })
        .join()
        .unwrap();
    }
}

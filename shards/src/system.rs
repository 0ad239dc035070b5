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

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

//! File descriptors: each client connection takes one, and one more for each upstream
//! connection it keeps busy. Service managers and shells often start a process with a soft
//! limit of 1024 and a much higher hard one; Go's runtime raises the soft limit to the hard
//! one at start for this reason, and so does ifmatch. A limit still short of
//! `max_connections` is logged at start: past it, accepts fail and connections wait in the
//! kernel's backlog instead of getting the 503 that `max_connections` promises.

/// Descriptors the process needs besides its connections: listeners, the runtime's
/// event queue, log and config files, a margin.
const BASE: u64 = 64;

/// Raises the soft limit on open files to the hard one, and warns when what it ends at
/// cannot hold `max_connections` clients with an upstream connection each.
pub fn raise_limit(max_connections: usize) {
    let Some(limit) = raise() else {
        return;
    };
    let needed = BASE.saturating_add(2 * max_connections as u64);
    if limit < needed {
        tracing::warn!(
            limit,
            max_connections,
            needed,
            "the open-file limit is short of max_connections (a client connection and an \
             upstream one each): past it, new connections wait unaccepted instead of getting \
             503; raise the limit (systemd LimitNOFILE, ulimit -n, docker --ulimit nofile) \
             or lower max_connections"
        );
    }
}

/// What to raise when `e` says the process (EMFILE) or the whole system (ENFILE) has run
/// out of file descriptors; `None` for any other error.
pub fn exhausted(e: &std::io::Error) -> Option<&'static str> {
    match e.raw_os_error()? {
        libc::EMFILE => Some(
            "the proxy's open-file limit is used up; raise it (systemd LimitNOFILE, ulimit -n, \
             docker --ulimit nofile) or lower max_connections",
        ),
        libc::ENFILE => Some(
            "the system's open-file limit is used up; raise it (sysctl fs.file-max) or find \
             the process holding them",
        ),
        _ => None,
    }
}

/// What to raise when the process or the system has no file descriptor left right now
/// (see [`exhausted`]), by opening one: for a failure that carries no error number, as a
/// host name's lookup does (getaddrinfo says "Name or service not known" when it cannot
/// open `/etc/hosts` or a DNS socket).
pub fn exhausted_now() -> Option<&'static str> {
    std::fs::File::open("/dev/null")
        .err()
        .and_then(|e| exhausted(&e))
}

/// The soft limit after raising it to the hard one, or `None` where it cannot be read.
#[cfg(unix)]
fn raise() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given. It may fail (macOS refuses more
        // than OPEN_MAX): the soft limit then stays as it was.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Some(lim.rlim_cur)
}

#[cfg(not(unix))]
fn raise() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_names_the_limit_to_raise() {
        let os = std::io::Error::from_raw_os_error;
        assert!(exhausted(&os(libc::EMFILE))
            .unwrap()
            .contains("LimitNOFILE"));
        assert!(exhausted(&os(libc::ENFILE))
            .unwrap()
            .contains("fs.file-max"));
        assert_eq!(exhausted(&os(libc::ECONNREFUSED)), None);
        assert_eq!(exhausted(&std::io::ErrorKind::TimedOut.into()), None);
    }
}

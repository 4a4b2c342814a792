//! A queue worker's timer: a non-blocking timerfd the worker waits on beside
//! its kicks and completions, for requests that are throttled or whose
//! completion is being held (modelled latency, injected stalls).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub struct Timer {
    fd: OwnedFd,
    armed: Option<Instant>,
}

impl Timer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, armed: None })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the timer fire at `deadline` unless it already fires earlier.
    pub fn arm_by(&mut self, deadline: Instant) -> io::Result<()> {
        if self.armed.is_some_and(|t| t <= deadline) {
            return Ok(());
        }
        // A zero it_value would disarm: fire in at least a nanosecond.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid fd and a pointer to a live itimerspec.
        if unsafe { libc::timerfd_settime(self.fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = Some(deadline);
        Ok(())
    }

    /// Acknowledges a firing; the timer is then unarmed.
    pub fn clear(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer; EAGAIN when not fired.
        let _ = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        self.armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_earliest_deadline() {
        let mut t = Timer::new().unwrap();
        let start = Instant::now();
        // Far apart, so a loaded machine cannot blur which deadline fired.
        t.arm_by(start + Duration::from_secs(5)).unwrap();
        t.arm_by(start + Duration::from_millis(20)).unwrap();
        t.arm_by(start + Duration::from_secs(10)).unwrap(); // later: ignored
        let mut pfd = libc::pollfd {
            fd: t.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 4000) };
        assert_eq!(n, 1, "the 20 ms deadline did not replace the 5 s one");
        t.clear();
        assert!(t.armed.is_none());
    }
}

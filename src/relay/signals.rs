//! The worker's signals: SIGTERM (or the postmaster's death) and SIGHUP, latched, and the latch
//! sleep every wait of the relay goes through. Below every other relay file, so that none of
//! them needs the worker's loop to wait.

use pgrx::bgworkers::BackgroundWorker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

/// True once SIGTERM (or postmaster death) was seen. pgrx's flag is reset when read, so it
/// is latched here.
pub fn shutdown_requested() -> bool {
    if BackgroundWorker::sigterm_received() {
        SHUTDOWN.store(true, Ordering::Relaxed);
    }
    SHUTDOWN.load(Ordering::Relaxed)
}

/// True if SIGHUP arrived and the main loop has not reloaded yet. Does not consume it.
pub fn reload_requested() -> bool {
    if BackgroundWorker::sighup_received() {
        RELOAD.store(true, Ordering::Relaxed);
    }
    RELOAD.load(Ordering::Relaxed)
}

pub fn take_reload() -> bool {
    let pending = reload_requested();
    RELOAD.store(false, Ordering::Relaxed);
    pending
}

/// Sleeps on the latch; returns false if the worker must stop.
pub fn sleep(timeout: Duration) -> bool {
    if shutdown_requested() {
        return false;
    }
    if !BackgroundWorker::wait_latch(Some(timeout.max(Duration::from_millis(1)))) {
        SHUTDOWN.store(true, Ordering::Relaxed);
    }
    !shutdown_requested()
}

/// Waits up to `timeout` in `wait`, a wait of its own off the latch (on a channel, which wakes
/// the moment it is ready instead of at the next latch timeout), then notes SIGTERM and the
/// postmaster's death as [`sleep`] would, with a latch poll that does not wait. Returns false
/// if the worker must stop.
pub fn wait_off_latch(timeout: Duration, wait: impl FnOnce(Duration)) -> bool {
    if shutdown_requested() {
        return false;
    }
    wait(timeout);
    if !BackgroundWorker::wait_latch(Some(Duration::ZERO)) {
        SHUTDOWN.store(true, Ordering::Relaxed);
    }
    !shutdown_requested()
}

/// Waits out `duration` even if the latch is set meanwhile (emit's commits set it to wake an
/// idle relay), returning early only when the worker must stop (false) or reload (true).
pub fn pause(duration: Duration) -> bool {
    let deadline = std::time::Instant::now() + duration;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || reload_requested() {
            return !shutdown_requested();
        }
        if !sleep(left) {
            return false;
        }
    }
}

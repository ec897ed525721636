//! Waiting for something a test observes (a window, a bus name, a line of output), polling
//! briefly instead of sleeping a fixed time.

use std::thread::sleep;
use std::time::{Duration, Instant};

/// Polls `f` every 10 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 20 ms until it holds and returns how long that took; fails the test
/// with "timed out after `limit` waiting for `what`" when it does not within `limit`.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

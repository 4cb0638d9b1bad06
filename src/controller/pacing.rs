//! Pacing of requests that a storm of changes would otherwise repeat back to back.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Spaces out one kind of request per key (a store, a cache). After a request that took `d`,
/// the next for the same key waits `9 × d`, at most `max_pause`: at most a tenth of the time goes
/// to these requests, a quiet API server still answers within milliseconds, and a loaded one
/// (whose requests take longer) is asked less often.
pub struct Pacer {
    next: Mutex<HashMap<String, Instant>>,
    max_pause: Duration,
}

/// Past this many keys, keys whose pause is over are forgotten.
const KEYS_KEPT: usize = 1024;

impl Pacer {
    pub fn new(max_pause: Duration) -> Self {
        Self {
            next: Mutex::default(),
            max_pause,
        }
    }

    /// How long `key` must still wait; `None` when it may go now.
    pub fn wait(&self, key: &str) -> Option<Duration> {
        let next = self.lock().get(key).copied()?;
        next.checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Records that a request for `key` started at `started` has just finished.
    pub fn done(&self, key: &str, started: Instant) {
        let now = Instant::now();
        let pause = (now.saturating_duration_since(started) * 9).min(self.max_pause);
        let mut next = self.lock();
        if next.len() >= KEYS_KEPT {
            next.retain(|_, at| *at > now);
        }
        next.insert(key.to_owned(), now + pause);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        // The map holds plain instants; a panic elsewhere cannot leave it inconsistent.
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(5);

    #[test]
    fn a_key_waits_nine_times_its_last_request_and_no_longer_than_the_cap() {
        let pacer = Pacer::new(CAP);
        assert_eq!(pacer.wait("a"), None, "a key never paced may go at once");

        let took = Duration::from_millis(200);
        pacer.done("a", Instant::now() - took);
        let wait = pacer.wait("a").expect("a pause after a request");
        assert!(wait > took * 8 && wait < took * 10, "paused {wait:?}");
        assert_eq!(pacer.wait("b"), None, "keys are paced apart");

        pacer.done("slow", Instant::now() - Duration::from_secs(60));
        let wait = pacer.wait("slow").expect("a pause after a slow request");
        assert!(wait <= CAP, "paused {wait:?}");
    }

    #[test]
    fn a_quick_request_leaves_almost_no_pause() {
        let pacer = Pacer::new(CAP);
        pacer.done("a", Instant::now());
        let wait = pacer.wait("a");
        assert!(wait.is_none_or(|w| w < Duration::from_millis(50)));
    }

    #[test]
    fn keys_whose_pause_is_over_are_forgotten() {
        let pacer = Pacer::new(CAP);
        for i in 0..KEYS_KEPT {
            pacer.done(&i.to_string(), Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
        pacer.done("last", Instant::now());
        assert_eq!(pacer.lock().len(), 1, "only the key still pausing is kept");
    }
}

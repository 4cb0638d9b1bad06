//! How failed copies are retried: attempts and the backoff between them. The lifecycle plan
//! decides with it and the copy Job tells its last attempt so, so it sits below both.

use std::time::Duration;

/// How failed copies are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each further one.
    pub base_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            base_delay: Duration::from_secs(Self::DEFAULT_BASE_DELAY_SECONDS),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// Attempts unless told otherwise (`templatecache run --max-attempts`).
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// First wait unless told otherwise (`templatecache run --retry-base-seconds`).
    pub const DEFAULT_BASE_DELAY_SECONDS: u64 = 10;

    /// Whether no attempt follows `attempt`, whatever its outcome.
    pub fn is_last(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// Wait after attempt `attempt` (from 1) failed.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

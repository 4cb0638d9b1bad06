//! Stalls: bodies are streamed without an overall timeout (a large template takes as long as it
//! takes), so a source that stops sending without closing the connection would hold the copy,
//! and the room reserved for it, forever. Every wait on a source (an answer, each chunk of a
//! body) is bounded by the stall limit instead, and a source silent for that long fails the
//! attempt with [`CopyError::Stalled`]; the operator retries it as a new attempt, which resumes
//! what was verified (see `resume`).

use std::time::Duration;

use crate::CopyError;

/// How long a source may send nothing.
#[derive(Clone, Copy, Debug)]
pub struct StallLimit(pub Duration);

impl StallLimit {
    pub fn from_seconds(seconds: u64) -> Self {
        Self(Duration::from_secs(seconds))
    }

    /// `pending`'s output, or [`CopyError::Stalled`] if it takes longer than the limit.
    /// `got` is how many bytes of `source_name` had arrived, for the message.
    pub async fn wait<T>(
        self,
        source_name: &str,
        got: u64,
        pending: impl Future<Output = T>,
    ) -> Result<T, CopyError> {
        tokio::time::timeout(self.0, pending)
            .await
            .map_err(|_| CopyError::Stalled {
                source_name: source_name.to_owned(),
                got,
                seconds: self.0.as_secs(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_longer_than_the_limit_fails_naming_the_stall() {
        let limit = StallLimit::from_seconds(2);
        let answer = limit.wait("http://mirror/a.img", 65_536, async { 7 }).await;
        assert_eq!(answer.expect("in time"), 7);
        let silent = limit
            .wait("http://mirror/a.img", 65_536, std::future::pending::<()>())
            .await
            .expect_err("stalled");
        assert_eq!(
            silent.to_string(),
            "http://mirror/a.img sent nothing for 2 s after 65536 bytes: the source stalled, \
             so this attempt stops (the limit is the copy's --stall-seconds)"
        );
    }
}

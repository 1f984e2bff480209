//! How long to wait before trying again: one exponential schedule with a cap, used by
//! every retry in radflow (connecting to NATS, redelivering a message that failed
//! transiently, reading from a store that failed transiently).

use std::future::Future;
use std::time::Duration;

/// Delays that start at `first` and grow by `factor` per attempt up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub first: Duration,
    /// Growth per further failure.
    pub factor: u32,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// A schedule from its first delay, growth factor and cap.
    pub const fn new(first: Duration, factor: u32, max: Duration) -> Self {
        Self { first, factor, max }
    }

    /// The same delay every time.
    pub const fn constant(delay: Duration) -> Self {
        Self::new(delay, 1, delay)
    }

    /// The delay after failed attempt `attempt` (1 for the first failure).
    pub fn delay(&self, attempt: u32) -> Duration {
        let mut delay = self.first.min(self.max);
        for _ in 1..attempt.max(1) {
            if delay >= self.max {
                break;
            }
            delay = delay.saturating_mul(self.factor).min(self.max);
        }
        delay
    }

    /// Runs `op` up to `tries` times, waiting by this schedule between tries, as long
    /// as its error is `transient`; the last result is returned.
    pub async fn retry<T, E, Fut>(
        &self,
        tries: u32,
        transient: impl Fn(&E) -> bool,
        mut op: impl FnMut() -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if attempt < tries && transient(&e) => {
                    tokio::time::sleep(self.delay(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_grow_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(250), 2, Duration::from_secs(5));
        let ms: Vec<u128> = (1..=8).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(b.delay(0), b.delay(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
        let c = Backoff::constant(Duration::from_millis(10));
        assert_eq!(c.delay(1), c.delay(9));
    }

    #[tokio::test]
    async fn retries_transient_errors_only_and_as_often_as_allowed() {
        let b = Backoff::constant(Duration::from_millis(1));
        let calls = AtomicU32::new(0);
        let r: Result<(), &str> = b
            .retry(
                3,
                |e| *e == "transient",
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("transient")
                },
            )
            .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err("transient"), 3));

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), &str> = b
            .retry(
                3,
                |e| *e == "transient",
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("permanent")
                },
            )
            .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Err("permanent"), 1));

        calls.store(0, Ordering::SeqCst);
        let r = b
            .retry(
                5,
                |_: &&str| true,
                || async {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0 | 1 => Err("transient"),
                        _ => Ok(7),
                    }
                },
            )
            .await;
        assert_eq!((r, calls.load(Ordering::SeqCst)), (Ok(7), 3));
    }
}

//! Token bucket rate limiting, with the clock passed in so it is exact
//! under test.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` must be > 0 and `burst` >= 1.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self { rate, burst: burst as f64, tokens: burst as f64, updated: now }
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // A rate so low that the wait overflows a Duration (config
            // refuses rates below 1e-6) waits "for ever".
            Err(Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate).unwrap_or(Duration::MAX))
        }
    }

    /// Adopts a new rate and burst (config reload), keeping the tokens it
    /// has, capped at the new burst.
    pub fn reconfigure(&mut self, rate: f64, burst: u32, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst as f64;
        self.tokens = self.tokens.min(self.burst);
    }

    pub fn matches(&self, rate: f64, burst: u32) -> bool {
        self.rate == rate && self.burst == burst as f64
    }

    fn refill(&mut self, now: Instant) {
        // A clock that goes backwards adds nothing.
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = self.updated.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_exactly_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(t0), Ok(()));
        }
        // Empty: the next token is 100 ms away.
        assert_eq!(bucket.try_take(t0), Err(Duration::from_millis(100)));
        assert_eq!(bucket.try_take(t0 + Duration::from_millis(60)), Err(Duration::from_millis(40)));
        assert_eq!(bucket.try_take(t0 + Duration::from_millis(100)), Ok(()));
        // Over one simulated second at the rate, exactly 10 are allowed.
        let start = t0 + Duration::from_millis(100);
        let allowed = (1..=1000).filter(|ms| bucket.try_take(start + Duration::from_millis(*ms)).is_ok()).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn never_holds_more_than_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(100.0, 2, t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(bucket.try_take(later).is_ok());
        assert!(bucket.try_take(later).is_ok());
        assert!(bucket.try_take(later).is_err());
    }

    #[test]
    fn a_clock_going_backwards_adds_no_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(1.0, 1, t0);
        assert!(bucket.try_take(t0).is_ok());
        assert!(bucket.try_take(t0 - Duration::from_secs(5)).is_err());
        assert!(bucket.try_take(t0 + Duration::from_millis(999)).is_err());
        assert!(bucket.try_take(t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn reconfigure_caps_tokens_at_the_new_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1.0, 10, t0);
        bucket.reconfigure(1.0, 2, t0);
        assert!(bucket.try_take(t0).is_ok());
        assert!(bucket.try_take(t0).is_ok());
        assert_eq!(bucket.try_take(t0), Err(Duration::from_secs(1)));
    }
}

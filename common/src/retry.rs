//! Exponential backoff with jitter and an overall deadline, for dialing a coordinator or a peer that
//! may not be up yet.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Instant,
    attempts: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`, and gives up once `total` has passed since now.
    pub fn new(initial: Duration, max: Duration, total: Duration) -> Self {
        Backoff { next: initial, max, deadline: Instant::now() + total, attempts: 0 }
    }

    /// Attempts made so far (calls to `next_delay`, plus the first try).
    pub fn attempts(&self) -> u32 {
        self.attempts + 1
    }

    /// The delay before the next attempt, or `None` when the deadline leaves no room for one.
    /// Jitter (up to +25%) keeps a crowd of workers from retrying in lockstep.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        let jitter = self.next.mul_f64(rand::random::<f64>() * 0.25);
        let delay = (self.next + jitter).min(self.deadline - now);
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_cap_and_stop_at_deadline() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(40), Duration::from_secs(60));
        let d: Vec<Duration> = (0..5).map(|_| b.next_delay().unwrap()).collect();
        // 10, 20, 40, 40, 40 ms, each with at most 25% jitter.
        for (delay, base) in d.iter().zip([10u64, 20, 40, 40, 40]) {
            let base = Duration::from_millis(base);
            assert!(*delay >= base && *delay <= base.mul_f64(1.25), "{delay:?} for a base of {base:?}");
        }
        assert_eq!(b.attempts(), 6);
        let mut expired = Backoff::new(Duration::from_millis(10), Duration::from_millis(40), Duration::ZERO);
        assert_eq!(expired.next_delay(), None);
    }
}

//! Rate limits (GCRA, the generic cell rate algorithm): per client address and per token
//! issuer on registration creation, and per client address on failed authentication.
//! A limit of zero is off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One limit: `rate` events per second on average, `burst` at once.
pub struct Gcra {
    /// Time between events at the sustained rate.
    interval: Duration,
    /// How far ahead of now the theoretical arrival time may run.
    tolerance: Duration,
    /// Theoretical arrival time per key.
    tat: Mutex<HashMap<String, Instant>>,
}

impl Gcra {
    /// `per_minute` events per minute with bursts of `burst`; `None` when `per_minute` is 0.
    pub fn new(per_minute: u32, burst: u32) -> Option<Gcra> {
        if per_minute == 0 {
            return None;
        }
        let interval = Duration::from_secs(60) / per_minute;
        Some(Gcra {
            interval,
            tolerance: interval * (burst.max(1) - 1),
            tat: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one event for `key`: `Err(wait)` when it is over the limit (nothing counted).
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut map = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            // Forget keys whose allowance has fully recovered, so memory stays bounded.
            map.retain(|_, tat| *tat > now);
        }
        let tat = map.get(key).copied().unwrap_or(now).max(now);
        let allowed_from = tat.checked_sub(self.tolerance).unwrap_or(now);
        if now < allowed_from {
            return Err(allowed_from - now);
        }
        map.insert(key.to_string(), tat + self.interval);
        Ok(())
    }

    /// Whether `key` is over the limit now, without counting anything.
    pub fn blocked(&self, key: &str, now: Instant) -> Option<Duration> {
        let map = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let tat = (*map.get(key)?).max(now);
        let allowed_from = tat.checked_sub(self.tolerance)?;
        (now < allowed_from).then(|| allowed_from - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let g = Gcra::new(60, 3).unwrap(); // one a second, bursts of 3
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(g.check("a", t0).is_ok());
        }
        let wait = g.check("a", t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(g.check("b", t0).is_ok(), "keys are independent");
        assert!(g.check("a", t0 + Duration::from_secs(1)).is_ok());
        assert!(Gcra::new(0, 5).is_none());
    }
}

//! Every refusal is audited, but a flood of identical ones cannot fill the disk.
//!
//! Refusals are counted per (client address, cause) in one-minute windows: the first
//! [`RefusalThrottle::PER_WINDOW`] of a window are written one by one; the rest are counted,
//! and once the window is over the count goes into the audit log as one aggregate record (the
//! sweep writes it). So the log holds every refusal — most individually, a flood as a count —
//! and grows by a bounded amount per address and cause per minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals not written one by one: their address, cause, count and the window they fell in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub client: String,
    pub cause: String,
    pub count: u64,
    /// Seconds since the Unix epoch of the window's start and end.
    pub from: i64,
    pub to: i64,
}

struct Window {
    started: Instant,
    started_unix: i64,
    recorded: u32,
    suppressed: u64,
}

pub struct RefusalThrottle {
    windows: Mutex<HashMap<(String, String), Window>>,
}

impl Default for RefusalThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl RefusalThrottle {
    /// Refusals per address and cause written one by one in a window.
    pub const PER_WINDOW: u32 = 20;
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Distinct (address, cause) pairs tracked; past it, addresses share one entry per cause.
    const MAX_KEYS: usize = 10_000;

    pub fn new() -> Self {
        RefusalThrottle {
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this refusal is to be written on its own (`true`) or only counted.
    pub fn admit(&self, client_ip: &str, cause: &str, now: Instant, now_unix: i64) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = (client_ip.to_string(), cause.to_string());
        if !windows.contains_key(&key) && windows.len() >= Self::MAX_KEYS {
            key.0 = "*".into();
        }
        let w = windows.entry(key).or_insert(Window {
            started: now,
            started_unix: now_unix,
            recorded: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= Self::WINDOW && w.suppressed == 0 {
            // A new window; one with a count waits for the sweep to write it first.
            w.started = now;
            w.started_unix = now_unix;
            w.recorded = 0;
        }
        if w.recorded < Self::PER_WINDOW && w.suppressed == 0 {
            w.recorded += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// The counts of windows that are over (every window when `all`, at shutdown), to be
    /// written as aggregate records; their entries are forgotten.
    pub fn drain(&self, now: Instant, now_unix: i64, all: bool) -> Vec<Suppressed> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        windows.retain(|(client, cause), w| {
            let over = all || now.duration_since(w.started) >= Self::WINDOW;
            if !over {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Suppressed {
                    client: client.clone(),
                    cause: cause.clone(),
                    count: w.suppressed,
                    from: w.started_unix,
                    to: now_unix,
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_written_up_to_the_bound_then_counted_and_drained_once() {
        let t = RefusalThrottle::new();
        let start = Instant::now();
        let written = (0..1000)
            .filter(|_| t.admit("192.0.2.1", "INVALID_TOKEN", start, 1_000))
            .count();
        assert_eq!(written, RefusalThrottle::PER_WINDOW as usize);
        // Another cause, another address: their own allowance.
        assert!(t.admit("192.0.2.1", "REGISTRATION_NOT_FOUND", start, 1_000));
        assert!(t.admit("192.0.2.2", "INVALID_TOKEN", start, 1_000));
        assert_eq!(t.drain(start, 1_000, false), vec![]);
        let later = start + RefusalThrottle::WINDOW;
        let drained = t.drain(later, 1_060, false);
        assert_eq!(
            drained,
            vec![Suppressed {
                client: "192.0.2.1".into(),
                cause: "INVALID_TOKEN".into(),
                count: 1000 - RefusalThrottle::PER_WINDOW as u64,
                from: 1_000,
                to: 1_060,
            }]
        );
        assert_eq!(t.drain(later, 1_060, true), vec![]);
        assert!(t.admit("192.0.2.1", "INVALID_TOKEN", later, 1_060));
    }
}

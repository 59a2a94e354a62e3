//! Per-key limits: the configured defaults, their per-key overrides, and the
//! request-rate token buckets.

use super::keys::LimitOverrides;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits of one key: the `[auth]` defaults with the key's overrides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyLimits {
    /// Sustained requests per second; 0 turns rate limiting off.
    pub requests_per_second: f64,
    /// Requests a key may make at once after being idle.
    pub burst: u32,
    /// Queued jobs a key may have; 0 means no per-key bound.
    pub max_queued: u32,
    /// Jobs of one key that may run at the same time; 0 means no bound.
    pub max_running: u32,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self {
            requests_per_second: 10.0,
            burst: 20,
            max_queued: 100,
            max_running: 0,
        }
    }
}

impl KeyLimits {
    /// These defaults with a key's overrides applied.
    pub fn with_overrides(&self, o: &LimitOverrides) -> KeyLimits {
        KeyLimits {
            requests_per_second: o.requests_per_second.unwrap_or(self.requests_per_second),
            burst: o.burst.unwrap_or(self.burst),
            max_queued: o.max_queued.unwrap_or(self.max_queued),
            max_running: o.max_running.unwrap_or(self.max_running),
        }
    }
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// Token buckets keyed by API key id. In memory on purpose: a rate is about
/// the last second, and a restart forgiving it is harmless.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one token from `key`'s bucket, or says how long until one is
    /// available.
    pub fn acquire(&self, key: &str, limits: &KeyLimits) -> Result<(), Duration> {
        self.acquire_at(key, limits, Instant::now())
    }

    fn acquire_at(&self, key: &str, limits: &KeyLimits, now: Instant) -> Result<(), Duration> {
        let rate = limits.requests_per_second;
        if rate <= 0.0 || !rate.is_finite() {
            return Ok(());
        }
        let capacity = f64::from(limits.burst.max(1));
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(capacity);
        b.refilled = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: f64, burst: u32) -> KeyLimits {
        KeyLimits {
            requests_per_second: rps,
            burst,
            ..KeyLimits::default()
        }
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        let r = RateLimiter::default();
        let l = limits(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.acquire_at("a", &l, t0).is_ok());
        }
        let wait = r.acquire_at("a", &l, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Half a second later exactly one token has come back.
        let t1 = t0 + Duration::from_millis(500);
        assert!(r.acquire_at("a", &l, t1).is_ok());
        assert!(r.acquire_at("a", &l, t1).is_err());
        // Idle time never fills the bucket past the burst.
        let t2 = t1 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(r.acquire_at("a", &l, t2).is_ok());
        }
        assert!(r.acquire_at("a", &l, t2).is_err());
    }

    #[test]
    fn keys_have_separate_buckets_and_zero_rate_is_unlimited() {
        let r = RateLimiter::default();
        let l = limits(1.0, 1);
        let t = Instant::now();
        assert!(r.acquire_at("a", &l, t).is_ok());
        assert!(r.acquire_at("a", &l, t).is_err());
        assert!(r.acquire_at("b", &l, t).is_ok());
        let off = limits(0.0, 1);
        for _ in 0..1000 {
            assert!(r.acquire_at("c", &off, t).is_ok());
        }
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let d = KeyLimits::default();
        let o = LimitOverrides {
            max_queued: Some(3),
            ..LimitOverrides::default()
        };
        let l = d.with_overrides(&o);
        assert_eq!(l.max_queued, 3);
        assert_eq!(l.requests_per_second, d.requests_per_second);
        assert_eq!(l.burst, d.burst);
    }
}

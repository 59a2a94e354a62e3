//! API keys and per-key limits.
//!
//! Keys are off until the first key is created (or `auth.required` is set):
//! a local server needs no setup. Once any key exists, every `/v1` request
//! needs `Authorization: Bearer vq_...`. The HTTP glue (the middleware that
//! turns [`AuthError`] into a response) lives in `api`; this room knows keys,
//! limits and who the caller is. The per-key bounds on queued and running jobs
//! are enforced by the job store, in the same statements that queue and claim
//! (`queue::KeyBounds` and the `api_keys` overrides).

mod keys;
mod limits;

pub use keys::{hash_key, ApiKey, KeyError, KeyStore, LimitOverrides, NewKey, KEY_PREFIX};
pub use limits::{KeyLimits, RateLimiter};

use crate::queue::ApiKeys;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Who may read `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    /// Anyone, even when keys are on (for a scraper inside a trusted network).
    Open,
    /// Any valid key.
    Key,
    /// Only admin keys.
    #[default]
    Admin,
}

/// `[auth]` in the configuration. Flat, so that every setting has a
/// `VQCLIP_AUTH_<KEY>` variable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require a key even before any key exists (then nothing but `/healthz`
    /// and `/readyz` answers until `vqclip keys create` is run).
    pub required: bool,
    /// Who may read `/metrics` while keys are on.
    pub metrics: MetricsAccess,
    /// Default requests per second of a key; 0 turns rate limiting off.
    pub requests_per_second: f64,
    /// Default burst of a key.
    pub burst: u32,
    /// Default bound on a key's queued jobs; 0: none.
    pub max_queued_per_key: u32,
    /// Default bound on a key's running jobs; 0: none.
    pub max_running_per_key: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        let l = KeyLimits::default();
        Self {
            required: false,
            metrics: MetricsAccess::default(),
            requests_per_second: l.requests_per_second,
            burst: l.burst,
            max_queued_per_key: l.max_queued,
            max_running_per_key: l.max_running,
        }
    }
}

impl AuthConfig {
    /// The limits of a key without overrides.
    pub fn limits(&self) -> KeyLimits {
        KeyLimits {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
            max_queued: self.max_queued_per_key,
            max_running: self.max_running_per_key,
        }
    }
}

/// Who is calling, as handlers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    /// `None` when keys are off; jobs are then created without an owner.
    pub key_id: Option<String>,
    /// Admins see every job. With keys off the single local user is one.
    pub admin: bool,
    /// The caller's limits, its overrides applied.
    pub limits: KeyLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this server requires an API key: send `Authorization: Bearer vq_...` (create one with `vqclip keys create --name NAME`)")]
    MissingKey,
    #[error("the Authorization header must be `Bearer <key>`")]
    MalformedHeader,
    #[error("the API key is not valid")]
    InvalidKey,
    #[error("the API key `{0}` was revoked")]
    RevokedKey(String),
    #[error("this needs an admin key")]
    AdminOnly,
    #[error("too many requests for this key: the limit is {rate} per second with a burst of {burst}; retry after {}s", retry_secs(*.retry_after))]
    RateLimited {
        rate: f64,
        burst: u32,
        retry_after: Duration,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// `Retry-After` carries whole seconds; rounding down would invite a retry
/// that fails again.
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl AuthError {
    /// The `Retry-After` value in seconds, for 429s.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            AuthError::RateLimited { retry_after, .. } => Some(retry_secs(*retry_after).max(1)),
            _ => None,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
fn parse_bearer(header: &str) -> Result<&str, AuthError> {
    let (scheme, token) = header
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader);
    }
    let token = token.trim();
    if !token.starts_with(KEY_PREFIX) {
        return Err(AuthError::InvalidKey);
    }
    Ok(token)
}

/// Checks keys and request rates.
pub struct Authenticator {
    keys: KeyStore,
    config: AuthConfig,
    rate: RateLimiter,
}

impl Authenticator {
    pub fn new(keys: Arc<dyn ApiKeys>, config: AuthConfig) -> Self {
        Self {
            keys: KeyStore::new(keys),
            config,
            rate: RateLimiter::default(),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Keys are on once any key exists, or when the config requires them.
    pub async fn enabled(&self) -> Result<bool, AuthError> {
        Ok(self.config.required || self.keys.any().await?)
    }

    /// Identifies the caller from the `Authorization` header value. With keys
    /// off the caller is the local admin whatever the header says.
    pub async fn identify(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        // A known key settles it in one lookup; only other requests need to
        // know whether keys are on at all.
        let presented = authorization.map(parse_bearer);
        if let Some(Ok(token)) = presented {
            if let Some(key) = self.keys.find_by_secret(token).await? {
                if key.is_revoked() {
                    return Err(AuthError::RevokedKey(key.name));
                }
                return Ok(Caller {
                    limits: self.config.limits().with_overrides(&key.limits),
                    key_id: Some(key.id),
                    admin: key.admin,
                });
            }
        }
        if !self.enabled().await? {
            return Ok(Caller {
                key_id: None,
                admin: true,
                limits: self.config.limits(),
            });
        }
        match presented {
            None => Err(AuthError::MissingKey),
            Some(Err(e)) => Err(e),
            Some(Ok(_)) => Err(AuthError::InvalidKey),
        }
    }

    /// Spends one request from the caller's rate. Callers without a key
    /// (keys off) are not rate limited: they are the only user.
    pub fn check_rate(&self, caller: &Caller) -> Result<(), AuthError> {
        let Some(key) = caller.key_id.as_deref() else {
            return Ok(());
        };
        self.rate
            .acquire(key, &caller.limits)
            .map_err(|retry_after| AuthError::RateLimited {
                rate: caller.limits.requests_per_second,
                burst: caller.limits.burst,
                retry_after,
            })
    }

    /// May this caller read `/metrics`?
    pub async fn check_metrics(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        if self.config.metrics == MetricsAccess::Open {
            return Ok(());
        }
        let caller = self.identify(authorization).await?;
        if self.config.metrics == MetricsAccess::Admin && !caller.admin {
            return Err(AuthError::AdminOnly);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_flat_and_checked() {
        let t: toml::Table =
            "required = true\nrequests_per_second = 2.5\nmax_queued_per_key = 3\nmetrics = \"key\""
                .parse()
                .unwrap();
        let c: AuthConfig = toml::Value::Table(t).try_into().unwrap();
        assert!(c.required);
        assert_eq!(c.metrics, MetricsAccess::Key);
        assert_eq!(c.limits().max_queued, 3);
        assert_eq!(c.limits().requests_per_second, 2.5);
        assert_eq!(c.burst, AuthConfig::default().burst);
        let bad = toml::from_str::<AuthConfig>("max_queued = 3");
        assert!(bad.unwrap_err().to_string().contains("max_queued"));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(Duration::from_millis(2001)), 3);
    }
}

//! Webhooks: Standard Webhooks signing, SSRF-checked targets and persisted
//! deliveries with retries.
//!
//! The background task ([`WebhookEngine::spawn`]) reads the job events its store
//! has not yet bridged: each event of a job whose spec carries a [`WebhookSpec`]
//! becomes a delivery ([`WebhookEngine::publish`]); due deliveries are claimed
//! under a lease, sent, and every attempt is recorded. Events, what was bridged,
//! deliveries, leases and the progress throttle all live in the job store's
//! database (`queue::Deliveries`), so a restart, a worker in another process or
//! a second API node loses and duplicates no webhook.

mod bridge;
mod engine;
mod signing;
mod target;

pub use crate::queue::{Attempt, Delivery, DeliveryStatus};
pub use engine::{OutgoingEvent, WebhookEngine, EVENT_TYPE_PREFIX};
pub use signing::{verify, SecretError, Signer, VerifyError};
pub use target::{check_target, TargetError, TargetPolicy};

use serde::{Deserialize, Serialize};
use std::str::FromStr;
use std::time::Duration;

/// The job events a webhook can subscribe to are the SSE events.
pub use crate::queue::EventKind;

impl FromStr for EventKind {
    type Err = WebhookError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::parse(s).ok_or_else(|| WebhookError::UnknownEvent(s.to_owned()))
    }
}

fn terminal_events() -> Vec<EventKind> {
    vec![EventKind::Completed, EventKind::Failed, EventKind::Canceled]
}

/// `webhook: {url, events}` on a job. Without `events` only the terminal
/// events are sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    #[serde(default = "terminal_events")]
    pub events: Vec<EventKind>,
}

impl WebhookSpec {
    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }

    /// What makes a subscription malformed whatever the server's settings: the URL
    /// must be absolute http(s) and at least one event named. The target's address
    /// is checked when the job is submitted ([`WebhookEngine::validate`]).
    pub fn check(&self) -> Result<(), SubscriptionError> {
        let parsed = url::Url::parse(&self.url).map_err(|e| SubscriptionError {
            field: "webhook.url",
            rule: "must be an absolute URL",
            detail: format!("{e}: {:?}", self.url),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(SubscriptionError {
                field: "webhook.url",
                rule: "must use http or https",
                detail: format!("got scheme {:?}", parsed.scheme()),
            });
        }
        if self.events.is_empty() {
            return Err(SubscriptionError {
                field: "webhook.events",
                rule: "must name at least one event",
                detail: "got an empty list; leave it out for completed, failed and canceled".into(),
            });
        }
        Ok(())
    }
}

/// A malformed `webhook` on a job. `Display` reads `webhook.url: must use http or
/// https; got scheme "ftp"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}; {detail}")]
pub struct SubscriptionError {
    /// JSON path of the field in the job request.
    pub field: &'static str,
    pub rule: &'static str,
    pub detail: String,
}

/// `[webhooks]` in the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// The per-server signing secret: `whsec_` + base64 (the Standard
    /// Webhooks format) or any other string, whose UTF-8 bytes are the key.
    /// Jobs with a webhook are refused while it is empty.
    pub secret: String,
    /// Attempts per delivery, the first included, before it is marked failed.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with jitter.
    #[serde(with = "duration_ms")]
    pub initial_backoff_ms: Duration,
    /// Upper bound of the delay between two attempts.
    #[serde(with = "duration_ms")]
    pub max_backoff_ms: Duration,
    /// Per-request timeout.
    #[serde(with = "duration_ms")]
    pub timeout_ms: Duration,
    /// At most one `progress` delivery per job in this interval.
    #[serde(with = "duration_ms")]
    pub progress_interval_ms: Duration,
    /// How often the sender looks for due deliveries when nothing wakes it.
    #[serde(with = "duration_ms")]
    pub poll_interval_ms: Duration,
    /// Deliveries sent at the same time.
    pub concurrency: usize,
    /// Private, loopback, link-local and other non-public targets are refused
    /// unless this is true or the address is in `allowed_networks`.
    pub allow_private_targets: bool,
    /// CIDRs allowed even though they are not public, e.g. `["127.0.0.0/8"]`.
    #[serde(with = "cidr_list")]
    pub allowed_networks: Vec<ipnet::IpNet>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secret: String::new(),
            max_attempts: 8,
            initial_backoff_ms: Duration::from_secs(5),
            max_backoff_ms: Duration::from_secs(3600),
            timeout_ms: Duration::from_secs(10),
            progress_interval_ms: Duration::from_secs(5),
            poll_interval_ms: Duration::from_secs(1),
            concurrency: 8,
            allow_private_targets: false,
            allowed_networks: Vec::new(),
        }
    }
}

impl WebhookConfig {
    pub fn target_policy(&self) -> TargetPolicy {
        TargetPolicy {
            allow_private: self.allow_private_targets,
            allowed_networks: self.allowed_networks.clone(),
        }
    }
}

/// Durations in the config file are plain millisecond integers.
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// CIDRs are written as strings; ipnet's own serde support is off in this build.
mod cidr_list {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[ipnet::IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|n| n.to_string()))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| {
                s.parse().map_err(|_| {
                    D::Error::custom(format!(
                        "`{s}` is not a CIDR network; write it like `127.0.0.0/8` or `::1/128`"
                    ))
                })
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("unknown webhook event `{0}`; use one of state, progress, frame, completed, failed, canceled")]
    UnknownEvent(String),
    #[error("webhooks need a signing secret: set `webhooks.secret` (VQCLIP_WEBHOOKS_SECRET), e.g. to `whsec_` followed by `openssl rand -base64 32`")]
    NoSecret,
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("webhook store error: {0}")]
    Store(#[from] crate::queue::QueueError),
    #[error("could not build the webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults_to_terminal_events() {
        let s: WebhookSpec = serde_json::from_str(r#"{"url":"https://example.com/h"}"#).unwrap();
        assert_eq!(s.events, terminal_events());
        assert!(s.wants(EventKind::Completed) && !s.wants(EventKind::Progress));
    }

    #[test]
    fn spec_rejects_unknown_events_and_fields() {
        assert!(serde_json::from_str::<WebhookSpec>(r#"{"url":"x","events":["done"]}"#).is_err());
        assert!(serde_json::from_str::<WebhookSpec>(r#"{"url":"x","secret":"s"}"#).is_err());
    }

    #[test]
    fn check_names_the_field_that_is_wrong() {
        let spec = |json: &str| serde_json::from_str::<WebhookSpec>(json).unwrap();
        spec(r#"{"url":"https://example.com/h","events":["progress"]}"#)
            .check()
            .unwrap();
        for (json, field, rule) in [
            (
                r#"{"url":"ftp://x"}"#,
                "webhook.url",
                "must use http or https",
            ),
            (
                r#"{"url":"/relative"}"#,
                "webhook.url",
                "must be an absolute URL",
            ),
            (
                r#"{"url":"https://x","events":[]}"#,
                "webhook.events",
                "must name at least one event",
            ),
        ] {
            let err = spec(json).check().unwrap_err();
            assert_eq!((err.field, err.rule), (field, rule), "{json}");
        }
    }

    #[test]
    fn config_reads_millis_and_cidrs() {
        let c: WebhookConfig = toml::from_str(
            "max_attempts = 3\ninitial_backoff_ms = 250\nallowed_networks = [\"127.0.0.0/8\"]",
        )
        .unwrap();
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.initial_backoff_ms, Duration::from_millis(250));
        assert_eq!(
            c.progress_interval_ms,
            WebhookConfig::default().progress_interval_ms
        );
        assert!(c
            .target_policy()
            .refusal("127.0.0.1".parse().unwrap())
            .is_none());
        let bad = toml::from_str::<WebhookConfig>("allowed_networks = [\"nope\"]");
        assert!(bad.unwrap_err().to_string().contains("not a CIDR"));
    }

    #[test]
    fn event_names_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
        }
        assert!("nope".parse::<EventKind>().is_err());
    }
}

//! The body of `POST /v1/jobs`: the render spec, plus what the service keeps for
//! itself (priority, retention, the webhook subscription).
//!
//! A request is read once, given the deployment's defaults in typed code, and
//! validated once ([`JobRequest::validate`]). What is stored is the validated
//! document ([`ValidJob::document`]): the worker trusts it and renders it without
//! parsing anything again.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ApiError;
use crate::render::spec::{ModelPolicy, StoredSpec};
use crate::render::{JobSpec, Limits, ModelsSpec, SpecError, Validated};
use crate::webhooks::WebhookSpec;

/// A job as a client submits it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRequest {
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Higher runs first; -100..=100.
    pub priority: i32,
    /// Keep artifacts past the retention period.
    pub keep: bool,
    pub webhook: Option<WebhookSpec>,
}

/// What the deployment fills in when a request leaves it out.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestDefaults {
    pub vqgan: String,
    pub clip: Vec<String>,
    pub checkpoint_every: u32,
}

/// The request as it arrives. Unknown fields fall through to the spec, which refuses
/// them, so a typo (`"step": 10`) still fails loudly.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    keep: bool,
    #[serde(default)]
    webhook: Option<WebhookSpec>,
    /// Taken out of the spec because the deployment, not the spec, has the default.
    #[serde(default)]
    models: Option<ModelsWire>,
    #[serde(default)]
    checkpoint_every: Option<u32>,
    #[serde(flatten)]
    spec: Map<String, Value>,
}

/// `models` with either name left to the deployment.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsWire {
    vqgan: Option<String>,
    clip: Option<Vec<String>>,
}

impl JobRequest {
    /// Reads a request body, filling in what it left to the deployment.
    pub fn from_json(raw: &Value, defaults: &RequestDefaults) -> Result<Self, ApiError> {
        if !raw.is_object() {
            return Err(ApiError::unprocessable(
                "invalid-spec",
                "the job spec must be a JSON object, e.g. {\"prompts\": \"a red apple\"}",
            ));
        }
        let bad = |e: serde_json::Error| {
            ApiError::unprocessable("invalid-spec", format!("job spec: {e}"))
        };
        let wire = Wire::deserialize(raw).map_err(bad)?;
        let mut spec = JobSpec::deserialize(Value::Object(wire.spec)).map_err(bad)?;
        let models = wire.models.unwrap_or(ModelsWire {
            vqgan: None,
            clip: None,
        });
        spec.models = ModelsSpec {
            vqgan: models.vqgan.unwrap_or_else(|| defaults.vqgan.clone()),
            clip: models.clip.unwrap_or_else(|| defaults.clip.clone()),
        };
        spec.checkpoint_every = wire.checkpoint_every.unwrap_or(defaults.checkpoint_every);
        Ok(JobRequest {
            spec,
            priority: wire.priority,
            keep: wire.keep,
            webhook: wire.webhook,
        })
    }

    /// Checks the whole request once, and draws the seed when the client sent none:
    /// every attempt, and a resume, then renders the same image. The seed is below
    /// 2^32 so that JavaScript clients read it exactly.
    pub fn validate(mut self, limits: &Limits, models: &ModelPolicy) -> Result<ValidJob, ApiError> {
        let validated = self.spec.validate(limits).map_err(spec_problem)?;
        if !(-100..=100).contains(&self.priority) {
            return Err(spec_problem(SpecError::new(
                "priority",
                "must be between -100 and 100",
                format!("got {}, allowed -100..=100", self.priority),
            )));
        }
        if let Some(hook) = &self.webhook {
            hook.check().map_err(|e| {
                ApiError::unprocessable("invalid-spec", e.to_string())
                    .with("field", e.field)
                    .with("rule", e.rule)
            })?;
        }
        self.spec.check_models(models).map_err(|e| {
            // The log may name paths; the answer names only what the client sent.
            tracing::info!("refused job models: {e}");
            spec_problem(e)
        })?;
        let seed = *self
            .spec
            .seed
            .get_or_insert_with(|| rand::random::<u32>().into());
        Ok(ValidJob {
            request: self,
            validated,
            seed,
        })
    }
}

/// A request that passed every check that needs no I/O.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub request: JobRequest,
    pub validated: Validated,
    pub seed: u64,
}

/// The stored document: the request's fields as the client sees them echoed, and
/// beside them what validation worked out.
#[derive(Serialize)]
struct Document<'a> {
    #[serde(flatten)]
    request: &'a JobRequest,
    validated: &'a Validated,
}

impl ValidJob {
    /// The document the queue stores. Going through text keeps f32 fields as the user
    /// wrote them (`0.1`, not the f64 widening `0.10000000149011612`).
    pub fn document(&self) -> Result<Value, ApiError> {
        let doc = Document {
            request: &self.request,
            validated: &self.validated,
        };
        serde_json::to_string(&doc)
            .and_then(|text| serde_json::from_str(&text))
            .map_err(|e| ApiError::internal("storing the spec", e))
    }
}

/// Where a fork's document records its source and whether its optimiser starts afresh
/// (`{"job", "step", "reset_optimizer"}`); a job's view shows it as `parent`.
pub(super) const FORK_KEY: &str = "fork";

/// The spec a client sees in a job: the stored document without the validation and
/// the fork record.
pub(super) fn echo(document: &Value) -> Value {
    let mut echo = document.clone();
    if let Value::Object(fields) = &mut echo {
        fields.remove(StoredSpec::VALIDATED_KEY);
        fields.remove(FORK_KEY);
    }
    echo
}

fn spec_problem(e: SpecError) -> ApiError {
    ApiError::unprocessable("invalid-spec", e.to_string())
        .with("field", e.field.clone())
        .with("rule", e.rule.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> RequestDefaults {
        RequestDefaults {
            vqgan: "/srv/vqgan.ckpt".into(),
            clip: vec!["/srv/clip".into()],
            checkpoint_every: 7,
        }
    }

    fn policy() -> ModelPolicy {
        ModelPolicy::new(vec!["/srv/vqgan.ckpt".into(), "/srv/clip".into()], &[])
    }

    fn read(body: Value) -> Result<JobRequest, ApiError> {
        JobRequest::from_json(&body, &defaults())
    }

    #[test]
    fn defaults_fill_only_what_the_client_left_out() {
        let r = read(json!({"prompts": "a"})).unwrap();
        assert_eq!(r.spec.models.vqgan, "/srv/vqgan.ckpt");
        assert_eq!(r.spec.models.clip, vec!["/srv/clip"]);
        assert_eq!(r.spec.checkpoint_every, 7);
        assert_eq!((r.priority, r.keep, r.webhook.is_none()), (0, false, true));
        let r =
            read(json!({"prompts": "a", "models": {"clip": ["ViT-B/16"]}, "checkpoint_every": 0}))
                .unwrap();
        assert_eq!(r.spec.models.vqgan, "/srv/vqgan.ckpt");
        assert_eq!(r.spec.models.clip, vec!["ViT-B/16"]);
        assert_eq!(r.spec.checkpoint_every, 0);
    }

    #[test]
    fn unknown_fields_fail_wherever_they_are() {
        for body in [
            json!({"prompts": "a", "step": 3}),
            json!({"prompts": "a", "models": {"clipp": []}}),
            json!({"prompts": "a", "webhook": {"url": "https://x", "secret": "s"}}),
            json!({"prompts": "a", "validated": {}}),
        ] {
            let err = read(body.clone()).unwrap_err();
            assert!(
                err.detail.contains("unknown field"),
                "{body}: {}",
                err.detail
            );
        }
        assert!(read(json!(["a"])).is_err());
    }

    #[test]
    fn service_fields_are_checked_with_their_field_named() {
        let limits = Limits::default();
        for (body, field) in [
            (json!({"prompts": "a", "priority": 101}), "priority"),
            (
                json!({"prompts": "a", "webhook": {"url": "ftp://x"}}),
                "webhook.url",
            ),
            (
                json!({"prompts": "a", "webhook": {"url": "https://x", "events": []}}),
                "webhook.events",
            ),
            (json!({"prompts": "a|:2"}), "prompts[1]"),
            (
                json!({"prompts": "a", "models": {"vqgan": "/etc"}}),
                "models.vqgan",
            ),
        ] {
            let err = read(body.clone())
                .unwrap()
                .validate(&limits, &policy())
                .unwrap_err();
            assert_eq!(
                err.extra.get("field"),
                Some(&json!(field)),
                "{body}: {}",
                err.detail
            );
        }
    }

    #[test]
    fn the_document_echoes_the_request_and_keeps_the_validation() {
        let body = json!({"prompts": "a:2|b", "lr": 0.1, "priority": -3, "keep": true,
                          "webhook": {"url": "https://example.com/h", "events": ["progress"]}});
        let job = read(body)
            .unwrap()
            .validate(&Limits::default(), &policy())
            .unwrap();
        assert!(job.seed < 1 << 32);
        let doc = job.document().unwrap();
        let shown = echo(&doc);
        assert_eq!(shown["lr"], json!(0.1));
        assert_eq!(shown["priority"], -3);
        assert_eq!(shown["keep"], true);
        assert_eq!(shown["seed"], job.seed);
        assert_eq!(shown["webhook"]["events"], json!(["progress"]));
        assert!(shown.get(StoredSpec::VALIDATED_KEY).is_none());
        // The echo reads back as the same request.
        assert_eq!(read(shown).unwrap(), job.request);
        // The worker's reading of the document trusts the validation it holds.
        let stored: StoredSpec = serde_json::from_value(doc).unwrap();
        let (spec, validated) = stored.into_validated().unwrap();
        assert_eq!(spec, job.request.spec);
        assert_eq!(validated, job.validated);
        assert_eq!(validated.token_counts, vec![3, 3]);
    }
}

//! Service configuration: `config/default.toml`, an optional file, `VQCLIP_*` environment
//! variables and command-line flags, merged in that order into one typed [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The documented defaults, compiled in so that a bare binary runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variables with the `VQCLIP_` prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["VQCLIP_LOG", "VQCLIP_CONFIG", "VQCLIP_MODEL_CACHE"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {detail}")]
    Parse { path: String, detail: String },
    #[error("environment variable {var}: no setting `{key}` in section [{section}]; see config/default.toml for the settings")]
    UnknownEnv {
        var: String,
        section: String,
        key: String,
    },
    #[error("environment variable {var}={value:?} is not a valid {expected}")]
    EnvValue {
        var: String,
        value: String,
        expected: &'static str,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub workers: WorkersConfig,
    pub models: ModelsConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    /// `[auth]`: the auth room's own settings type, composed here.
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// `[webhooks]`: the webhooks room's own settings type, composed here.
    #[serde(default)]
    pub webhooks: crate::webhooks::WebhookConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event; colours only on a terminal.
    Text,
    /// One JSON object per line, with the request and job spans as fields.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub max_body_bytes: usize,
    pub max_upload_bytes: usize,
    pub cors_allowed_origins: Vec<String>,
    pub sse_keep_alive_seconds: u64,
    pub retry_after_seconds: u64,
    pub header_read_timeout_ms: u64,
    pub keep_alive_timeout_seconds: u64,
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub busy_timeout_ms: u64,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Empty: the local directory `artifact_dir`; or `file:///dir`, or `s3://bucket/prefix`.
    pub url: String,
    pub artifact_dir: PathBuf,
    /// Where the render writes before files go to a remote store; empty: `artifact_dir`.
    pub scratch_dir: PathBuf,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
    pub s3_allow_http: bool,
    pub s3_virtual_hosted_style: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    pub count: usize,
    pub device: String,
    pub devices: Vec<String>,
    pub lease_seconds: u64,
    pub heartbeat_seconds: u64,
    pub max_attempts: u32,
    pub poll_interval_ms: u64,
    pub checkpoint_every: u32,
    pub batch_size: usize,
    /// Where `vqclip worker` serves `/metrics` and `/healthz`; empty: not served.
    pub metrics_bind: String,
    /// Threads of the CPU ops of every worker in this process (0: one per core).
    pub cpu_threads: usize,
}

impl WorkersConfig {
    /// The device of each worker: `devices` when given, else `count` copies of `device`.
    pub fn worker_devices(&self) -> Vec<String> {
        if self.devices.is_empty() {
            vec![self.device.clone(); self.count]
        } else {
            self.devices.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub vqgan: String,
    pub clip: Vec<String>,
    /// Resolved with the environment by `models::catalogue::cache_root` (through
    /// `render::models`), the one resolver.
    pub cache_dir: String,
    pub dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_side: u32,
    pub max_pixels: u64,
    pub max_steps: u32,
    pub max_cutn: u32,
    pub max_prompts: u32,
    pub max_queued_jobs: u32,
    pub max_upload_pixels: u64,
    /// Most frames of an uploaded video (video styling).
    pub max_video_frames: u32,
    pub max_decode_bytes: u64,
    pub decode_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub max_age_hours: u64,
    pub prune_interval_seconds: u64,
}

/// Settings given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub bind: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub artifact_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub device: Option<String>,
}

impl Config {
    /// Defaults, then `file`, then the process environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars(), overrides)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut root = parse_table(DEFAULT_TOML, "config/default.toml")?;
        let defaults = root.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            merge(&mut root, parse_table(&text, &path.display().to_string())?);
        }
        let mut env: Vec<_> = env.into_iter().collect();
        env.sort();
        for (var, value) in env {
            apply_env(&mut root, &defaults, &var, &value)?;
        }
        apply_overrides(&mut root, overrides);
        let config: Config =
            toml::Value::Table(root)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: "merged configuration".into(),
                    detail: e.message().to_owned(),
                })?;
        config.check()?;
        Ok(config)
    }

    /// The compiled-in defaults alone.
    pub fn defaults() -> Config {
        Self::load_from(None, std::iter::empty(), &Overrides::default())
            .expect("config/default.toml is valid")
    }

    fn check(&self) -> Result<(), ConfigError> {
        let w = &self.workers;
        if w.heartbeat_seconds == 0 || w.heartbeat_seconds >= w.lease_seconds {
            return Err(ConfigError::Invalid(format!(
                "workers.heartbeat_seconds ({}) must be at least 1 and below workers.lease_seconds ({})",
                w.heartbeat_seconds, w.lease_seconds
            )));
        }
        if w.batch_size == 0 {
            return Err(ConfigError::Invalid(
                "workers.batch_size must be at least 1 (1: no packing)".into(),
            ));
        }
        if w.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "workers.max_attempts must be at least 1".into(),
            ));
        }
        if self.models.clip.is_empty() {
            return Err(ConfigError::Invalid(
                "models.clip must name at least one CLIP model".into(),
            ));
        }
        if self.server.max_connections == 0 || self.server.header_read_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "server.max_connections and server.header_read_timeout_ms must be at least 1"
                    .into(),
            ));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "database.max_connections must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

fn parse_table(text: &str, path: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        detail: e.message().to_owned(),
    })
}

/// Tables merge key by key; any other value replaces the one below it.
fn merge(base: &mut toml::Table, upper: toml::Table) {
    for (key, value) in upper {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `VQCLIP_<SECTION>_<KEY>`: the value's type follows the documented default, so that a
/// string setting such as a bind address needs no TOML quoting.
fn apply_env(
    root: &mut toml::Table,
    defaults: &toml::Table,
    var: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let Some(rest) = var.strip_prefix("VQCLIP_") else {
        return Ok(());
    };
    if NOT_SETTINGS.contains(&var) {
        return Ok(());
    }
    let rest = rest.to_ascii_lowercase();
    let Some((section, key)) = defaults
        .keys()
        .filter_map(|s| {
            rest.strip_prefix(s.as_str())
                .and_then(|k| k.strip_prefix('_'))
                .map(|k| (s.clone(), k.to_owned()))
        })
        .max_by_key(|(s, _)| s.len())
    else {
        // Other parts of vqclip read their own VQCLIP_* variables (e.g. the CLI's device).
        return Ok(());
    };
    let default = defaults
        .get(&section)
        .and_then(|s| s.as_table())
        .and_then(|t| t.get(&key));
    let parsed = match default {
        Some(toml::Value::String(_)) => toml::Value::String(value.to_owned()),
        Some(d) => {
            let v = parse_value(value).ok_or_else(|| ConfigError::EnvValue {
                var: var.to_owned(),
                value: value.to_owned(),
                expected: d.type_str(),
            })?;
            if std::mem::discriminant(&v) != std::mem::discriminant(d) {
                return Err(ConfigError::EnvValue {
                    var: var.to_owned(),
                    value: value.to_owned(),
                    expected: d.type_str(),
                });
            }
            v
        }
        // Sections owned by other rooms have no documented keys here; take the value as TOML.
        None if matches!(section.as_str(), "auth" | "webhooks") => {
            parse_value(value).unwrap_or_else(|| toml::Value::String(value.to_owned()))
        }
        None => {
            return Err(ConfigError::UnknownEnv {
                var: var.to_owned(),
                section,
                key,
            })
        }
    };
    let table = root
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = table {
        t.insert(key, parsed);
    }
    Ok(())
}

fn parse_value(text: &str) -> Option<toml::Value> {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
}

fn apply_overrides(root: &mut toml::Table, o: &Overrides) {
    let mut set = |section: &str, key: &str, value: toml::Value| {
        if let Some(toml::Value::Table(t)) = root.get_mut(section) {
            t.insert(key.to_owned(), value);
        }
    };
    if let Some(bind) = o.bind {
        set("server", "bind", toml::Value::String(bind.to_string()));
    }
    if let Some(url) = &o.database_url {
        set("database", "url", toml::Value::String(url.clone()));
    }
    if let Some(dir) = &o.artifact_dir {
        set(
            "storage",
            "artifact_dir",
            toml::Value::String(dir.display().to_string()),
        );
    }
    if let Some(n) = o.workers {
        set("workers", "count", toml::Value::Integer(n as i64));
        set("workers", "devices", toml::Value::Array(vec![]));
    }
    if let Some(device) = &o.device {
        set("workers", "device", toml::Value::String(device.clone()));
        set("workers", "devices", toml::Value::Array(vec![]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_rooms_settings_are_documented_with_their_defaults() {
        // config/default.toml documents exactly the defaults the rooms' own types have.
        let c = Config::defaults();
        assert_eq!(c.auth, crate::auth::AuthConfig::default());
        assert_eq!(c.webhooks, crate::webhooks::WebhookConfig::default());
    }

    #[test]
    fn environment_variables_reach_the_rooms_typed_settings() {
        let c = Config::load_from(
            None,
            env(&[
                ("VQCLIP_WEBHOOKS_SECRET", "whsec_c2VjcmV0"),
                ("VQCLIP_WEBHOOKS_ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#),
                ("VQCLIP_WEBHOOKS_MAX_ATTEMPTS", "3"),
                ("VQCLIP_AUTH_MAX_QUEUED_PER_KEY", "7"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.webhooks.secret, "whsec_c2VjcmV0");
        assert_eq!(c.webhooks.max_attempts, 3);
        assert_eq!(
            c.webhooks.allowed_networks,
            vec!["127.0.0.0/8".parse().unwrap()]
        );
        assert_eq!(c.auth.max_queued_per_key, 7);
        // A bad value fails at load, naming the setting.
        let err = Config::load_from(
            None,
            env(&[("VQCLIP_WEBHOOKS_ALLOWED_NETWORKS", r#"["nope"]"#)]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a CIDR"), "{err}");
        let err = Config::load_from(
            None,
            env(&[("VQCLIP_AUTH_BURST", "many")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("VQCLIP_AUTH_BURST"), "{err}");
    }

    #[test]
    fn defaults_parse_and_are_consistent() {
        let c = Config::defaults();
        assert_eq!(c.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.workers.worker_devices(), vec!["cpu".to_string()]);
        assert!(c.database.url.starts_with("sqlite://"));
    }

    #[test]
    fn env_overrides_follow_the_default_types() {
        let c = Config::load_from(
            None,
            env(&[
                ("VQCLIP_SERVER_BIND", "0.0.0.0:9000"),
                ("VQCLIP_WORKERS_COUNT", "3"),
                ("VQCLIP_WORKERS_DEVICES", r#"["cuda:0", "cuda:1"]"#),
                ("VQCLIP_LIMITS_MAX_STEPS", "42"),
                ("VQCLIP_LOG", "debug"),
                ("VQCLIP_DEVICE", "cpu"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.server.bind.port(), 9000);
        assert_eq!(c.workers.count, 3);
        assert_eq!(c.workers.worker_devices(), vec!["cuda:0", "cuda:1"]);
        assert_eq!(c.limits.max_steps, 42);
    }

    #[test]
    fn flags_beat_env_and_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vqclip.toml");
        std::fs::write(&file, "[workers]\ncount = 5\ndevice = \"cuda:1\"\n").unwrap();
        let c = Config::load_from(
            Some(&file),
            env(&[("VQCLIP_WORKERS_COUNT", "4")]),
            &Overrides {
                device: Some("cpu".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.workers.count, 4);
        assert_eq!(c.workers.device, "cpu");
    }

    #[test]
    fn bad_settings_are_named() {
        let err = Config::load_from(
            None,
            env(&[("VQCLIP_WORKERS_COUNTS", "2")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("counts"), "{err}");
        let err = Config::load_from(
            None,
            env(&[("VQCLIP_WORKERS_COUNT", "two")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("VQCLIP_WORKERS_COUNT"), "{err}");
        let err = Config::load_from(
            None,
            env(&[("VQCLIP_WORKERS_HEARTBEAT_SECONDS", "60")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let err = Config::load_from(
            None,
            env(&[("VQCLIP_WORKERS_BATCH_SIZE", "0")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("workers.batch_size"), "{err}");
    }

    #[test]
    fn batch_packing_is_off_by_default_and_set_by_env() {
        assert_eq!(Config::defaults().workers.batch_size, 1);
        let c = Config::load_from(
            None,
            env(&[("VQCLIP_WORKERS_BATCH_SIZE", "4")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.workers.batch_size, 4);
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vqclip.toml");
        std::fs::write(&file, "[server]\nbnd = \"1.2.3.4:5\"\n").unwrap();
        let err = Config::load_from(Some(&file), env(&[]), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("bnd"), "{err}");
    }
}

//! API keys in `api_keys` (migration 0003). Only a SHA-256 of each key is
//! stored; the key is shown once, when it is created.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

/// Every key starts with this, so a leaked key is recognisable in logs and
/// secret scanners.
pub const KEY_PREFIX: &str = "vq_";
const ID_PREFIX: &str = "key_";
/// How much of a key a listing shows.
const SHOWN_PREFIX_LEN: usize = 10;

/// Per-key overrides of the configured limits; `None` keeps the default.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LimitOverrides {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub max_queued: Option<u32>,
    pub max_running: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to tell keys apart in a listing.
    pub prefix: String,
    pub admin: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    pub limits: LimitOverrides,
}

impl ApiKey {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key name `{0}` is invalid: use 1-64 letters, digits, `.`, `_` or `-`, not starting with `key_`")]
    BadName(String),
    #[error("a key named `{0}` already exists (revoked keys keep their names); pick another name")]
    NameTaken(String),
    #[error("no API key has the id or name `{0}`; `vqclip keys list` shows them")]
    NotFound(String),
    #[error("{field} must be positive, got {value}")]
    BadLimit { field: &'static str, value: f64 },
    #[error("API key database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What `keys create` asks for.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub name: String,
    pub admin: bool,
    pub limits: LimitOverrides,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(ID_PREFIX)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

#[derive(Clone, Debug)]
pub struct KeyStore {
    pool: SqlitePool,
}

const COLUMNS: &str = "id, name, key_prefix, admin, created_at, revoked_at, \
                       requests_per_second, burst, max_queued, max_running";

fn millis_to_time(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn from_row(r: &SqliteRow) -> ApiKey {
    let opt_u32 = |c: &str| {
        r.get::<Option<i64>, _>(c)
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
    };
    ApiKey {
        id: r.get("id"),
        name: r.get("name"),
        prefix: r.get("key_prefix"),
        admin: r.get::<i64, _>("admin") != 0,
        created_at: millis_to_time(r.get("created_at")),
        revoked_at: r.get::<Option<i64>, _>("revoked_at").map(millis_to_time),
        limits: LimitOverrides {
            requests_per_second: r.get("requests_per_second"),
            burst: opt_u32("burst"),
            max_queued: opt_u32("max_queued"),
            max_running: opt_u32("max_running"),
        },
    }
}

impl KeyStore {
    /// `pool` must have migration 0003 applied.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Creates a key and returns it with its secret, which is not stored and
    /// cannot be shown again.
    pub async fn create(&self, new: &NewKey) -> Result<(ApiKey, String), KeyError> {
        if !valid_name(&new.name) {
            return Err(KeyError::BadName(new.name.clone()));
        }
        if let Some(rps) = new.limits.requests_per_second {
            if !(rps > 0.0 && rps.is_finite()) {
                return Err(KeyError::BadLimit {
                    field: "requests per second",
                    value: rps,
                });
            }
        }
        if new.limits.burst == Some(0) {
            return Err(KeyError::BadLimit {
                field: "burst",
                value: 0.0,
            });
        }
        let secret = format!(
            "{KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(random_bytes::<32>())
        );
        let id = format!("{ID_PREFIX}{}", hex::encode(random_bytes::<6>()));
        let now = chrono::Utc::now().timestamp_millis();
        let l = &new.limits;
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (id, name, key_hash, key_prefix, admin, created_at,
                                   requests_per_second, burst, max_queued, max_running)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {COLUMNS}"
        ))
        .bind(&id)
        .bind(&new.name)
        .bind(hash_key(&secret))
        .bind(&secret[..SHOWN_PREFIX_LEN])
        .bind(new.admin as i64)
        .bind(now)
        .bind(l.requests_per_second)
        .bind(l.burst.map(i64::from))
        .bind(l.max_queued.map(i64::from))
        .bind(l.max_running.map(i64::from))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                KeyError::NameTaken(new.name.clone())
            }
            _ => KeyError::Database(e),
        })?;
        Ok((from_row(&row), secret))
    }

    pub async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys ORDER BY created_at, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// Revokes by id or name. Revoking twice keeps the first revocation time.
    pub async fn revoke(&self, id_or_name: &str) -> Result<ApiKey, KeyError> {
        let now = chrono::Utc::now().timestamp_millis();
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?)
              WHERE id = ? OR name = ? RETURNING {COLUMNS}"
        ))
        .bind(now)
        .bind(id_or_name)
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(from_row)
            .ok_or_else(|| KeyError::NotFound(id_or_name.to_owned()))
    }

    /// The key whose secret this is, revoked or not.
    pub async fn find_by_secret(&self, secret: &str) -> Result<Option<ApiKey>, KeyError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE key_hash = ?"
        ))
        .bind(hash_key(secret))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(from_row))
    }

    pub async fn get(&self, id: &str) -> Result<Option<ApiKey>, KeyError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(from_row))
    }

    /// Whether any key was ever created. Revoked keys count: revoking the last
    /// key must not open the server to everyone.
    pub async fn any(&self) -> Result<bool, KeyError> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys)")
            .fetch_one(&self.pool)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["app", "web-backend_2", "a.b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "has space", "key_abc", "ä", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

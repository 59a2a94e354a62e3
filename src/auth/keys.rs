//! API keys. Only a SHA-256 of each key is stored; the key is shown once, when it is
//! created.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub use crate::queue::{ApiKey, LimitOverrides};
use crate::queue::{ApiKeys, KeyRow, QueueError};

/// Every key starts with this, so a leaked key is recognisable in logs and
/// secret scanners.
pub const KEY_PREFIX: &str = "vq_";
const ID_PREFIX: &str = "key_";
/// How much of a key a listing shows.
const SHOWN_PREFIX_LEN: usize = 10;

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
    #[error("API key store error: {0}")]
    Store(#[from] QueueError),
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

/// Keys as auth sees them: names, secrets and hashes; the rows live in the job store's
/// database (`queue::ApiKeys`), whichever backend that is.
#[derive(Clone)]
pub struct KeyStore {
    rows: Arc<dyn ApiKeys>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

impl KeyStore {
    pub fn new(rows: Arc<dyn ApiKeys>) -> Self {
        Self { rows }
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
        let row = KeyRow {
            id: format!("{ID_PREFIX}{}", hex::encode(random_bytes::<6>())),
            name: new.name.clone(),
            key_hash: hash_key(&secret),
            prefix: secret[..SHOWN_PREFIX_LEN].to_owned(),
            admin: new.admin,
            created_at: chrono::Utc::now(),
            limits: new.limits.clone(),
        };
        let key = self
            .rows
            .insert_key(&row)
            .await?
            .ok_or_else(|| KeyError::NameTaken(new.name.clone()))?;
        Ok((key, secret))
    }

    pub async fn list(&self) -> Result<Vec<ApiKey>, KeyError> {
        Ok(self.rows.list_keys().await?)
    }

    /// Revokes by id or name. Revoking twice keeps the first revocation time.
    pub async fn revoke(&self, id_or_name: &str) -> Result<ApiKey, KeyError> {
        self.rows
            .revoke_key(id_or_name)
            .await?
            .ok_or_else(|| KeyError::NotFound(id_or_name.to_owned()))
    }

    /// The key whose secret this is, revoked or not.
    pub async fn find_by_secret(&self, secret: &str) -> Result<Option<ApiKey>, KeyError> {
        Ok(self.rows.key_by_hash(&hash_key(secret)).await?)
    }

    pub async fn get(&self, id: &str) -> Result<Option<ApiKey>, KeyError> {
        Ok(self.rows.key_by_id(id).await?)
    }

    /// Whether any key was ever created. Revoked keys count: revoking the last
    /// key must not open the server to everyone.
    pub async fn any(&self) -> Result<bool, KeyError> {
        Ok(self.rows.any_key().await?)
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

//! API key rows, behind [`ApiKeys`]: the auth room decides what a key is (names, secrets,
//! hashes); the store keeps the rows, on whichever backend holds the jobs, so that a key
//! created on one API node authenticates on every other.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::QueueFuture;

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
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub limits: LimitOverrides,
}

impl ApiKey {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// A key row to insert: its hash, never the key itself.
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub key_hash: String,
    pub prefix: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub limits: LimitOverrides,
}

/// The `api_keys` table.
pub trait ApiKeys: Send + Sync + 'static {
    /// Inserts the key; `None` when its name is taken (revoked keys keep their names).
    fn insert_key<'a>(&'a self, key: &'a KeyRow) -> QueueFuture<'a, Option<ApiKey>>;
    /// Oldest first.
    fn list_keys(&self) -> QueueFuture<'_, Vec<ApiKey>>;
    /// Revokes by id or name; revoking twice keeps the first time. `None`: no such key.
    fn revoke_key<'a>(&'a self, id_or_name: &'a str) -> QueueFuture<'a, Option<ApiKey>>;
    fn key_by_hash<'a>(&'a self, key_hash: &'a str) -> QueueFuture<'a, Option<ApiKey>>;
    fn key_by_id<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<ApiKey>>;
    /// Whether any key was ever created, revoked ones included.
    fn any_key(&self) -> QueueFuture<'_, bool>;
}

//! `vqclip keys` against a real database, and what the server makes of the
//! keys it creates.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::support::succeeded;
use vqclip::auth::{AuthConfig, AuthError, Authenticator};
use vqclip::queue::SqliteStore;

fn vqclip(db: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .args(["--database-url", db])
        .env_remove("VQCLIP_CONFIG")
        .output()
        .unwrap()
}

#[tokio::test]
async fn create_list_revoke_and_what_the_server_sees() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/data/vqclip.db", dir.path().display());

    let key = succeeded(&vqclip(
        &db,
        &["keys", "create", "--name", "web", "--rps", "5"],
    ))
    .trim()
    .to_owned();
    assert!(key.starts_with("vq_") && key.len() == 3 + 43, "{key}");
    let admin = succeeded(&vqclip(
        &db,
        &["keys", "create", "--name", "ops", "--admin"],
    ))
    .trim()
    .to_owned();
    assert_ne!(key, admin);
    // Names are unique.
    let dup = vqclip(&db, &["keys", "create", "--name", "web"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    let listed: serde_json::Value =
        serde_json::from_str(&succeeded(&vqclip(&db, &["keys", "list", "--json"]))).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], "web");
    assert_eq!(listed[0]["limits"]["requests_per_second"], 5.0);
    assert_eq!(listed[1]["admin"], true);
    // The listing shows a prefix, never the key.
    let table = succeeded(&vqclip(&db, &["keys", "list"]));
    assert!(
        !table.contains(&key) && table.contains(&key[..10]),
        "{table}"
    );

    let store = SqliteStore::connect(&db, Duration::from_secs(5), 2)
        .await
        .unwrap();
    // Only a hash is stored: the key appears nowhere in the database.
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id, key_hash, key_prefix FROM api_keys")
            .fetch_all(store.pool())
            .await
            .unwrap();
    for (_, hash, prefix) in &rows {
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&key[3..]) && prefix.len() < key.len());
    }
    assert!(rows
        .iter()
        .any(|(_, h, _)| *h == vqclip::auth::hash_key(&key)));

    let auth = Authenticator::new(Arc::new(store.clone()), AuthConfig::default());
    let web = auth.identify(Some(&format!("Bearer {key}"))).await.unwrap();
    assert!(!web.admin);
    assert_eq!(web.limits.requests_per_second, 5.0);
    assert_eq!(web.limits.burst, AuthConfig::default().burst);
    // The scheme is case-insensitive; other schemes and garbage are not keys.
    assert!(auth.identify(Some(&format!("bearer  {key}"))).await.is_ok());
    assert!(matches!(
        auth.identify(Some(&format!("Basic {key}"))).await,
        Err(AuthError::MalformedHeader)
    ));
    assert!(matches!(
        auth.identify(Some(&format!("Bearer {key}x"))).await,
        Err(AuthError::InvalidKey)
    ));
    assert!(matches!(
        auth.identify(None).await,
        Err(AuthError::MissingKey)
    ));
    assert!(
        auth.identify(Some(&format!("Bearer {admin}")))
            .await
            .unwrap()
            .admin
    );

    // Revoke by name, then by id; the server refuses the key at once.
    assert!(vqclip(&db, &["keys", "revoke", "web"]).status.success());
    assert!(matches!(
        auth.identify(Some(&format!("Bearer {key}"))).await,
        Err(AuthError::RevokedKey(name)) if name == "web"
    ));
    let ops_id = rows
        .iter()
        .find(|(_, h, _)| *h == vqclip::auth::hash_key(&admin))
        .unwrap()
        .0
        .clone();
    assert!(vqclip(&db, &["keys", "revoke", &ops_id]).status.success());
    assert!(auth
        .identify(Some(&format!("Bearer {admin}")))
        .await
        .is_err());
    // With every key revoked, keys stay on: revoking must not open the server.
    assert!(auth.enabled().await.unwrap());
    assert!(matches!(
        auth.identify(None).await,
        Err(AuthError::MissingKey)
    ));
    let missing = vqclip(&db, &["keys", "revoke", "nobody"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("keys list"));
}

#[tokio::test]
async fn without_keys_everyone_is_the_local_admin_unless_required() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/vqclip.db", dir.path().display());
    let store = SqliteStore::connect(&db, Duration::from_secs(5), 2)
        .await
        .unwrap();
    let open = Authenticator::new(Arc::new(store.clone()), AuthConfig::default());
    let caller = open.identify(None).await.unwrap();
    assert!(caller.admin && caller.key_id.is_none());
    // Nobody to rate-limit apart from the one local user.
    for _ in 0..100 {
        open.check_rate(&caller).unwrap();
    }
    let required = Authenticator::new(
        Arc::new(store.clone()),
        AuthConfig {
            required: true,
            ..AuthConfig::default()
        },
    );
    assert!(matches!(
        required.identify(None).await,
        Err(AuthError::MissingKey)
    ));
}

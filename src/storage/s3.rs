//! The S3-compatible backend: `storage.url = "s3://bucket/prefix"`.
//!
//! Endpoint, region and credentials come from the `storage.s3_*` settings where given,
//! else from the usual `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, ...).
//! Requests are path-style unless `storage.s3_virtual_hosted_style` is on, which is what
//! local servers (MinIO, moto, Garage) want; `storage.s3_allow_http` permits a plain
//! `http://` endpoint.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

use super::StorageError;
use crate::config::StorageConfig;

/// The bucket and the key prefix of an `s3://bucket/prefix` URL.
pub fn parse_url(url: &str) -> Result<(String, String), StorageError> {
    let bad = |why: &str| {
        StorageError::Settings(format!(
            "storage.url {url:?}: {why}; expected s3://bucket or s3://bucket/prefix"
        ))
    };
    let rest = url.strip_prefix("s3://").ok_or_else(|| bad("not s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if !bucket_ok {
        return Err(bad(
            "the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    let parts_ok = prefix.is_empty() || prefix.split('/').all(super::is_safe_name);
    if !parts_ok {
        return Err(bad("each part of the prefix must be a plain name"));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// The bucket (under its prefix) as an object store.
pub fn build(url: &str, settings: &StorageConfig) -> Result<Arc<dyn ObjectStore>, StorageError> {
    let (bucket, prefix) = parse_url(url)?;
    // Settings win over the environment; an empty setting leaves the environment's value.
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_allow_http(settings.s3_allow_http)
        .with_virtual_hosted_style_request(settings.s3_virtual_hosted_style);
    let set = |v: &str| Some(v.trim()).filter(|v| !v.is_empty()).map(str::to_owned);
    if let Some(endpoint) = set(&settings.s3_endpoint) {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = set(&settings.s3_region) {
        builder = builder.with_region(region);
    }
    if let Some(key) = set(&settings.s3_access_key_id) {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = set(&settings.s3_secret_access_key) {
        builder = builder.with_secret_access_key(secret);
    }
    let s3 = builder
        .build()
        .map_err(|e| StorageError::Settings(format!("storage.url {url:?}: {e}")))?;
    Ok(if prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(PrefixStore::new(s3, prefix))
    })
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn bucket_urls() {
        assert_eq!(
            parse_url("s3://art/vq/prod/").unwrap(),
            ("art".into(), "vq/prod".into())
        );
        assert_eq!(
            parse_url("s3://art-1").unwrap(),
            ("art-1".into(), "".into())
        );
        for bad in [
            "s3://",
            "s3://A_B",
            "s3://ab",
            "s3://art/../x",
            "http://art",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}

//! The two artifact-store backends for tests: a temporary local directory, and a bucket on
//! a real S3 API server (moto's standalone server from PyPI) started on 127.0.0.1 by the
//! test itself.
//!
//! moto is found at `$VQCLIP_MOTO_SERVER`, else `.ci/venv/bin/moto_server` (which `.ci/run`
//! installs), else `moto_server` on the PATH. `VQCLIP_TEST_S3=skip` is the only way to
//! leave the S3 runs out; without it a missing moto fails the test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vqclip::config::{Config, Overrides, StorageConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
}

/// The backends a storage test runs against.
pub fn backends() -> Vec<Backend> {
    if s3_skipped() {
        eprintln!("VQCLIP_TEST_S3=skip: the S3 backend is not tested");
        vec![Backend::Local]
    } else {
        vec![Backend::Local, Backend::S3]
    }
}

pub fn s3_skipped() -> bool {
    std::env::var("VQCLIP_TEST_S3").is_ok_and(|v| v == "skip")
}

fn moto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VQCLIP_MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/venv/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("moto_server")
}

/// A moto S3 server on a free loopback port, killed when dropped.
pub struct MotoServer {
    child: Child,
    pub endpoint: String,
}

impl MotoServer {
    pub async fn start() -> MotoServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = moto_binary();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto's S3 server ({}: {e}). Install it with \
                     `python3 -m venv .ci/venv && .ci/venv/bin/pip install 'moto[server]==5.1.18'` \
                     (as .ci/run does), point VQCLIP_MOTO_SERVER at moto_server, or set \
                     VQCLIP_TEST_S3=skip to leave the S3 backend untested",
                    bin.display()
                )
            });
        let server = MotoServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client
                .get(format!("{}/moto-api/", server.endpoint))
                .send()
                .await
                .is_ok();
            if up {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "moto's S3 server did not answer on {} within 60 s",
                server.endpoint
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates a bucket (a path-style PUT; moto takes it unsigned).
    pub async fn create_bucket(&self, bucket: &str) {
        let r = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "creating bucket {bucket}: {r:?}");
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The storage settings of `backend`, under `dir`; the moto server (S3) lives as long as
/// the returned guard.
pub async fn storage_config(backend: Backend, dir: &Path) -> (StorageConfig, Option<MotoServer>) {
    let mut storage = Config::load_from(None, std::iter::empty(), &Overrides::default())
        .unwrap()
        .storage;
    storage.artifact_dir = dir.join("artifacts");
    match backend {
        Backend::Local => (storage, None),
        Backend::S3 => {
            let moto = MotoServer::start().await;
            moto.create_bucket("vqclip-test").await;
            let scratch = dir.join("scratch");
            s3_settings(&mut storage, &moto.endpoint, &scratch);
            (storage, Some(moto))
        }
    }
}

/// Points `storage` at the test bucket of the moto server at `endpoint`, rendering into
/// `scratch`.
pub fn s3_settings(storage: &mut StorageConfig, endpoint: &str, scratch: &Path) {
    storage.url = "s3://vqclip-test/some/prefix".into();
    storage.scratch_dir = scratch.to_owned();
    storage.s3_endpoint = endpoint.to_owned();
    storage.s3_region = "us-east-1".into();
    storage.s3_access_key_id = "testing".into();
    storage.s3_secret_access_key = "testing".into();
    storage.s3_allow_http = true;
}

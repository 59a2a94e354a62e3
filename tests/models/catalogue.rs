//! Downloads and the cache against a local stand-in for the hub and for plain
//! URLs (no network): caching, resume, checksums, fallbacks and offline mode.

use crate::support::hub::{content, sha256_hex, HubServer, ServedFile, B16, B32};
use vqclip::models::catalogue::{self, CatalogueError, ModelCache, ModelKind};
use vqclip::models::download::{self, DownloadError, RemoteFile};

fn serve_b32(server: &HubServer, weights: &[u8]) {
    server.put_model(B32, b"{\"cfg\":1}", "model.safetensors", weights.to_vec());
    server.put(
        &format!("{B32}/tokenizer.json"),
        ServedFile::plain(b"{\"tok\":1}".to_vec()),
    );
}

#[test]
fn hub_model_is_downloaded_once_then_served_from_the_cache() {
    let server = HubServer::start();
    let weights = content(300_000, 1);
    serve_b32(&server, &weights);
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path()).with_hub_endpoint(&server.base);

    let dir = catalogue::resolve_clip("ViT-B/32", &cache).unwrap();
    assert_eq!(dir, tmp.path().join("clip/ViT-B-32"));
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        b"{\"cfg\":1}"
    );
    assert_eq!(
        std::fs::read(dir.join("tokenizer.json")).unwrap(),
        b"{\"tok\":1}"
    );
    assert!(!dir.join("model.safetensors.part").exists());
    let first = server.requests().len();
    // config, tokenizer, and the weights' redirect plus CDN hop.
    assert_eq!(first, 4, "{:?}", server.requests());
    assert!(server
        .requests()
        .iter()
        .all(|r| !r.path.contains("pytorch_model.bin")));

    let again = catalogue::resolve_clip("vit-b-32", &cache).unwrap();
    assert_eq!(again, dir);
    assert_eq!(
        server.requests().len(),
        first,
        "a cached model must not touch the network"
    );
    assert_eq!(
        cache.status(catalogue::find("ViT-B/32").unwrap()),
        catalogue::CacheStatus::Complete
    );
}

#[test]
fn pytorch_weights_are_the_fallback_when_safetensors_is_absent() {
    let server = HubServer::start();
    let bin = content(10_000, 2);
    server.put_model(B16, b"{}", "pytorch_model.bin", bin.clone());
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path()).with_hub_endpoint(&server.base);

    let dir = catalogue::resolve_clip("ViT-B/16", &cache).unwrap();
    assert_eq!(std::fs::read(dir.join("pytorch_model.bin")).unwrap(), bin);
    assert!(!dir.join("model.safetensors").exists());
    // The optional tokenizer.json was asked for and was missing: that is fine.
    assert!(!dir.join("tokenizer.json").exists());
}

#[test]
fn an_interrupted_download_resumes_with_range() {
    let server = HubServer::start();
    let data = content(200_000, 3);
    server.put(
        "/files/last.ckpt",
        ServedFile {
            bytes: data.clone(),
            cut_first_response_at: Some(70_000),
            ..ServedFile::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("vq/last.ckpt");
    let mut remote = RemoteFile::new(server.url("/files/last.ckpt").parse().unwrap());
    remote.sha256 = Some(sha256_hex(&data));

    let err = download::fetch_blocking(&remote, &dest).unwrap_err();
    assert!(
        matches!(
            err,
            DownloadError::Network {
                partial: Some(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("run the command again to resume"),
        "{err}"
    );
    let kept = std::fs::metadata(download::part_path(&dest)).unwrap().len();
    assert!(kept > 0 && kept < data.len() as u64, "kept {kept}");
    assert!(!dest.exists());

    let fetched = download::fetch_blocking(&remote, &dest).unwrap();
    assert_eq!(fetched.resumed_from, kept);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(fetched.sha256, Some(sha256_hex(&data)));
    let last = server.requests().last().cloned().unwrap();
    assert_eq!(
        last.range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    assert!(!download::part_path(&dest).exists());
}

#[test]
fn a_checksum_mismatch_deletes_the_download() {
    let server = HubServer::start();
    let data = content(5_000, 4);
    server.put("/files/model.yaml", ServedFile::plain(data.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("model.yaml");
    let mut remote = RemoteFile::new(server.url("/files/model.yaml").parse().unwrap());
    remote.sha256 = Some("0".repeat(64));

    let err = download::fetch_blocking(&remote, &dest).unwrap_err();
    match &err {
        DownloadError::ChecksumMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &"0".repeat(64));
            assert_eq!(actual, &sha256_hex(&data));
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(!dest.exists());
    assert!(!download::part_path(&dest).exists());
}

#[test]
fn the_hub_sha256_is_enforced_for_lfs_files() {
    let server = HubServer::start();
    serve_b32(&server, &content(1_000, 5));
    // The hub advertises one sha256 and the CDN serves other bytes.
    let mut tampered = ServedFile::lfs(content(1_000, 5));
    tampered.bytes[10] ^= 1;
    server.put(&format!("{B32}/model.safetensors"), tampered);
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path()).with_hub_endpoint(&server.base);

    let err = catalogue::resolve_clip("ViT-B/32", &cache).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("sha256 mismatch"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    let dir = tmp.path().join("clip/ViT-B-32");
    assert!(!dir.join("model.safetensors").exists());
    assert!(!dir.join("model.safetensors.part").exists());
}

#[test]
fn offline_mode_names_the_missing_file_and_where_to_put_it() {
    let server = HubServer::start();
    serve_b32(&server, &content(1_000, 6));
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path())
        .with_hub_endpoint(&server.base)
        .with_offline(true);
    let dir = tmp.path().join("clip/ViT-B-32");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), b"{}").unwrap();

    let err = catalogue::resolve("ViT-B/32", ModelKind::Clip, &cache).unwrap_err();
    let CatalogueError::Offline { missing, .. } = &err else {
        panic!("expected the offline error, got {err}");
    };
    assert_eq!(missing.len(), 1, "only the weights are missing: {err}");
    assert_eq!(missing[0].path, dir.join("model.safetensors"));
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.join("model.safetensors").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("pytorch_model.bin"), "{msg}");
    assert!(msg.contains("vqclip models pull ViT-B/32"), "{msg}");
    assert!(msg.contains("refs%2Fpr%2F15/model.safetensors"), "{msg}");
    assert!(server.requests().is_empty(), "offline mode made a request");

    // With the file put where the message said, the same call succeeds, still offline.
    std::fs::write(dir.join("model.safetensors"), b"weights").unwrap();
    assert_eq!(catalogue::resolve_clip("ViT-B/32", &cache).unwrap(), dir);
    assert!(server.requests().is_empty());
}

#[test]
fn offline_vqgan_error_lists_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path()).with_offline(true);
    let msg = catalogue::resolve_vqgan("vqgan_imagenet_f16_16384", &cache)
        .unwrap_err()
        .to_string();
    let dir = tmp.path().join("vqgan/vqgan_imagenet_f16_16384");
    assert!(
        msg.contains(&dir.join("model.yaml").display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains(&dir.join("last.ckpt").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("heibox.uni-heidelberg.de"), "{msg}");
}

#[test]
fn a_local_path_is_used_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(tmp.path().join("cache")).with_offline(true);
    let ckpt = tmp.path().join("my.ckpt");
    std::fs::write(&ckpt, b"x").unwrap();
    let spec = ckpt.to_str().unwrap();
    assert_eq!(catalogue::resolve_vqgan(spec, &cache).unwrap(), ckpt);
    assert_eq!(
        catalogue::resolve_clip(tmp.path().to_str().unwrap(), &cache).unwrap(),
        tmp.path()
    );
    let missing = tmp.path().join("nope.ckpt");
    let err = catalogue::resolve(missing.to_str().unwrap(), ModelKind::Vqgan, &cache).unwrap_err();
    assert!(matches!(err, CatalogueError::PathNotFound(_)), "{err}");
}

#[test]
fn concurrent_fetches_of_one_file_download_it_once() {
    let server = HubServer::start();
    let data = content(500_000, 7);
    server.put("/files/shared.ckpt", ServedFile::plain(data.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("shared.ckpt");
    let remote = RemoteFile::new(server.url("/files/shared.ckpt").parse().unwrap());

    let results: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| s.spawn(|| download::fetch_blocking(&remote, &dest)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.as_ref().unwrap().path, dest);
    }
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(server.requests().len(), 1, "{:?}", server.requests());
}

#[test]
fn a_redirect_to_plain_http_off_loopback_is_refused() {
    let server = HubServer::start();
    let file = ServedFile {
        redirect_to: Some("http://198.51.100.7/last.ckpt".to_owned()),
        ..ServedFile::default()
    };
    server.put("/files/moved.ckpt", file);
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("moved.ckpt");
    let remote = RemoteFile::new(server.url("/files/moved.ckpt").parse().unwrap());

    let err = download::fetch_blocking(&remote, &dest).unwrap_err();
    assert!(matches!(err, DownloadError::InsecureUrl { .. }), "{err}");
    assert!(
        err.to_string().contains("http://198.51.100.7/last.ckpt"),
        "{err}"
    );
    assert!(!dest.exists());
}

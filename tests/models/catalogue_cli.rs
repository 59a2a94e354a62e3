//! `vqclip models list | pull | convert` through the built binary, with a local
//! stand-in for the hub reached through `HF_ENDPOINT` (no network).

use std::path::Path;
use std::process::{Command, Output};

use crate::support::hub::{content, HubServer, B32};

fn vqclip(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vqclip"));
    cmd.args(args)
        .env("VQCLIP_MODEL_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("VQCLIP_OFFLINE")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn pull_downloads_through_hf_endpoint_and_list_shows_it_cached() {
    let server = HubServer::start();
    let weights = content(50_000, 9);
    server.put_model(B32, b"{}", "model.safetensors", weights.clone());
    let tmp = tempfile::tempdir().unwrap();

    let before = vqclip(tmp.path(), &["models", "list"], &[]);
    assert!(before.status.success(), "{}", text(&before.stderr));
    let listing = text(&before.stdout);
    for name in [
        "ViT-B/32",
        "ViT-B/16",
        "ViT-L/14",
        "vqgan_imagenet_f16_16384",
        "vqgan_imagenet_f16_1024",
        "wikiart_16384",
    ] {
        assert!(listing.contains(name), "{name} missing from:\n{listing}");
    }
    let b32_row = |listing: &str| {
        listing
            .lines()
            .find(|l| l.starts_with("ViT-B/32 "))
            .unwrap()
            .to_owned()
    };
    assert!(b32_row(&listing).trim_end().ends_with("no"), "{listing}");
    assert!(b32_row(&listing).contains("hf:openai/clip-vit-base-patch32@refs/pr/15"));

    let offline = vqclip(
        tmp.path(),
        &["models", "pull", "ViT-B/32"],
        &[("HF_ENDPOINT", &server.base), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(!offline.status.success());
    let err = text(&offline.stderr);
    let expected = tmp.path().join("clip/ViT-B-32/model.safetensors");
    assert!(err.contains(&expected.display().to_string()), "{err}");
    assert!(
        server.requests().is_empty(),
        "offline pull touched the network"
    );

    let pull = vqclip(
        tmp.path(),
        &["models", "pull", "ViT-B/32"],
        &[("HF_ENDPOINT", &server.base)],
    );
    assert!(pull.status.success(), "{}", text(&pull.stderr));
    assert_eq!(std::fs::read(&expected).unwrap(), weights);

    let after = text(&vqclip(tmp.path(), &["models", "list"], &[]).stdout);
    assert!(b32_row(&after).trim_end().ends_with("yes"), "{after}");
}

#[test]
fn convert_drops_the_discriminator_and_keeps_names() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqgan-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("converted/vqgan.safetensors");
    let run = vqclip(
        tmp.path(),
        &[
            "models",
            "convert",
            fixture.join("last.ckpt").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(run.status.success(), "{}", text(&run.stderr));

    let original =
        candle_core::pickle::read_all_with_key(fixture.join("last.ckpt"), Some("state_dict"))
            .unwrap();
    let converted = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let mut expected: Vec<&str> = original
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !n.starts_with("loss."))
        .collect();
    expected.sort();
    let mut names: Vec<&str> = converted.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, expected);
    assert!(original.iter().any(|(n, _)| n.starts_with("loss.")));
    assert!(names.contains(&"quantize.embedding.weight"));
    for (name, tensor) in &original {
        if let Some(c) = converted.get(name) {
            let diff = (tensor - c)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name} changed");
        }
    }
    assert_eq!(
        std::fs::read(out.with_file_name("model.yaml")).unwrap(),
        std::fs::read(fixture.join("model.yaml")).unwrap()
    );
}

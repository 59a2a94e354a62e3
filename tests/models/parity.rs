//! Parity with the PyTorch reference (transformers' CLIPModel and CLIPTokenizer, taming's
//! VQModel) on the fixtures written by `tests/fixtures/make_fixtures.py`.

use std::collections::HashMap;

use crate::support::shapes::requested;
use crate::support::{assert_close, fixture, relative_error};
use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;
use vqclip::models::{Clip, ClipConfig, ClipTokenizer, ModelError, Vqgan};

fn reference_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference.safetensors"), &Device::Cpu).unwrap()
}

fn reference_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

fn json_matrix(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    let (n, d) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

fn l2_normalise(x: &Tensor) -> Tensor {
    x.broadcast_div(
        &x.sqr()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .sqrt()
            .unwrap(),
    )
    .unwrap()
}

/// input.png as (1, 3, H, W) in [0, 1].
fn input_png() -> Tensor {
    let img = image::open(fixture("input.png")).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|b| b as f32 / 255.0)
        .collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Ids equal OpenAI's tokenizer (clip-anytorch, what generate.py uses) on prompts that its
/// ftfy and HTML cleaning rewrites: curly quotes, entities, full-width forms, ligatures,
/// mojibake, emoji, CJK, combining marks, control characters, tabs and CRLF, long prompts.
#[test]
fn token_ids_match_openai_clip_tokenizer() {
    let tok = ClipTokenizer::bundled().unwrap();
    let reference = reference_json();
    let cases = reference["tokenizer"]["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    let (mut saw_truncation, mut cleaning_mattered) = (false, 0);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let openai: Vec<u32> = serde_json::from_value(case["openai_ids"].clone()).unwrap();
        let hf: Vec<u32> = serde_json::from_value(case["hf_ids"].clone()).unwrap();
        // `ids` is OpenAI's list up to its end marker, padded with end-of-text.
        assert_eq!(&want[..openai.len()], &openai[..], "fixture for {text:?}");
        let got = tok.encode(text).unwrap();
        assert_eq!(got.ids, want, "ids for {text:?}");
        assert_eq!(
            got.truncated,
            case["truncated"].as_bool().unwrap(),
            "truncated for {text:?}"
        );
        saw_truncation |= got.truncated;
        cleaning_mattered += usize::from(hf != openai);
    }
    assert!(
        saw_truncation,
        "the cases must include a prompt longer than 77 tokens"
    );
    assert!(
        cleaning_mattered >= 30,
        "only {cleaning_mattered} cases where OpenAI's cleaning changes the ids"
    );
}

#[test]
fn tokenizer_json_of_a_model_dir_is_used() {
    let dir = fixture("clip-tiny-bin");
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let bundled = ClipTokenizer::bundled().unwrap();
    for case in reference_json()["tokenizer_json"]["cases"]
        .as_array()
        .unwrap()
    {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got.ids, want, "ids for {text:?}");
        assert_ne!(
            bundled.encode(text).unwrap().ids,
            want,
            "the small vocab must differ"
        );
    }
}

fn check_clip(clip: &Clip, t: &HashMap<String, Tensor>, prefix: &str) {
    let ids = t[&format!("{prefix}_text_ids")]
        .to_dtype(DType::U32)
        .unwrap();
    assert_close(
        &format!("{prefix} text embeddings"),
        &clip.encode_text(&ids).unwrap(),
        &t[&format!("{prefix}_text_embeds")],
    );
    assert_close(
        &format!("{prefix} image embeddings"),
        &clip
            .encode_image(&t[&format!("{prefix}_pixel_values")])
            .unwrap(),
        &t[&format!("{prefix}_image_embeds")],
    );
}

#[test]
fn clip_from_safetensors_matches_transformers() {
    let clip = Clip::load(&fixture("clip-tiny"), &Device::Cpu).unwrap();
    assert_eq!(clip.image_size(), 32);
    check_clip(&clip, &reference_tensors(), "clip");
}

#[test]
fn clip_from_pytorch_model_bin_matches_transformers() {
    // Also: gelu, eos_token_id != 2 (pooling at the first eos, with tokens after it), and a
    // weights file passed directly instead of its directory.
    let path = fixture("clip-tiny-bin/pytorch_model.bin");
    let clip = Clip::load(&path, &Device::Cpu).unwrap();
    check_clip(&clip, &reference_tensors(), "clip_bin");
}

#[test]
fn clip_embed_of_input_png_matches_reference_preprocessing() {
    let clip = Clip::load(&fixture("clip-tiny"), &Device::Cpu).unwrap();
    let reference = &reference_json()["embed_cli"];
    let pixels = clip.normalize_pixels(&input_png()).unwrap();
    assert_close(
        "CLIPImageProcessor pixel_values",
        &pixels,
        &reference_tensors()["embed_cli_pixel_values"],
    );
    let image = l2_normalise(&clip.encode_image(&pixels).unwrap());
    assert_close("embed image", &image, &json_matrix(&reference["image"]));
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let (text, truncated) = clip.encode_prompts(&texts).unwrap();
    assert!(truncated.iter().all(|t| !t));
    assert_close(
        "embed text",
        &l2_normalise(&text),
        &json_matrix(&reference["text"]),
    );
}

#[test]
fn openai_clip_configs_parse() {
    let dir = fixture("openai-configs");
    let expect = [
        ("clip-vit-base-patch32", 512, 768, 12, 32, 224, 512, 2),
        ("clip-vit-base-patch16", 512, 768, 12, 16, 224, 512, 2),
        ("clip-vit-large-patch14", 768, 1024, 24, 14, 224, 768, 49407),
        (
            "clip-vit-large-patch14-336",
            768,
            1024,
            24,
            14,
            336,
            768,
            49407,
        ),
    ];
    for (name, text_hidden, vis_hidden, vis_layers, patch, size, proj, eos) in expect {
        let cfg = ClipConfig::from_json_file(&dir.join(format!("{name}.json"))).unwrap();
        assert_eq!(cfg.text_config.hidden_size, text_hidden, "{name}");
        assert_eq!(cfg.text_config.num_hidden_layers, 12, "{name}");
        assert_eq!(cfg.text_config.vocab_size, 49408, "{name}");
        assert_eq!(cfg.text_config.eos_token_id, eos, "{name}");
        assert_eq!(cfg.vision_config.hidden_size, vis_hidden, "{name}");
        assert_eq!(cfg.vision_config.num_hidden_layers, vis_layers, "{name}");
        assert_eq!(cfg.vision_config.patch_size, patch, "{name}");
        assert_eq!(cfg.vision_config.image_size, size, "{name}");
        assert_eq!(cfg.projection_dim, proj, "{name}");
        assert_eq!(
            cfg.vision_config.hidden_act,
            vqclip::models::layers::Activation::QuickGelu
        );
    }
    assert_eq!(
        ClipConfig::from_json_file(&dir.join("clip-vit-base-patch32.json")).unwrap(),
        ClipConfig::vit_base_patch32()
    );
}

fn check_vqgan(vq: &Vqgan) {
    let t = reference_tensors();
    let z = vq.encode(&t["vqgan_input"]).unwrap();
    assert_close("VQGAN encode", &z, &t["vqgan_z"]);
    let (z_q, indices) = vq.quantize(&z).unwrap();
    let want: Vec<i64> = t["vqgan_indices"].flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<u32> = indices.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(indices.dims(), t["vqgan_indices"].dims());
    assert_eq!(
        got.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        want,
        "codebook indices"
    );
    assert_close("VQGAN quantize", &z_q, &t["vqgan_z_q"]);
    assert_close(
        "VQGAN decode",
        &vq.decode(&z_q).unwrap(),
        &t["vqgan_decoded"],
    );
    assert_close(
        "VQGAN decode of a free latent",
        &vq.decode(&t["vqgan_free_z"]).unwrap(),
        &t["vqgan_free_decoded"],
    );
}

#[test]
fn vqgan_from_lightning_ckpt_matches_taming() {
    let vq = Vqgan::load(&fixture("vqgan-tiny"), &Device::Cpu).unwrap();
    assert_eq!(vq.downsample_factor(), 4);
    assert_eq!((vq.embed_dim(), vq.n_embed()), (8, 64));
    assert_eq!(vq.codebook().dims(), &[64, 8]);
    check_vqgan(&vq);
}

#[test]
fn vqgan_reconstruct_indices_of_input_png() {
    let vq = Vqgan::load(&fixture("vqgan-tiny/last.ckpt"), &Device::Cpu).unwrap();
    let x = ((input_png() * 2.0).unwrap() - 1.0).unwrap();
    let (_, indices) = vq.quantize(&vq.encode(&x).unwrap()).unwrap();
    let got: Vec<u32> = indices.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<u32> =
        serde_json::from_value(reference_json()["reconstruct_cli"]["indices"].clone()).unwrap();
    assert_eq!(got, want);
}

#[test]
fn vqgan_ckpt_discriminator_is_skipped_and_safetensors_load() {
    let ckpt = fixture("vqgan-tiny/last.ckpt");
    let all =
        vqclip::models::weights::read_tensors(&ckpt, DType::F32, &Device::Cpu, &|_| true).unwrap();
    assert!(
        all.keys().any(|k| k.starts_with("loss.")),
        "fixture must hold loss.* tensors"
    );
    assert!(all.contains_key("quantize.embedding.weight"));
    assert!(all.contains_key("decoder.up.2.upsample.conv.weight"));

    // The same weights as safetensors, discriminator left out, with config.yaml beside them.
    let dir = tempfile::tempdir().unwrap();
    let model: HashMap<String, Tensor> = all
        .into_iter()
        .filter(|(k, _)| !k.starts_with("loss."))
        .collect();
    let st = dir.path().join("vqgan.safetensors");
    candle_core::safetensors::save(&model, &st).unwrap();
    std::fs::copy(
        fixture("vqgan-tiny/model.yaml"),
        dir.path().join("config.yaml"),
    )
    .unwrap();
    check_vqgan(&Vqgan::load(&st, &Device::Cpu).unwrap());
}

#[test]
fn loading_errors_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("clip-tiny/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = Clip::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(matches!(err, ModelError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    // A config that disagrees with the weights names the tensor.
    let cfg = std::fs::read_to_string(fixture("clip-tiny/config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 32", "\"intermediate_size\": 40");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let err = Clip::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fc1"), "{err}");

    let err = Vqgan::load(&dir.path().join("nothing.ckpt"), &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, ModelError::Missing { .. }), "{err}");
}

fn assert_same_tensors(
    what: &str,
    ours: HashMap<String, Vec<usize>>,
    upstream: &Value,
    unused: &[&str],
) {
    let upstream: HashMap<String, Vec<usize>> = serde_json::from_value(upstream.clone()).unwrap();
    let upstream: HashMap<String, Vec<usize>> = upstream
        .into_iter()
        .filter(|(k, _)| !unused.contains(&k.as_str()))
        .collect();
    let mut missing: Vec<&String> = upstream.keys().filter(|k| !ours.contains_key(*k)).collect();
    let mut extra: Vec<&String> = ours.keys().filter(|k| !upstream.contains_key(*k)).collect();
    missing.sort();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: not requested {missing:?}; not upstream {extra:?}"
    );
    for (name, shape) in &upstream {
        assert_eq!(&ours[name], shape, "{what}: shape of {name}");
    }
}

#[test]
fn real_size_architectures_request_exactly_the_upstream_tensors() {
    let shapes: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("upstream-shapes.json")).unwrap())
            .unwrap();
    for name in ["clip-vit-base-patch32", "clip-vit-large-patch14-336"] {
        let cfg =
            ClipConfig::from_json_file(&fixture(&format!("openai-configs/{name}.json"))).unwrap();
        let ours = requested(|vb| {
            Clip::new(vb, &cfg).unwrap();
        });
        // logit_scale only scales logits, which vqclip computes itself.
        assert_same_tensors(name, ours, &shapes[name], &["logit_scale"]);
    }
    let yaml = "model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    ddconfig: {double_z: false, z_channels: 256, resolution: 256, in_channels: 3, out_ch: 3,
      ch: 128, ch_mult: [1, 1, 2, 2, 4], num_res_blocks: 2, attn_resolutions: [16], dropout: 0.0}
";
    let cfg = vqclip::models::VqganConfig::from_yaml_str(yaml).unwrap();
    let ours = requested(|vb| {
        Vqgan::new(vb, &cfg).unwrap();
    });
    assert_same_tensors(
        "vqgan_imagenet_f16_16384",
        ours,
        &shapes["vqgan_imagenet_f16_16384"],
        &[],
    );
}

#[test]
fn half_precision_weights_stay_close_to_f32() {
    // Norms and softmax accumulate in f32 inside the seam. (candle's CPU matmul has no bf16,
    // so bf16 is checked only where a GPU runs it.)
    let t = reference_tensors();
    let dtype = DType::F16;
    let clip = Clip::load_with_dtype(&fixture("clip-tiny"), dtype, &Device::Cpu).unwrap();
    let pixels = t["clip_pixel_values"].to_dtype(dtype).unwrap();
    let err = relative_error(
        &clip.encode_image(&pixels).unwrap(),
        &t["clip_image_embeds"],
    );
    assert!(err < 1e-2, "f16 CLIP image: {err}");
    let ids = t["clip_text_ids"].to_dtype(DType::U32).unwrap();
    let err = relative_error(&clip.encode_text(&ids).unwrap(), &t["clip_text_embeds"]);
    assert!(err < 1e-2, "f16 CLIP text: {err}");

    let vq = Vqgan::load_with_dtype(&fixture("vqgan-tiny"), dtype, &Device::Cpu).unwrap();
    let z_q = t["vqgan_z_q"].to_dtype(dtype).unwrap();
    let err = relative_error(&vq.decode(&z_q).unwrap(), &t["vqgan_decoded"]);
    assert!(err < 1e-2, "f16 VQGAN decode: {err}");
}

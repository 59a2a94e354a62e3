//! Parity of the other models `generate.py` accepts with their PyTorch references on random
//! weights: taming's GumbelVQ, the first stage of a Net2NetTransformer checkpoint, and OpenAI's
//! ResNet CLIP from a TorchScript `.pt` (fixtures from `make_fixtures.py make_more_models`).

use std::collections::HashMap;

use crate::support::{assert_close, fixture};
use candle_core::{DType, Device, Tensor, Var};
use vqclip::models::{Clip, Quantizer, Vqgan};

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference_models.safetensors"), &Device::Cpu).unwrap()
}

fn as_u32(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// encode, nearest-codebook quantize (generate.py's `vector_quantize`) and decode.
fn check_vq_roundtrip(vq: &Vqgan, prefix: &str, t: &HashMap<String, Tensor>) {
    let x = &t["small_vq_input"];
    let z = vq.encode(x).unwrap();
    assert_close(&format!("{prefix} encode"), &z, &t[&format!("{prefix}_z")]);
    let (z_q, idx) = vq.quantize(&z).unwrap();
    assert_eq!(
        as_u32(&idx),
        as_u32(&t[&format!("{prefix}_indices")]),
        "{prefix} codebook indices"
    );
    assert_close(&format!("{prefix} z_q"), &z_q, &t[&format!("{prefix}_z_q")]);
    let dec = vq.decode(&z_q).unwrap();
    assert_close(
        &format!("{prefix} decode"),
        &dec,
        &t[&format!("{prefix}_decoded")],
    );
}

#[test]
fn gumbel_vqgan_matches_taming() {
    let t = reference();
    let vq = Vqgan::load(&fixture("vqgan-gumbel-tiny"), &Device::Cpu).unwrap();
    assert_eq!(vq.config().quantizer, Quantizer::Gumbel);
    assert_eq!(vq.n_embed(), 32);
    check_vq_roundtrip(&vq, "gumbel", &t);

    // The encode taming's GumbelQuantize makes (noise-free): the argmax of quantize.proj.
    let (z_q, idx) = vq.encode_quantized(&t["small_vq_input"]).unwrap();
    assert_eq!(as_u32(&idx), as_u32(&t["gumbel_encode_indices"]));
    assert_close("gumbel encode_quantized", &z_q, &t["gumbel_encode_q"]);
    // ... which differs from snapping the pre-quantisation latent, or this proves nothing.
    assert_ne!(as_u32(&idx), as_u32(&t["gumbel_indices"]));
}

#[test]
fn net2net_first_stage_matches_taming() {
    let t = reference();
    let vq = Vqgan::load(&fixture("net2net-tiny/last.ckpt"), &Device::Cpu).unwrap();
    assert_eq!(vq.config().quantizer, Quantizer::Nearest);
    check_vq_roundtrip(&vq, "net2net", &t);
    let (_, idx) = vq.encode_quantized(&t["small_vq_input"]).unwrap();
    assert_eq!(as_u32(&idx), as_u32(&t["net2net_indices"]));
}

fn check_resnet_clip(clip: &Clip, t: &HashMap<String, Tensor>) {
    assert!(clip.is_resnet());
    assert_eq!(clip.image_size(), 64);
    assert_eq!(clip.projection_dim(), 16);
    let img = clip.encode_image(&t["rn_pixels"]).unwrap();
    assert_close("RN encode_image", &img, &t["rn_image_embeds"]);
    let ids = t["rn_text_ids"].to_dtype(DType::U32).unwrap();
    let txt = clip.encode_text(&ids).unwrap();
    assert_close("RN encode_text", &txt, &t["rn_text_embeds"]);
    // The model directory's tokenizer.json gives the ids the reference encoded.
    let (from_prompts, _) = clip
        .encode_prompts(&["a photo of a cat", "The lighthouse, at NIGHT!"])
        .unwrap();
    assert_close("RN encode_prompts", &from_prompts, &t["rn_text_embeds"]);
}

#[test]
fn resnet_clip_from_torchscript_matches_openai() {
    let t = reference();
    let clip = Clip::load(&fixture("clip-rn-tiny/RN-tiny.pt"), &Device::Cpu).unwrap();
    check_resnet_clip(&clip, &t);
    // The directory alone resolves to the one .pt inside it.
    let clip = Clip::load(&fixture("clip-rn-tiny"), &Device::Cpu).unwrap();
    check_resnet_clip(&clip, &t);
    let cfg = clip.config().vision_resnet.clone().unwrap();
    assert_eq!((cfg.layers, cfg.width, cfg.heads), ([1, 2, 1, 1], 4, 2));
}

#[test]
fn resnet_clip_pixel_gradient_matches_torch() {
    let t = reference();
    let clip = Clip::load(&fixture("clip-rn-tiny/RN-tiny.pt"), &Device::Cpu).unwrap();
    let pixels = Var::from_tensor(&t["rn_pixels"].narrow(0, 0, 1).unwrap()).unwrap();
    let loss = (clip.encode_image(pixels.as_tensor()).unwrap() * &t["rn_grad_weights"])
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(pixels.as_tensor())
        .expect("no gradient reached the pixels");
    assert_close("RN d/dpixels", grad, &t["rn_pixel_grad"]);
}

/// Central differences in f64 along a random direction against autograd, through the stem's
/// stride-2 conv, the avgpool downsampling and the attention pool's softmax.
#[test]
fn resnet_clip_pixel_gradient_matches_finite_differences() {
    let clip = Clip::load_with_dtype(
        &fixture("clip-rn-tiny/RN-tiny.pt"),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let t = reference();
    let x0 = t["rn_pixels"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let w = t["rn_grad_weights"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let f = |x: &Tensor| -> Tensor {
        (clip.encode_image(x).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let x = Var::from_tensor(&x0).unwrap();
    let grads = f(x.as_tensor()).backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    // A fixed direction (the other reference image), so the test is deterministic.
    let dir = t["rn_pixels"]
        .narrow(0, 1, 1)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let analytic = (g * &dir)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    // Small steps: a ReLU kink crossed inside +-h biases central differences; f64 keeps the
    // rounding near 1e-6 relative even so.
    let h = 1e-6;
    let plus = f(&(&x0 + (&dir * h).unwrap()).unwrap())
        .to_scalar::<f64>()
        .unwrap();
    let minus = f(&(&x0 - (&dir * h).unwrap()).unwrap())
        .to_scalar::<f64>()
        .unwrap();
    let numeric = (plus - minus) / (2.0 * h);
    let err = (analytic - numeric).abs() / numeric.abs().max(1e-6);
    assert!(
        err < 1e-4,
        "analytic {analytic} vs numeric {numeric} (rel {err:e})"
    );
}

mod render_with_them {
    //! The render loop runs on each new model kind: the same contract (`codebook`, `quantize`,
    //! `decode`, `encode`; `encode_image`, `encode_text`, `image_size`, `normalize_pixels`).

    use super::*;
    use vqclip::render::RenderSession;
    use vqclip::render::{render, CancelToken, JobSpec, ModelSet, RenderJob, RenderOutcome};

    fn spec(json: &str) -> JobSpec {
        let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
        let defaults = serde_json::json!({
            "width": 16, "height": 16, "cutn": 4, "save_every": 0, "checkpoint_every": 0,
            "augments": [], "seed": 3, "video": {"enabled": false}
        });
        for (k, v) in defaults.as_object().unwrap() {
            value
                .as_object_mut()
                .unwrap()
                .entry(k.clone())
                .or_insert(v.clone());
        }
        serde_json::from_value(value).unwrap()
    }

    /// Optimising toward the prompt raises its CLIP similarity: gradients flow from the
    /// ResNet's attention pool through the Gumbel VQGAN's decoder to z.
    #[test]
    fn gumbel_vqgan_with_resnet_clip_optimises() {
        let models = ModelSet::load_paths(
            &fixture("vqgan-gumbel-tiny"),
            &[fixture("clip-rn-tiny/RN-tiny.pt")],
            &Device::Cpu,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let job = RenderJob::new(
            spec(r#"{"prompts": "a photo of a cat", "steps": 12}"#),
            dir.path(),
        );
        let mut session = RenderSession::new(&job, &models).unwrap();
        let before = session.similarities().unwrap();
        for _ in 0..12 {
            let stats = session.step().unwrap();
            assert!(stats.loss.is_finite());
        }
        let after = session.similarities().unwrap();
        assert!(after[0] > before[0], "similarity {before:?} -> {after:?}");
    }

    #[test]
    fn net2net_first_stage_and_resnet_clip_render_to_completion() {
        let models = ModelSet::load_paths(
            &fixture("net2net-tiny/last.ckpt"),
            &[fixture("clip-rn-tiny"), fixture("clip-tiny")],
            &Device::Cpu,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let job = RenderJob::new(
            spec(r#"{"prompts": "a lighthouse", "steps": 3}"#),
            dir.path(),
        );
        let mut sink = |_: vqclip::render::ProgressEvent| {};
        let outcome = render(&job, &models, &mut sink, &CancelToken::new()).unwrap();
        let RenderOutcome::Completed(art) = outcome else {
            panic!("{outcome:?}")
        };
        let img = image::open(&art.image).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
}

mod cli {
    //! `vqclip models convert` and `models list` for the new kinds, through the built binary.

    use super::*;
    use std::path::Path;
    use std::process::{Command, Output};

    fn vqclip(cache: &Path, args: &[&std::ffi::OsStr]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .args(args)
            .env("VQCLIP_MODEL_CACHE", cache)
            .env("VQCLIP_OFFLINE", "1")
            .output()
            .unwrap()
    }

    fn ok(out: &Output) -> String {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    #[test]
    fn list_shows_the_new_catalogue_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let listing = ok(&vqclip(tmp.path(), &["models".as_ref(), "list".as_ref()]));
        for (name, kind, host) in [
            ("RN50", "CLIP", "openaipublic.azureedge.net"),
            ("RN101", "CLIP", "openaipublic.azureedge.net"),
            ("RN50x4", "CLIP", "openaipublic.azureedge.net"),
            ("RN50x16", "CLIP", "openaipublic.azureedge.net"),
            ("RN50x64", "CLIP", "openaipublic.azureedge.net"),
            ("vqgan_gumbel_f8_8192", "VQGAN", "heibox.uni-heidelberg.de"),
            ("sflckr", "VQGAN", "heibox.uni-heidelberg.de"),
            ("coco", "VQGAN", "dl.nmkd.de"),
            ("faceshq", "VQGAN", "app.koofr.net"),
        ] {
            let row = listing
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("{name} missing from:\n{listing}"));
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(&cells[1..], &[kind, host, "no"], "{row}");
        }
    }

    #[test]
    fn openai_torchscript_converts_to_safetensors_that_load_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("rn/RN-tiny.safetensors");
        let input = fixture("clip-rn-tiny/RN-tiny.pt");
        let said = ok(&vqclip(
            tmp.path(),
            &[
                "models".as_ref(),
                "convert".as_ref(),
                input.as_os_str(),
                out.as_os_str(),
            ],
        ));
        assert!(said.contains("OpenAI CLIP"), "{said}");
        std::fs::copy(
            fixture("clip-rn-tiny/tokenizer.json"),
            tmp.path().join("rn/tokenizer.json"),
        )
        .unwrap();
        let clip = Clip::load(&out, &Device::Cpu).unwrap();
        check_resnet_clip(&clip, &reference());
    }

    #[test]
    fn net2net_checkpoint_converts_to_its_first_stage() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("vq/model.safetensors");
        let input = fixture("net2net-tiny/last.ckpt");
        let said = ok(&vqclip(
            tmp.path(),
            &[
                "models".as_ref(),
                "convert".as_ref(),
                input.as_os_str(),
                out.as_os_str(),
            ],
        ));
        assert!(said.contains("outside the first stage"), "{said}");
        let tensors = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert!(tensors
            .keys()
            .all(|k| !k.contains("first_stage_model") && !k.starts_with("transformer.")));
        let yaml = std::fs::read_to_string(tmp.path().join("vq/model.yaml")).unwrap();
        assert!(yaml.contains("taming.models.vqgan.VQModel"), "{yaml}");
        let vq = Vqgan::load(&out, &Device::Cpu).unwrap();
        check_vq_roundtrip(&vq, "net2net", &reference());
    }
}

mod real_size {
    //! The catalogue architectures against the real upstream modules' names and shapes
    //! (`upstream-shapes-more.json.gz`, built on PyTorch's meta device): what OpenAI's
    //! `build_model` reads off their files is what `architectures` builds, and the model asks
    //! for exactly those tensors.

    use super::*;
    use crate::support::shapes::{requested, Shapes};
    use vqclip::models::architectures;
    use vqclip::models::clip_openai;

    fn upstream() -> HashMap<String, Shapes> {
        let file = std::fs::File::open(fixture("upstream-shapes-more.json.gz")).unwrap();
        serde_json::from_reader(flate2::read::GzDecoder::new(file)).unwrap()
    }

    fn assert_same(what: &str, ours: &Shapes, upstream: &Shapes) {
        let mut missing: Vec<&String> =
            upstream.keys().filter(|k| !ours.contains_key(*k)).collect();
        let mut extra: Vec<&String> = ours.keys().filter(|k| !upstream.contains_key(*k)).collect();
        missing.sort();
        extra.sort();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{what}: not requested {missing:?}; not upstream {extra:?}"
        );
        for (name, shape) in upstream {
            assert_eq!(&ours[name], shape, "{what}: shape of {name}");
        }
    }

    #[test]
    fn openai_resnet_architectures_are_what_build_model_reads() {
        let all = upstream();
        for name in ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"] {
            let read = clip_openai::config_from_state_dict(&all[name]).unwrap();
            assert_eq!(read, architectures::clip_config(name).unwrap(), "{name}");
        }
        // The ViT path of the same reader, against the HF config of the same model.
        let vit = clip_openai::config_from_state_dict(&all["ViT-B/32"]).unwrap();
        let hf = architectures::clip_config("ViT-B/32").unwrap();
        assert_eq!(vit.text_config, hf.text_config);
        assert_eq!(vit.vision_config, hf.vision_config);
        assert_eq!(vit.projection_dim, hf.projection_dim);
    }

    /// Every OpenAI tensor but `logit_scale` is requested, under its HF name, with its shape
    /// (RN50 and ViT-B/32: folding BatchNorm materialises the vision weights, so not the
    /// larger ResNets).
    #[test]
    fn openai_files_give_exactly_the_tensors_the_model_requests() {
        let all = upstream();
        for name in ["RN50", "ViT-B/32"] {
            let cfg = clip_openai::config_from_state_dict(&all[name]).unwrap();
            let ours = requested(|vb| {
                Clip::new(vb, &cfg).unwrap();
            });
            assert_same(name, &ours, &clip_openai::hf_shapes(&all[name]));
        }
    }

    #[test]
    fn gumbel_f8_architecture_requests_exactly_the_upstream_tensors() {
        let all = upstream();
        let cfg = architectures::vqgan_config("vqgan_gumbel_f8_8192").unwrap();
        let ours = requested(|vb| {
            Vqgan::new(vb, &cfg).unwrap();
        });
        assert_same("vqgan_gumbel_f8_8192", &ours, &all["vqgan_gumbel_f8_8192"]);
    }
}

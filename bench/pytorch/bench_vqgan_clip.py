#!/usr/bin/env python3
"""PyTorch baseline for `vqclip bench`: the classic VQGAN+CLIP step, timed.

The loop is nerdyrodent's generate.py with its defaults: taming's decoder,
transformers' CLIP, cutn 32 with the "latest" pooled cutouts, kornia's
Af Pe Ji Er augments, Adam at lr 0.1, clamp z to the codebook's range.
Weights are random, with the real shapes, so no download is needed.
Not run by CI. On the GPU machine carry `kornia` and `taming-transformers-rom1504`
wheels (pip download --only-binary=:all: --python-version 3.12 --no-deps ...).

    python bench/pytorch/bench_vqgan_clip.py --size 256 --precision tf32 --json

Prints one JSON object (with --json) with median ms/step, steps/s,
job-steps/s and peak memory, so a run can report vqclip and PyTorch side by side.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VQGAN_CONFIGS = {
    # taming's vqgan_imagenet_f16_16384 (model.yaml)
    "f16_16384": dict(embed_dim=256, n_embed=16384, ddconfig=dict(
        double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
        ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)),
    "f16_1024": dict(embed_dim=256, n_embed=1024, ddconfig=dict(
        double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
        ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)),
}

CLIP_CONFIGS = {
    "ViT-B/32": dict(text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                               num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408),
                     vision=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                 num_hidden_layers=12, image_size=224, patch_size=32),
                     projection_dim=512),
    "ViT-B/16": dict(text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                               num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408),
                     vision=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                 num_hidden_layers=12, image_size=224, patch_size=16),
                     projection_dim=512),
}

AUGMENTS = ["Af", "Pe", "Ji", "Er"]


def build_clip(name_or_dir, device):
    from transformers import CLIPConfig, CLIPModel
    if name_or_dir in CLIP_CONFIGS:
        c = CLIP_CONFIGS[name_or_dir]
        config = CLIPConfig(text_config=c["text"], vision_config=c["vision"],
                            projection_dim=c["projection_dim"])
        model = CLIPModel(config)
    else:  # a local HF directory, e.g. tests/fixtures/clip-tiny
        model = CLIPModel.from_pretrained(name_or_dir)
    return model.eval().requires_grad_(False).to(device)


def build_vqgan(name_or_yaml, device):
    from taming.modules.diffusionmodules.model import Decoder
    if name_or_yaml in VQGAN_CONFIGS:
        c = VQGAN_CONFIGS[name_or_yaml]
    else:  # a taming model.yaml, e.g. tests/fixtures/vqgan-tiny/model.yaml
        import yaml
        p = yaml.safe_load(open(name_or_yaml))["model"]["params"]
        c = dict(embed_dim=p["embed_dim"], n_embed=p["n_embed"], ddconfig=p["ddconfig"])
    dd = c["ddconfig"]
    decoder = Decoder(**dd)
    post_quant_conv = nn.Conv2d(c["embed_dim"], dd["z_channels"], 1)
    codebook = nn.Embedding(c["n_embed"], c["embed_dim"])
    codebook.weight.data.uniform_(-1.0 / c["n_embed"], 1.0 / c["n_embed"])
    mods = nn.ModuleDict(dict(decoder=decoder, post_quant_conv=post_quant_conv, codebook=codebook))
    return mods.eval().requires_grad_(False).to(device), 2 ** (len(dd["ch_mult"]) - 1)


class ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_forward, x_backward):
        ctx.shape = x_backward.shape
        return x_forward

    @staticmethod
    def backward(ctx, grad_in):
        return None, grad_in.sum_to_size(ctx.shape)


class ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (g * (x - x.clamp(ctx.lo, ctx.hi)) >= 0), None, None


def vector_quantize(z_bhwc, codebook):
    d = (z_bhwc.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(1)
         - 2 * z_bhwc @ codebook.T)
    q = F.one_hot(d.argmin(-1), codebook.shape[0]).to(d.dtype) @ codebook
    return ReplaceGrad.apply(q, z_bhwc)


def make_augs(cut_size, codes):
    import kornia.augmentation as K
    table = {
        "Ji": lambda: K.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, p=0.7),
        "Sh": lambda: K.RandomSharpness(sharpness=0.3, p=0.5),
        "Gn": lambda: K.RandomGaussianNoise(mean=0.0, std=1.0, p=0.5),
        "Pe": lambda: K.RandomPerspective(distortion_scale=0.7, p=0.7),
        "Ro": lambda: K.RandomRotation(degrees=15, p=0.7),
        "Af": lambda: K.RandomAffine(degrees=15, translate=0.1, shear=5, p=0.7,
                                     padding_mode="zeros", keepdim=True),
        "Et": lambda: K.RandomElasticTransform(p=0.7),
        "Ts": lambda: K.RandomThinPlateSpline(scale=0.8, same_on_batch=True, p=0.7),
        "Cr": lambda: K.RandomCrop(size=(cut_size, cut_size), pad_if_needed=True,
                                   padding_mode="reflect", p=0.5),
        "Er": lambda: K.RandomErasing(scale=(0.1, 0.4), ratio=(0.3, 1 / 0.3),
                                      same_on_batch=True, p=0.7),
        "Re": lambda: K.RandomResizedCrop(size=(cut_size, cut_size), scale=(0.1, 1),
                                          ratio=(0.75, 1.333), cropping_mode="resample", p=0.5),
    }
    return nn.Sequential(*[table[c]() for c in codes])


class LatestCutouts(nn.Module):
    """generate.py's "latest" cutouts: pooled whole-image views, augmented, plus noise."""

    def __init__(self, cut_size, cutn, augments):
        super().__init__()
        self.cutn = cutn
        self.augs = make_augs(cut_size, augments)
        self.av = nn.AdaptiveAvgPool2d((cut_size, cut_size))
        self.mx = nn.AdaptiveMaxPool2d((cut_size, cut_size))

    def forward(self, x):
        b = x.shape[0]
        pooled = (self.av(x) + self.mx(x)) / 2
        batch = self.augs(pooled.repeat_interleave(self.cutn, 0))
        facs = batch.new_empty([b * self.cutn, 1, 1, 1]).uniform_(0, 0.1)
        return batch + facs * torch.randn_like(batch)


def features(out):
    """transformers >= 5 returns an output object whose pooler_output is projected."""
    return out if torch.is_tensor(out) else out.pooler_output


def peak_rss():
    """The process's peak resident set in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cutn", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="jobs batched into one step")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16", "clip-fp16"], default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--augments", default=",".join(AUGMENTS))
    ap.add_argument("--clip", default="ViT-B/32", help="catalogue shape or HF directory")
    ap.add_argument("--vqgan", default="f16_16384", help="catalogue shape or taming model.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if a.precision == "tf32" and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clip = build_clip(a.clip, dev)
    if a.precision == "clip-fp16":
        clip = clip.half()
    vq, f = build_vqgan(a.vqgan, dev)
    cut_size = clip.config.vision_config.image_size
    cutouts = LatestCutouts(cut_size, a.cutn, [c for c in a.augments.split(",") if c]).to(dev)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)

    with torch.no_grad():
        ids = torch.randint(0, 49406, (1, 77), device=dev)
        ids[0, 0], ids[0, 10] = 49406, 49407
        target = F.normalize(features(clip.get_text_features(input_ids=ids)).float(), dim=-1)
    toks = a.size // f
    cb = vq["codebook"].weight
    z = cb[torch.randint(0, cb.shape[0], (a.batch * toks * toks,), device=dev)]
    z = z.view(a.batch, toks, toks, -1).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    z_min = cb.min(0).values.view(1, -1, 1, 1)
    z_max = cb.max(0).values.view(1, -1, 1, 1)
    opt = torch.optim.Adam([z], lr=0.1)

    def loss_fn(z):
        zq = vector_quantize(z.movedim(1, 3), cb).movedim(3, 1)
        img = vq["decoder"](vq["post_quant_conv"](zq))
        img = ClampWithGrad.apply(img.add(1).div(2), 0.0, 1.0)
        px = (cutouts(img) - mean) / std
        if a.precision == "clip-fp16":
            px = px.half()
        emb = F.normalize(features(clip.get_image_features(pixel_values=px)).float(), dim=-1)
        dists = (emb - target).norm(dim=-1).div(2).arcsin().pow(2).mul(2)
        return dists.view(a.batch, a.cutn).mean(1).sum()

    if a.compile:
        loss_fn = torch.compile(loss_fn)

    def step():
        opt.zero_grad(set_to_none=True)
        if a.precision == "bf16":
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = loss_fn(z)
        else:
            loss = loss_fn(z)
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.copy_(z.maximum(z_min).minimum(z_max))
        return loss

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    med = statistics.median(times)
    res = dict(impl="pytorch", torch=torch.__version__, device=str(dev),
               card=torch.cuda.get_device_name(dev) if cuda else "cpu",
               size=a.size, cutn=a.cutn, batch=a.batch, precision=a.precision,
               compile=a.compile, augments=a.augments, clip=a.clip, vqgan=a.vqgan,
               steps=a.steps, warmup=a.warmup, median_ms_per_step=med,
               steps_per_s=1000 / med, job_steps_per_s=1000 * a.batch / med,
               peak_memory_bytes=torch.cuda.max_memory_allocated(dev) if cuda else peak_rss(),
               peak_memory_kind="device" if cuda else "rss")
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    sys.exit(main())

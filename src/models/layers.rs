//! The layer seam: every tensor op the model graphs use goes through a type or function here.
//!
//! CLIP and the VQGAN are written only in terms of [`Conv2d`], [`GroupNorm`] (with its fused
//! `+ SiLU` variant), [`upsample_nearest2x`], [`Linear`], [`LayerNorm`], [`Activation`],
//! [`softmax_last_dim`] and [`attention`]. A faster backend (CUDA kernels, say) replaces the
//! body of one of these, dispatching on `x.device()`, and no model file changes.
//!
//! The plain bodies here are the reference: candle ops whose autograd is known to work. That
//! is why LayerNorm and softmax are built from primitives: `candle_nn::ops::layer_norm` and
//! `candle_nn::ops::softmax_last_dim` have no backward and silently drop the gradient. Tests
//! below check every gradient the render loop relies on against finite differences.
//!
//! Conv2d (stride 1, or stride equal to the kernel), Linear, GroupNorm (+ SiLU), LayerNorm,
//! QuickGELU and the nearest upsample also have an input-gradient-only path ([`super::ops`])
//! for frozen weights: the render loop differentiates only to the latent, and candle's
//! autograd spends most of the backward on weight gradients nobody reads and on a slow
//! `conv_transpose2d`. [`layer_ops`] decides, in this one place, which path runs (default
//! input-grad-only; `VQCLIP_LAYER_OPS=autograd` or [`with_layer_ops`] selects the reference).
//! A layer whose weights carry a gradient (a `Var`) always takes the autograd path, so weight
//! gradients are never dropped silently.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::cpu::{self, GroupNormKernel, LayerNormKernel};

use super::ops::{
    attach_input_grad, conv2d_input_grad, group_norm_input_grad, layer_norm_input_grad,
    linear_input_grad, patchify_conv2d_input_grad, quick_gelu_input_grad, upcast,
    upsample_nearest2x_input_grad, FlippedKernel, GroupNormParams, QUICK_GELU_SLOPE,
};
pub use super::ops::{
    input_grad_layers_attached, layer_ops, with_layer_ops, LayerOps, LAYER_OPS_ENV,
};

/// Whether `x`'s layer should take the input-gradient-only path: only when something upstream
/// of `x` wants a gradient and none of the layer's `weights` does.
fn input_grad_only(x: &Tensor, weights: &[&Tensor]) -> bool {
    layer_ops() == LayerOps::InputGradOnly && x.track_op() && weights.iter().all(|w| !w.track_op())
}

/// Whether `x`'s layer runs on the CPU kernels of [`super::cpu`]: f32 on the CPU, frozen
/// contiguous weights, and the input-grad-only seam (the autograd reference keeps candle's
/// ops throughout, so tests can compare the two).
fn cpu_kernels(x: &Tensor, weights: &[&Tensor]) -> bool {
    layer_ops() == LayerOps::InputGradOnly
        && cpu::is_cpu_f32(x)
        && weights
            .iter()
            .all(|w| cpu::is_cpu_f32(w) && !w.track_op() && w.is_contiguous())
}

/// 2-D convolution (PyTorch `nn.Conv2d` weights: `weight` (out, in, k, k), optional `bias`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    flipped: FlippedKernel,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
            flipped: FlippedKernel::default(),
        }
    }

    /// Loads `weight` and `bias` from `vb` for a square `kernel`.
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self::new(weight, Some(bias), stride, padding))
    }

    /// Like [`Conv2d::load`] for convolutions that have no bias (CLIP's patch embedding).
    pub fn load_no_bias(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        Ok(Self::new(weight, None, stride, 0))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Conv2d {
    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Conv2d {
    /// The stride-1 conv on the CPU kernel, forward and input gradient, with no copy of the
    /// weights: the kernel reads them in place.
    fn forward_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias, padding) = (self.weight.clone(), self.bias.clone(), self.padding);
        let (grad_weight, flipped) = (self.weight.clone(), self.flipped.clone());
        cpu::cpu_layer(
            "cpu-conv2d",
            x,
            move |xs, dims| {
                cpu::with_f32(&weight, |w| match &bias {
                    Some(b) => cpu::with_f32(b, |b| {
                        cpu::conv2d_stride1(xs, dims, w, weight.dims(), Some(b), padding)
                    }),
                    None => cpu::conv2d_stride1(xs, dims, w, weight.dims(), None, padding),
                })
            },
            move |_x, grad_y| conv2d_input_grad(grad_y, &grad_weight, &flipped, padding),
        )
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut weights = vec![&self.weight];
        weights.extend(&self.bias);
        let kernel = self.weight.dim(2)?;
        let flippable = self.stride == 1 && self.padding < kernel;
        let patchify = self.stride == kernel && self.padding == 0;
        if flippable && cpu_kernels(x, &weights) {
            return self.forward_cpu(x);
        }
        // Other strides (the encoder's downsampling, off the render loop) keep candle's backward.
        if !((flippable || patchify) && input_grad_only(x, &weights)) {
            return self.forward_plain(x);
        }
        let y = self.forward_plain(&x.detach())?;
        let weight = self.weight.clone();
        if flippable {
            let (flipped, padding) = (self.flipped.clone(), self.padding);
            attach_input_grad("conv2d-input-grad", x, y, move |_x, grad_y| {
                conv2d_input_grad(grad_y, &weight, &flipped, padding)
            })
        } else {
            attach_input_grad("patchify-conv2d-input-grad", x, y, move |x, grad_y| {
                patchify_conv2d_input_grad(grad_y, &weight, x.dims())
            })
        }
    }
}

/// `torch.nn.GroupNorm` with affine parameters, over (B, C, H, W).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Self::new(weight, bias, num_groups, eps)
    }

    /// A GroupNorm from its affine parameters (`weight`, `bias`: one per channel).
    pub fn new(weight: Tensor, bias: Tensor, num_groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm: {channels} channels do not split into {num_groups} groups"
            )
        }
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// GroupNorm followed by SiLU (`x * sigmoid(x)`): the pair every taming ResNet block and
    /// output head uses, and so the unit a fused GPU kernel replaces.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    fn forward_with(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let plain = |x: &Tensor| {
            let y = self.forward_plain(x)?;
            if silu {
                y.silu()
            } else {
                Ok(y)
            }
        };
        if cpu_kernels(x, &[&self.weight, &self.bias]) {
            return self.forward_cpu(x, silu);
        }
        if !input_grad_only(x, &[&self.weight, &self.bias]) {
            return plain(x);
        }
        let y = plain(&x.detach())?;
        let params = GroupNormParams {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            num_groups: self.num_groups,
            eps: self.eps,
        };
        let name = if silu {
            "group-norm-silu-input-grad"
        } else {
            "group-norm-input-grad"
        };
        attach_input_grad(name, x, y, move |x, grad_y| {
            group_norm_input_grad(x, grad_y, &params, silu)
        })
    }

    fn forward_cpu(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let kernel = Arc::new(GroupNormKernel {
            gamma: cpu::to_f32_vec(&self.weight)?,
            beta: cpu::to_f32_vec(&self.bias)?,
            groups: self.num_groups,
            eps: self.eps,
            silu,
        });
        let grad_kernel = kernel.clone();
        cpu::cpu_layer(
            "cpu-group-norm",
            x,
            move |xs, dims| kernel.forward(xs, dims),
            move |x, grad_y| {
                let k = grad_kernel.clone();
                cpu::cpu_binary(
                    "cpu-group-norm-input-grad",
                    x,
                    grad_y,
                    move |xs, d, g, _| k.input_grad(xs, d, g),
                )
            },
        )
    }

    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dtype = x.dtype();
        let grouped = upcast(x)?.reshape((b, self.num_groups, (c / self.num_groups) * h * w))?;
        let mean = grouped.mean_keepdim(2)?;
        let centred = grouped.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let normed = normed.reshape((b, c, h, w))?.to_dtype(dtype)?;
        normed
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }
}

/// Nearest-neighbour upsampling by exactly 2 in both spatial dims (`F.interpolate(scale_factor=2)`).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_b, _c, h, w) = x.dims4()?;
    if cpu_kernels(x, &[]) {
        return cpu::cpu_layer(
            "cpu-upsample-nearest2x",
            x,
            cpu::upsample_nearest2x,
            |_x, grad_y| {
                cpu::cpu_unary(
                    "cpu-upsample-nearest2x-input-grad",
                    grad_y,
                    cpu::upsample_nearest2x_grad,
                )
            },
        );
    }
    if !input_grad_only(x, &[]) {
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    let y = x.detach().upsample_nearest2d(2 * h, 2 * w)?;
    attach_input_grad("upsample-nearest2x-input-grad", x, y, |_x, grad_y| {
        upsample_nearest2x_input_grad(grad_y)
    })
}

/// `torch.nn.Linear`: `weight` (out, in), optional `bias`, applied to the last dim.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: Some(vb.get(out_dim, "bias")?),
        })
    }

    pub fn load_no_bias(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: None,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut weights = vec![&self.weight];
        weights.extend(&self.bias);
        if cpu_kernels(x, &weights) {
            let (weight, bias) = (self.weight.clone(), self.bias.clone());
            let grad_weight = self.weight.clone();
            return cpu::cpu_layer(
                "cpu-linear",
                x,
                move |xs, dims| {
                    cpu::with_f32(&weight, |w| match &bias {
                        Some(b) => {
                            cpu::with_f32(b, |b| cpu::linear(xs, dims, w, weight.dims(), Some(b)))
                        }
                        None => cpu::linear(xs, dims, w, weight.dims(), None),
                    })
                },
                move |_x, grad_y| {
                    let weight = grad_weight.clone();
                    cpu::cpu_unary("cpu-linear-input-grad", grad_y, move |g, dims| {
                        cpu::with_f32(&weight, |w| {
                            cpu::linear_input_grad(g, dims, w, weight.dims())
                        })
                    })
                },
            );
        }
        if !input_grad_only(x, &weights) {
            return self.forward_plain(x);
        }
        let y = self.forward_plain(&x.detach())?;
        let weight = self.weight.clone();
        attach_input_grad("linear-input-grad", x, y, move |x, grad_y| {
            linear_input_grad(grad_y, &weight, x.dims())
        })
    }
}

impl Linear {
    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}

/// `torch.nn.LayerNorm` over the last dim, from primitive ops so that it passes gradients.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if cpu_kernels(x, &[&self.weight, &self.bias]) {
            let kernel = Arc::new(LayerNormKernel {
                gamma: cpu::to_f32_vec(&self.weight)?,
                beta: cpu::to_f32_vec(&self.bias)?,
                eps: self.eps,
            });
            let grad_kernel = kernel.clone();
            return cpu::cpu_layer(
                "cpu-layer-norm",
                x,
                move |xs, dims| kernel.forward(xs, dims),
                move |x, grad_y| {
                    let k = grad_kernel.clone();
                    cpu::cpu_binary(
                        "cpu-layer-norm-input-grad",
                        x,
                        grad_y,
                        move |xs, d, g, _| k.input_grad(xs, d, g),
                    )
                },
            );
        }
        if !input_grad_only(x, &[&self.weight, &self.bias]) {
            return self.forward_plain(x);
        }
        let y = self.forward_plain(&x.detach())?;
        let (weight, eps) = (self.weight.clone(), self.eps);
        attach_input_grad("layer-norm-input-grad", x, y, move |x, grad_y| {
            layer_norm_input_grad(x, grad_y, &weight, eps)
        })
    }
}

impl LayerNorm {
    fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = upcast(x)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Softmax over the last dim from primitive ops (`candle_nn::ops::softmax_last_dim` has no
/// backward). The max is detached: softmax is shift-invariant, so it carries no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)?.to_dtype(dtype)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// The activations Hugging Face CLIP configs name in `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: what the OpenAI checkpoints were trained with.
    QuickGelu,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu if cpu_kernels(x, &[]) => {
                let k = QUICK_GELU_SLOPE as f32;
                cpu::cpu_layer(
                    "cpu-quick-gelu",
                    x,
                    move |xs, dims| cpu::quick_gelu(xs, dims, k),
                    move |x, grad_y| {
                        cpu::cpu_binary(
                            "cpu-quick-gelu-input-grad",
                            x,
                            grad_y,
                            move |xs, d, g, _| cpu::quick_gelu_grad(xs, d, g, k),
                        )
                    },
                )
            }
            Self::QuickGelu if input_grad_only(x, &[]) => {
                let plain = x
                    .detach()
                    .mul(&sigmoid(&(x.detach() * QUICK_GELU_SLOPE)?)?)?;
                attach_input_grad("quick-gelu-input-grad", x, plain, quick_gelu_input_grad)
            }
            Self::QuickGelu => x.mul(&sigmoid(&(x * QUICK_GELU_SLOPE)?)?),
            Self::Gelu => x.gelu_erf(),
            Self::GeluNew => x.gelu(),
        }
    }
}

/// A transformer MLP, `fc2(act(fc1(x)))`. On the CPU kernels with QuickGELU it is one graph
/// node that keeps only `fc1`'s output for its backward: the separate layers kept the
/// activation's output too (as `fc2`'s input), another (rows x intermediate) tensor per
/// block, ~20 MB a layer for ViT-B/32 at 32 cutouts.
pub fn mlp(x: &Tensor, fc1: &Linear, act: Activation, fc2: &Linear) -> Result<Tensor> {
    let (Some(b1), Some(b2)) = (&fc1.bias, &fc2.bias) else {
        return fc2.forward(&act.forward(&fc1.forward(x)?)?);
    };
    let weights = [&fc1.weight, b1, &fc2.weight, b2];
    if act != Activation::QuickGelu || !cpu_kernels(x, &weights) {
        return fc2.forward(&act.forward(&fc1.forward(x)?)?);
    }
    let k = QUICK_GELU_SLOPE as f32;
    let (w1, b1, w2, b2) = (
        fc1.weight.clone(),
        b1.clone(),
        fc2.weight.clone(),
        b2.clone(),
    );
    let hidden = move |xs: &[f32], dims: &[usize]| -> Result<(Vec<f32>, Vec<usize>)> {
        let (h, shape) = cpu::with_f32(&w1, |w| {
            cpu::with_f32(&b1, |b| cpu::linear(xs, dims, w, w1.dims(), Some(b)))
        })?;
        Ok((h, shape.dims().to_vec()))
    };
    // fc1's output from the forward, taken by the backward (recomputed if it runs twice).
    type Kept = Arc<std::sync::Mutex<Option<(Vec<f32>, Vec<usize>)>>>;
    let kept: Kept = Default::default();
    let (kept_fwd, hidden_fwd, w2_fwd) = (kept.clone(), hidden.clone(), w2.clone());
    let w1_grad = fc1.weight.clone();
    cpu::cpu_layer(
        "cpu-mlp",
        x,
        move |xs, dims| {
            let (h, h_dims) = hidden_fwd(xs, dims)?;
            let (a, a_shape) = cpu::quick_gelu(&h, &h_dims, k)?;
            let y = cpu::with_f32(&b2, |b| {
                cpu::with_f32(&w2_fwd, |w| {
                    cpu::linear(&a, a_shape.dims(), w, w2_fwd.dims(), Some(b))
                })
            })?;
            if let Ok(mut slot) = kept_fwd.lock() {
                *slot = Some((h, h_dims));
            }
            Ok(y)
        },
        move |x, grad_y| {
            let stored = kept.lock().ok().and_then(|mut slot| slot.take());
            let (h, h_dims) = match stored {
                Some(h) => h,
                None => {
                    let x = x.contiguous()?;
                    cpu::with_f32(&x, |xs| hidden(xs, x.dims()))?
                }
            };
            let (w1, w2) = (w1_grad.clone(), w2.clone());
            cpu::cpu_unary("cpu-mlp-input-grad", grad_y, move |g, dims| {
                let (ga, _) =
                    cpu::with_f32(&w2, |w| cpu::linear_input_grad(g, dims, w, w2.dims()))?;
                let (gh, _) = cpu::quick_gelu_grad(&h, &h_dims, &ga, k)?;
                cpu::with_f32(&w1, |w| cpu::linear_input_grad(&gh, &h_dims, w, w1.dims()))
            })
        },
    )
}

/// Scaled dot-product attention over (batch, tokens, dim) tensors:
/// `softmax(q k^T * scale + mask) v`. `mask` is additive and broadcasts to (batch, tq, tk).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if mask.is_none() && cpu_kernels(q, &[]) && cpu::is_cpu_f32(k) && cpu::is_cpu_f32(v) {
        return cpu::attention(q, k, v, 1, scale);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.matmul(v)
}

/// [`attention`] per head of (batch, t, heads · d) inputs (head `h` in columns
/// `h·d..(h+1)·d`, as the q, k and v projections produce them), output in the same layout.
/// The CPU kernel reads the heads in place; elsewhere the heads are split into the batch.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if mask.is_none() && cpu_kernels(q, &[]) && cpu::is_cpu_f32(k) && cpu::is_cpu_f32(v) {
        return cpu::attention(q, k, v, heads, scale);
    }
    let split = |y: &Tensor| -> Result<Tensor> {
        let (b, t, width) = y.dims3()?;
        y.reshape((b, t, heads, width / heads))?
            .transpose(1, 2)?
            .reshape((b * heads, t, width / heads))
    };
    let out = attention(&split(q)?, &split(k)?, &split(v)?, scale, mask)?;
    let (bh, t, dv) = out.dims3()?;
    out.reshape((bh / heads, heads, t, dv))?
        .transpose(1, 2)?
        .reshape((bh / heads, t, heads * dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Central differences of `f` at `x` along `dir`, against autograd's directional derivative.
    fn check_directional_gradient(
        x: &Var,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
        dir: &Tensor,
    ) -> Result<(f64, f64)> {
        let loss = f(x.as_tensor())?;
        let grads = loss.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("no gradient reached the input");
        let analytic = (g * dir)?.sum_all()?.to_scalar::<f64>()?;
        let h = 1e-5;
        let plus = f(&(x.as_tensor() + (dir * h)?)?)?.to_scalar::<f64>()?;
        let minus = f(&(x.as_tensor() - (dir * h)?)?)?.to_scalar::<f64>()?;
        Ok((analytic, (plus - minus) / (2.0 * h)))
    }

    fn assert_close(analytic: f64, numeric: f64, what: &str) {
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-3);
        assert!(
            err < 1e-5,
            "{what}: autograd {analytic} vs finite differences {numeric} (rel err {err})"
        );
    }

    #[test]
    fn layer_norm_passes_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.0, 1.0, (2, 3, 6), &dev)?.to_dtype(DType::F64)?)?;
        let ln = LayerNorm::new(
            Tensor::randn(1.0, 0.3, 6, &dev)?.to_dtype(DType::F64)?,
            Tensor::randn(0.0, 0.3, 6, &dev)?.to_dtype(DType::F64)?,
            1e-5,
        );
        let readout = Tensor::rand(-1.0, 1.0, (2, 3, 6), &dev)?.to_dtype(DType::F64)?;
        let f = |t: &Tensor| (ln.forward(t)? * &readout)?.sum_all();
        for _ in 0..3 {
            let dir = Tensor::randn(0.0, 1.0, (2, 3, 6), &dev)?.to_dtype(DType::F64)?;
            let (a, n) = check_directional_gradient(&x, &f, &dir)?;
            assert_close(a, n, "LayerNorm");
        }
        Ok(())
    }

    #[test]
    fn softmax_passes_gradient_and_sums_to_one() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0.0, 3.0, (4, 7), &dev)?.to_dtype(DType::F64)?))?;
        let s = softmax_last_dim(x.as_tensor())?;
        let sums = s.sum(D::Minus1)?.to_vec1::<f64>()?;
        assert!(sums.iter().all(|v| (v - 1.0).abs() < 1e-12), "{sums:?}");
        let readout = Tensor::rand(-1.0, 1.0, (4, 7), &dev)?.to_dtype(DType::F64)?;
        let f = |t: &Tensor| (softmax_last_dim(t)? * &readout)?.sum_all();
        for _ in 0..3 {
            let dir = Tensor::randn(0.0, 1.0, (4, 7), &dev)?.to_dtype(DType::F64)?;
            let (a, n) = check_directional_gradient(&x, &f, &dir)?;
            assert_close(a, n, "softmax");
        }
        Ok(())
    }

    #[test]
    fn group_norm_silu_upsample_and_activations_pass_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let c = 4;
        let gn = GroupNorm::new(
            Tensor::randn(1.0, 0.3, c, &dev)?.to_dtype(DType::F64)?,
            Tensor::randn(0.0, 0.3, c, &dev)?.to_dtype(DType::F64)?,
            2,
            1e-6,
        )?;
        let x =
            Var::from_tensor(&Tensor::randn(0.0, 1.0, (2, c, 3, 3), &dev)?.to_dtype(DType::F64)?)?;
        let readout = Tensor::rand(-1.0, 1.0, (2, c, 6, 6), &dev)?.to_dtype(DType::F64)?;
        let f = |t: &Tensor| {
            let y = upsample_nearest2x(&gn.forward_silu(t)?)?;
            let y = Activation::QuickGelu.forward(&y)?;
            let y = Activation::Gelu.forward(&y)?;
            (y * &readout)?.sum_all()
        };
        for _ in 0..3 {
            let dir = Tensor::randn(0.0, 1.0, (2, c, 3, 3), &dev)?.to_dtype(DType::F64)?;
            let (a, n) = check_directional_gradient(&x, &f, &dir)?;
            // candle's gelu_erf backward uses 1/sqrt(2 pi) rounded to 6 digits.
            let err = (a - n).abs() / n.abs().max(1e-3);
            assert!(err < 1e-4, "GroupNorm+SiLU chain: {a} vs {n}");
        }
        Ok(())
    }

    #[test]
    fn group_norm_matches_definition() -> Result<()> {
        // Two groups of two channels: each group's 2*2*2 values must come out with zero mean
        // and unit variance before the affine.
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 16.0, &dev)?
            .reshape((1, 4, 2, 2))?
            .sqr()?;
        let gn = GroupNorm::new(
            Tensor::ones(4, DType::F32, &dev)?,
            Tensor::zeros(4, DType::F32, &dev)?,
            2,
            0.0,
        )?;
        let y = gn.forward(&x)?.reshape((2, 8))?;
        let mean = y.mean(1)?.to_vec1::<f32>()?;
        let var = y.sqr()?.mean(1)?.to_vec1::<f32>()?;
        for g in 0..2 {
            assert!(
                mean[g].abs() < 1e-5 && (var[g] - 1.0).abs() < 1e-4,
                "{mean:?} {var:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn attention_is_a_convex_mix_of_values() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 3, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 5, 4), &dev)?;
        // Identical value rows: any convex combination returns that row.
        let v = Tensor::ones((1, 5, 2), DType::F32, &dev)?;
        let out = attention(&q, &k, &v, 0.5, None)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(out.iter().all(|o| (o - 1.0).abs() < 1e-6));
        Ok(())
    }
}

//! The optimisers generate.py offers, with torch's update rules and default
//! hyper-parameters, over one parameter tensor (z).
//!
//! State is plain tensors plus a step count so a checkpoint can store it exactly.

use candle_core::{Tensor, Var};

use super::spec::OptimizerKind;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;
/// torch.optim.AdamW's default weight decay.
const ADAMW_DECAY: f64 = 1e-2;
const ADAGRAD_EPS: f64 = 1e-10;
const RMSPROP_ALPHA: f64 = 0.99;
/// generate.py builds DiffGrad with `eps=1e-9, weight_decay=1e-9` ("playing for reasons").
const DIFFGRAD_EPS: f64 = 1e-9;
const DIFFGRAD_DECAY: f64 = 1e-9;
/// torch_optimizer.AdamP's defaults (generate.py passes only the learning rate).
const ADAMP_DELTA: f64 = 0.1;
const ADAMP_EPS: f64 = 1e-8;

/// An optimiser's state: the step count and its moment buffers, in a fixed order
/// (first moment, then second; Adagrad and RMSprop keep one buffer; DiffGrad adds the
/// previous gradient as a third).
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub step: u64,
    pub buffers: Vec<Tensor>,
}

/// One of generate.py's optimisers bound to a learning rate.
#[derive(Debug, Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    lr: f64,
    state: OptimizerState,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, lr: f64, param: &Tensor) -> candle_core::Result<Self> {
        let n_buffers = match kind {
            OptimizerKind::Adagrad | OptimizerKind::Rmsprop => 1,
            OptimizerKind::Diffgrad => 3,
            _ => 2,
        };
        let buffers = (0..n_buffers)
            .map(|_| param.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            kind,
            lr,
            state: OptimizerState { step: 0, buffers },
        })
    }

    /// Restores an optimiser from a checkpoint's state.
    pub fn from_state(kind: OptimizerKind, lr: f64, state: OptimizerState) -> Self {
        Self { kind, lr, state }
    }

    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// A steered learning rate: the moments stay, only the step size changes.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Applies one update to `param` given its gradient.
    pub fn step(&mut self, param: &Var, grad: &Tensor) -> candle_core::Result<()> {
        self.state.step += 1;
        let t = self.state.step as i32;
        let lr = self.lr;
        let p = param.as_tensor();
        let new = match self.kind {
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let p = if self.kind == OptimizerKind::Adamw {
                    (p * (1.0 - lr * ADAMW_DECAY))?
                } else {
                    p.clone()
                };
                let (m, v) = self.update_moments(grad)?;
                let bc1 = 1.0 - BETA1.powi(t);
                let bc2 = 1.0 - BETA2.powi(t);
                let denom = ((v.sqrt()? / bc2.sqrt())? + ADAM_EPS)?;
                (p - (m / denom)?.affine(lr / bc1, 0.0)?)?
            }
            OptimizerKind::Adagrad => {
                let sum = (&self.state.buffers[0] + grad.sqr()?)?;
                let update = (grad / (sum.sqrt()? + ADAGRAD_EPS)?)?;
                self.state.buffers[0] = sum;
                (p - update.affine(lr, 0.0)?)?
            }
            OptimizerKind::Adamax => {
                let m = ((&self.state.buffers[0] * BETA1)? + (grad * (1.0 - BETA1))?)?;
                let u = (&self.state.buffers[1] * BETA2)?.maximum(&(grad.abs()? + ADAM_EPS)?)?;
                let update = (&m / &u)?.affine(lr / (1.0 - BETA1.powi(t)), 0.0)?;
                self.state.buffers = vec![m, u];
                (p - update)?
            }
            OptimizerKind::Rmsprop => {
                let v = ((&self.state.buffers[0] * RMSPROP_ALPHA)?
                    + (grad.sqr()? * (1.0 - RMSPROP_ALPHA))?)?;
                let update = (grad / (v.sqrt()? + ADAM_EPS)?)?;
                self.state.buffers[0] = v;
                (p - update.affine(lr, 0.0)?)?
            }
            OptimizerKind::Radam => {
                let (m, v) = self.update_moments(grad)?;
                let bc1 = 1.0 - BETA1.powi(t);
                let bc2 = 1.0 - BETA2.powi(t);
                let m_hat = (m / bc1)?;
                let rho_inf = 2.0 / (1.0 - BETA2) - 1.0;
                let rho_t = rho_inf - 2.0 * f64::from(t) * BETA2.powi(t) / bc2;
                if rho_t > 5.0 {
                    let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                        / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                        .sqrt();
                    let adaptive = (v.sqrt()? + ADAM_EPS)?.recip()?.affine(bc2.sqrt(), 0.0)?;
                    (p - (m_hat * adaptive)?.affine(lr * rect, 0.0)?)?
                } else {
                    (p - m_hat.affine(lr, 0.0)?)?
                }
            }
            OptimizerKind::Diffgrad => {
                // torch_optimizer.DiffGrad: Adam whose step is damped where the gradient
                // barely changed since the last step; the decay is added to the gradient.
                let grad = (grad + (p * DIFFGRAD_DECAY)?)?;
                let previous = self.state.buffers[2].clone();
                let (m, v) = self.update_moments(&grad)?;
                let bc1 = 1.0 - BETA1.powi(t);
                let bc2 = 1.0 - BETA2.powi(t);
                let denom = (v.sqrt()? + DIFFGRAD_EPS)?;
                let diff = (&previous - &grad)?.abs()?;
                // 1 / (1 + exp(-|Δg|)), the friction coefficient.
                let dfc = ((diff.neg()?.exp()? + 1.0)?).recip()?;
                self.state.buffers.push(grad);
                let step_size = lr * bc2.sqrt() / bc1;
                (p - ((m * dfc)? / denom)?.affine(step_size, 0.0)?)?
            }
            OptimizerKind::Adamp => {
                let (m, v) = self.update_moments(grad)?;
                let bc1 = 1.0 - BETA1.powi(t);
                let bc2 = 1.0 - BETA2.powi(t);
                let denom = ((v.sqrt()? / bc2.sqrt())? + ADAMP_EPS)?;
                let perturb = (m / denom)?;
                // With no weight decay (generate.py's AdamP), the projection's wd_ratio
                // has nothing to scale, so only the perturbation changes.
                let perturb = if p.rank() > 1 {
                    adamp_projection(p, grad, &perturb)?
                } else {
                    perturb
                };
                (p - perturb.affine(lr / bc1, 0.0)?)?
            }
        };
        param.set(&new)
    }

    /// Adam's moment updates; returns the new (m, v) and stores them.
    fn update_moments(&mut self, grad: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let m = ((&self.state.buffers[0] * BETA1)? + (grad * (1.0 - BETA1))?)?;
        let v = ((&self.state.buffers[1] * BETA2)? + (grad.sqr()? * (1.0 - BETA2))?)?;
        self.state.buffers = vec![m.clone(), v.clone()];
        Ok((m, v))
    }
}

/// AdamP's projection: where the gradient is nearly orthogonal to the weights (by
/// channel, then over the whole tensor), remove the radial part of the update, so
/// that it changes the direction of the weights rather than their norm.
fn adamp_projection(p: &Tensor, grad: &Tensor, perturb: &Tensor) -> candle_core::Result<Tensor> {
    let dims = p.dims().to_vec();
    let mut expand = vec![1usize; dims.len()];
    for rows in [dims[0], 1] {
        expand[0] = rows;
        let view = |x: &Tensor| x.reshape((rows, ()));
        let (pv, gv) = (view(p)?, view(grad)?);
        let p_norm = pv.sqr()?.sum(1)?.sqrt()?;
        let g_norm = gv.sqr()?.sum(1)?.sqrt()?;
        let dot = (&gv * &pv)?.sum(1)?;
        let cosine = ((dot.abs()? / (g_norm + ADAMP_EPS)?)? / (&p_norm + ADAMP_EPS)?)?;
        let max: f64 = cosine
            .max(0)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar()?;
        let width = pv.dim(1)? as f64;
        if max < ADAMP_DELTA / width.sqrt() {
            let p_n = p.broadcast_div(&(p_norm + ADAMP_EPS)?.reshape(expand.as_slice())?)?;
            let radial = view(&(&p_n * perturb)?)?
                .sum(1)?
                .reshape(expand.as_slice())?;
            return perturb - p_n.broadcast_mul(&radial)?;
        }
    }
    Ok(perturb.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Eight steps (RAdam rectifies from step 6) on p0 = [0.5, -1.0, 2.0] with gradients g_t = [1, -2, 0.5]·t + p,
    /// lr 0.1; expected values from torch 2.x's optimisers with default arguments.
    fn run(kind: OptimizerKind) -> Vec<f64> {
        let p =
            Var::from_tensor(&Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Optimizer::new(kind, 0.1, p.as_tensor()).unwrap();
        let base = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
        for t in 1..=8 {
            let g = ((&base * t as f64).unwrap() + p.as_tensor()).unwrap();
            opt.step(&p, &g).unwrap();
        }
        p.as_tensor().to_vec1().unwrap()
    }

    fn assert_close(got: &[f64], expected: &[f64]) {
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "got {got:?}, expected {expected:?}");
        }
    }

    #[test]
    fn adam_matches_torch() {
        assert_close(&run(OptimizerKind::Adam), &TORCH[0]);
    }
    #[test]
    fn adamw_matches_torch() {
        assert_close(&run(OptimizerKind::Adamw), &TORCH[1]);
    }
    #[test]
    fn adagrad_matches_torch() {
        assert_close(&run(OptimizerKind::Adagrad), &TORCH[2]);
    }
    #[test]
    fn adamax_matches_torch() {
        assert_close(&run(OptimizerKind::Adamax), &TORCH[3]);
    }
    #[test]
    fn rmsprop_matches_torch() {
        assert_close(&run(OptimizerKind::Rmsprop), &TORCH[4]);
    }
    #[test]
    fn radam_matches_torch() {
        assert_close(&run(OptimizerKind::Radam), &TORCH[5]);
    }

    /// DiffGrad with generate.py's eps and weight decay; expected values from
    /// torch_optimizer 0.3.0 (`make_fixtures.py optimisers` prints them).
    #[test]
    fn diffgrad_matches_torch_optimizer() {
        assert_close(
            &run(OptimizerKind::Diffgrad),
            &[
                -0.07846159106833607,
                -0.3013861146492471,
                1.4776574797560647,
            ],
        );
    }

    /// AdamP on z's shape (1, C, h, w) and on (2, C, h): with a gradient nearly orthogonal to
    /// the weights, the projection removes the radial part of the update; a 1-D parameter
    /// and a gradient along the weights leave it plain Adam.
    #[test]
    fn adamp_matches_torch_optimizer() {
        assert_close(&run(OptimizerKind::Adamp), &TORCH[0]);
        let (ortho, along) = (true, false);
        for (shape, orthogonal, expected) in [
            (&[1usize, 2, 2, 2][..], ortho, &ADAMP[0]),
            (&[1, 2, 2, 2], along, &ADAMP[1]),
            (&[2, 2, 2], ortho, &ADAMP[2]),
        ] {
            assert_close(
                &run_shaped(OptimizerKind::Adamp, shape, orthogonal),
                expected,
            );
        }
        // The projection really ran: the orthogonal case is not Adam's result.
        let adam = run_shaped(OptimizerKind::Adam, &[1, 2, 2, 2], ortho);
        assert!(adam
            .iter()
            .zip(&ADAMP[0])
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }

    /// Eight steps on an 8-element parameter of `shape`: g_t = b·t + p, or, when
    /// `orthogonal`, b·t with its part along p removed plus 0.001·p.
    fn run_shaped(kind: OptimizerKind, shape: &[usize], orthogonal: bool) -> Vec<f64> {
        let dev = &Device::Cpu;
        let p0 = [0.5f64, -1.0, 2.0, 0.25, -0.75, 1.5, -0.5, 1.0];
        let base = [1.0f64, 0.5, -0.25, 2.0, -1.0, 0.75, 0.3, -1.5];
        let p = Var::from_tensor(&Tensor::new(&p0, dev).unwrap().reshape(shape).unwrap()).unwrap();
        let b = Tensor::new(&base, dev).unwrap().reshape(shape).unwrap();
        let mut opt = Optimizer::new(kind, 0.1, p.as_tensor()).unwrap();
        let dot = |x: &Tensor, y: &Tensor| -> f64 {
            (x * y).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        for t in 1..=8 {
            let q = p.as_tensor().clone();
            let bt = (&b * t as f64).unwrap();
            let g = if orthogonal {
                let along = dot(&bt, &q) / dot(&q, &q);
                ((&bt - (&q * along).unwrap()).unwrap() + (&q * 0.001).unwrap()).unwrap()
            } else {
                (&bt + &q).unwrap()
            };
            opt.step(&p, &g).unwrap();
        }
        p.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[rustfmt::skip]
    const ADAMP: [[f64; 8]; 3] = [
[-0.3074343636382155, -1.5387409605220317, 1.7298510936254305, -0.5323000567811431, 0.08155070895632649, 0.5985072311358313, -1.0252169419196018, 1.6579619117247044],
[-0.2937645281331275, -1.2699007989938833, 1.3587770649508126, -0.5356644191232522, 0.046937896151382046, 0.6946047193285385, -0.895698369876604, 1.7534339977279574],
[-0.3358465517645709, -1.526514758840365, 1.6721176499059045, -0.5504260255529775, 0.03344908868391003, 0.6799656390291773, -1.0132943756269863, 1.6873876246686297]];

    #[rustfmt::skip]
    const TORCH: [[f64; 3]; 6] = [
[-0.2937645281331275, -0.20740935795712373, 1.19148063793001],
[-0.2949941898828018, -0.20218771794318632, 1.1783375091547106],
[-0.06805289325882374, -0.4303149504237832, 1.4942474769806093],
[-0.0932247435942471, -0.4091771583370625, 1.315104165415239],
[-4.703819862795007, 4.537887406845096, -2.190283021327048],
[-0.7048862250199187, 1.399981791205982, 0.609154959058154]];
}

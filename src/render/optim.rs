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

/// An optimiser's state: the step count and its moment buffers, in a fixed order
/// (first moment, then second; Adagrad and RMSprop keep one buffer).
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

    #[rustfmt::skip]
    const TORCH: [[f64; 3]; 6] = [
[-0.2937645281331275, -0.20740935795712373, 1.19148063793001],
[-0.2949941898828018, -0.20218771794318632, 1.1783375091547106],
[-0.06805289325882374, -0.4303149504237832, 1.4942474769806093],
[-0.0932247435942471, -0.4091771583370625, 1.315104165415239],
[-4.703819862795007, 4.537887406845096, -2.190283021327048],
[-0.7048862250199187, 1.399981791205982, 0.609154959058154]];
}

//! The tensor names and shapes a model asks for, without memory or weights: real-size
//! architectures are checked against upstream's by recording their requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

/// Tensor name -> shape.
pub type Shapes = HashMap<String, Vec<usize>>;

/// A weights source that records every tensor a model asks for and hands back a broadcast
/// zero.
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Shapes>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .insert(name.to_owned(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor `build` requests from its `VarBuilder`, with its shape.
pub fn requested(build: impl Fn(candle_nn::VarBuilder)) -> Shapes {
    let recorder = Recorder::default();
    build(candle_nn::VarBuilder::from_backend(
        Box::new(recorder.clone()),
        DType::F32,
        Device::Cpu,
    ));
    let shapes = recorder.0.lock().unwrap().clone();
    shapes
}

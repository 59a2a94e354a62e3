//! The models room: CLIP, VQGAN and the tokenizer against their PyTorch references, the
//! gradients render relies on, the input-gradient-only layer ops, CLIP preprocessing, the
//! model catalogue and downloads, and the `vqclip` commands that run the models directly.

mod support;

mod catalogue;
mod catalogue_cli;
mod grad;
mod kernels;
mod layer_ops;
mod more;
mod parity;
mod preprocess;
mod real_size;
mod tools_cli;

//! Models: CLIP (text and vision), its BPE tokenizer and the taming VQGAN, in candle.
//!
//! Everything here is differentiable where the render loop needs it (CLIP image features to
//! the pixels, the VQGAN decoder to its latent) and loads the upstream checkpoints unchanged.
//! The model graphs are built only from the ops in [`layers`], the seam where a GPU backend
//! swaps in its own kernels.

pub mod architectures;
pub mod catalogue;
pub mod clip;
pub mod clip_openai;
pub mod clip_resnet;
pub mod cpu;
pub mod download;
pub mod error;
pub mod layers;
pub mod ops;
pub mod preprocess;
pub mod text_counter;
pub mod tokenizer;
pub mod vqgan;
pub mod weights;
mod winograd;

pub use clip::{Clip, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use error::ModelError;
pub use tokenizer::{ClipTokenizer, Tokenized, TOKENIZED};
pub use vqgan::{Quantizer, Vqgan, VqganConfig, VqganYaml};

#[cfg(test)]
mod tests {
    /// Models are loaded once and shared by worker threads.
    #[test]
    fn models_are_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<super::Clip>();
        shared::<super::Vqgan>();
        shared::<super::ClipTokenizer>();
    }
}

//! The render room: the loop end to end on the tiny fixtures, parity of its steps and
//! augmentations with the PyTorch reference, cross-job batching, video in and out, and
//! `vqclip render` / `vqclip bench` through the built binary.

mod support;

mod batch;
mod bench_cli;
mod engine;
mod parity;
mod render_cli;
mod smoke;
mod steer;
mod video;

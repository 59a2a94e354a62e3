//! vqclip: VQGAN+CLIP image generation as an HTTP job service.
//!
//! Dependencies point one way:
//! `api -> queue <- worker -> render -> models -> candle`.
//! See `docs/ARCHITECTURE.md` for where each concern lives.

pub mod api;
pub mod auth;
pub mod config;
pub mod models;
pub mod queue;
pub mod render;
pub mod storage;
pub mod webhooks;
pub mod worker;

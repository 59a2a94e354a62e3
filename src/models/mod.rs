//! models

pub mod catalogue;
pub mod download;
pub mod preprocess;

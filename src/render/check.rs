//! The error every spec check returns, and the range checks most of them are.
//!
//! Its own file so that both the spec (`spec.rs`) and the prompt parser
//! (`prompts.rs`) can name it without importing each other.

use std::fmt;

use serde::Serialize;

/// A spec field that broke a rule. `Display` reads
/// `width: must be a multiple of 16; got 500, allowed 16..=2048`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {rule}; {detail}")]
pub struct SpecError {
    /// JSON path of the field, e.g. `prompts[1].weight`.
    pub field: String,
    /// The rule, phrased as what the value must be.
    pub rule: String,
    /// What was received and what is allowed.
    pub detail: String,
}

impl SpecError {
    pub fn new(
        field: impl Into<String>,
        rule: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
            detail: detail.into(),
        }
    }
}

pub(crate) fn check_range<T: PartialOrd + fmt::Display + Copy>(
    field: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<(), SpecError> {
    if value < lo || value > hi {
        return Err(SpecError::new(
            field,
            format!("must be between {lo} and {hi}"),
            format!("got {value}, allowed {lo}..={hi}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_finite_range(
    field: &str,
    value: f32,
    lo: f32,
    hi: f32,
) -> Result<(), SpecError> {
    if !value.is_finite() {
        return Err(SpecError::new(
            field,
            "must be a finite number",
            format!("got {value}"),
        ));
    }
    check_range(field, value, lo, hi)
}

//! The evaluator.

pub mod rules;
pub mod stats;

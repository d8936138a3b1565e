//! Evaluations of trained models (DESIGN.md §4, §8): what the sparse-attention and MoE
//! claims are measured in.
//!
//! - [`recall`]: the share of dense attention mass the DSA indexer's selection keeps.

pub mod recall;

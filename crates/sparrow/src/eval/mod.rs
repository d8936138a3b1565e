//! Evaluations of trained models (DESIGN.md §4, §8): what the sparse-attention and MoE
//! claims are measured in.
//!
//! - [`recall`]: the share of dense attention mass the DSA indexer's selection keeps.
//! - [`routing`]: expert utilization (MaxVio, CV, entropy, drops, dead experts) on any text.
//! - [`load_plot`]: per-expert load as a PNG picture.
//! - [`retrieval`]: passkey and needle-in-a-haystack accuracy by length and depth;
//!   [`heatmap`] draws it.
//! - [`perplexity`]: held-out perplexity by context length.

pub mod heatmap;
pub mod load_plot;
pub mod perplexity;
pub mod recall;
pub mod retrieval;
pub mod routing;

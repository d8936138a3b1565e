//! Experiments that train several models under one protocol and compare them.
//!
//! - [`routers`]: one model per MoE router arm and seed, same data order within a seed.
//! - [`spread`]: mean, spread and paired differences over seeds.

pub mod routers;
pub mod spread;

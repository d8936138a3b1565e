//! Experiments that train several models under one protocol and compare them.
//!
//! - [`routers`]: one model per MoE router kind, same seed and data order.

pub mod routers;

//! What an index scan scores, shared by the float scan ([`super::indexer`]) and the
//! int8 one ([`super::index_int8`]): the index heads' shape, the activation between a
//! head's dot product and the weighted head sum, and the key block of the cache layout.

/// Tokens per key block.
pub const BLOCK: usize = 64;

/// The activation between the per-head dot product and the weighted head sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreAct {
    /// `lightning`: ReLU.
    Relu,
    /// `mlp_gate`: none (the score is a plain dot product).
    Identity,
}

/// Shape of the index scoring: index heads and their dimension.
#[derive(Debug, Clone, Copy)]
pub struct IndexShape {
    pub heads: usize,
    pub dim: usize,
    pub act: ScoreAct,
}

//! Rotary position embedding of the trailing dimensions in interleaved pairs, as one op
//! (DeepSeek-V4's partial RoPE, `model::rope::TailRope`).
//!
//! x (..., T, D): the row at index t of the second-to-last axis is rotated by its own
//! angles; within each row the last `2 * half` values form pairs (a, b) -> (a c - b s,
//! b c + a s) with (c, s) from the table, and the leading `D - 2 * half` values pass
//! through. The backward is the rotation by the negated angles (the transpose). Composed
//! from candle's ops the rotation kept nine tensors in the autograd graph, the cos / sin
//! tables among them with gradients of their own; as one op it keeps its output.

use super::{by_dtype, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Arc;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 256;

/// The rotation of x (..., T, D) by a table of (cos, sin) per (t, pair).
#[derive(Debug, Clone)]
pub struct PairRotation {
    /// (T, half): (cos, sin) of row t's pair i at `t * half + i`, any scale included.
    table: Arc<Vec<(f64, f64)>>,
    rows: usize,
    half: usize,
}

impl PairRotation {
    /// A rotation of `rows` positions by `table` ((cos, sin) per position and pair, row
    /// major: `rows * half` entries).
    pub fn new(table: Vec<(f64, f64)>, rows: usize) -> candle_core::Result<Self> {
        if rows == 0 || !table.len().is_multiple_of(rows) {
            candle_core::bail!(
                "pair-rotation: {} table entries for {rows} positions",
                table.len()
            );
        }
        let half = table.len() / rows;
        Ok(Self {
            table: Arc::new(table),
            rows,
            half,
        })
    }

    /// Rotate x (..., T, D), D >= 2 * half, T = the table's positions.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    /// The inverse rotation (sines negated): the backward.
    fn inverse(&self) -> Self {
        Self {
            table: Arc::new(self.table.iter().map(|&(c, s)| (c, -s)).collect()),
            rows: self.rows,
            half: self.half,
        }
    }

    fn run<T: Float + Send + Sync>(&self, x: &[T], d: usize) -> Vec<T> {
        let mut y = x.to_vec();
        let (half, rows) = (self.half, self.rows);
        let table: Vec<(T, T)> = self
            .table
            .iter()
            .map(|&(c, s)| {
                (
                    T::from(c).unwrap_or(T::nan()),
                    T::from(s).unwrap_or(T::nan()),
                )
            })
            .collect();
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, block)| {
                for (i, row) in block.chunks_exact_mut(d).enumerate() {
                    let t = (task * ROWS_PER_TASK + i) % rows;
                    let angles = &table[t * half..(t + 1) * half];
                    for (pair, &(c, s)) in row[d - 2 * half..].chunks_exact_mut(2).zip(angles) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c - b * s;
                        pair[1] = b * c + a * s;
                    }
                }
            });
        y
    }
}

impl CustomOp1 for PairRotation {
    fn name(&self) -> &'static str {
        "pair-rotation"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let (t, d) = match dims {
            [.., t, d] => (*t, *d),
            _ => candle_core::bail!("pair-rotation: input {dims:?} has no (T, D) axes"),
        };
        if t != self.rows || d < 2 * self.half {
            candle_core::bail!(
                "pair-rotation: a table of {} positions x {} pairs applied to {dims:?}",
                self.rows,
                self.half
            );
        }
        let name = self.name();
        let out = by_dtype!(name, storage.dtype(), |T| {
            T::to_cpu_storage_owned(self.run(storage_slice::<T>(name, storage, layout)?, d))
        });
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.detach()
                .contiguous()?
                .apply_op1_no_bwd(&self.inverse())?,
        ))
    }
}

/// The plain reference over x (rows, D) row-major with row r at position `r % T`.
pub fn reference(x: &[f64], d: usize, table: &[(f64, f64)], rows: usize) -> Vec<f64> {
    let half = table.len() / rows;
    let mut y = x.to_vec();
    for (r, row) in y.chunks_exact_mut(d).enumerate() {
        let t = r % rows;
        for i in 0..half {
            let (c, s) = table[t * half + i];
            let (j, k) = (d - 2 * half + 2 * i, d - 2 * half + 2 * i + 1);
            let (a, b) = (x[r * d + j], x[r * d + k]);
            row[j] = a * c - b * s;
            row[k] = b * c + a * s;
        }
    }
    y
}

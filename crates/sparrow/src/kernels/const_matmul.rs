//! `x W^T` for a weight that does not train (a frozen base under an adapter, DeepSeek-
//! V3.2's warm-up and sparse stage), with a backward that returns only `dx = g W`.
//!
//! candle's matmul backward computes both operands' gradients whether or not they are
//! needed: for a constant W that is one more GEMM per layer (a third of the backward's
//! linear-layer work) and a weight-sized gradient, plus a zeros tensor to sum it into,
//! kept until the backward ends (~1 GB for SmolLM2-135M's f32 weights). Here W is a
//! field of the op, not an operand of the graph, so no gradient for it exists.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// y (N, out) = x (N, in) W^T, W (out, in) constant.
#[derive(Debug, Clone)]
pub struct ConstWeightMatmul {
    /// (out, in), detached.
    w: Tensor,
}

impl ConstWeightMatmul {
    /// The op for weight `w` (out, in); gradients never reach `w`.
    pub fn new(w: &Tensor) -> candle_core::Result<Self> {
        w.dims2()?;
        Ok(Self {
            w: w.detach().contiguous()?,
        })
    }

    /// x (N, in) -> (N, out).
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for ConstWeightMatmul {
    fn name(&self) -> &'static str {
        "const-weight-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (out, k) = self.w.dims2()?;
        let n = match l.dims() {
            [n, kx] if *kx == k => *n,
            d => candle_core::bail!("{name}: input {d:?} is not (N, {k})"),
        };
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("{name}: the weight is not on the CPU")
        };
        if ws.dtype() != s.dtype() {
            candle_core::bail!(
                "{name}: input {:?} and weight {:?} differ in dtype",
                s.dtype(),
                ws.dtype()
            );
        }
        // W^T as a (in, out) view of the (out, in) weight: no copy.
        let y = s.matmul(ws, (1, n, out, k), l, &wl.transpose(0, 1)?)?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dx = g W: computed on detached tensors, so nothing of it joins the graph.
        Ok(Some(g.detach().matmul(&self.w)?))
    }
}

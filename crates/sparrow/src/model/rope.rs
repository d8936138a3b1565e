//! Rotary position embedding, non-interleaved (HF Llama "rotate_half") layout: the
//! first half of each head's dimensions pairs with the second half. Built from plain
//! ops so gradients flow (candle's fused `rope` drops them). The angles of the positions
//! a call needs are computed on the spot, so no table grows with
//! `max_position_embeddings`.

use crate::error::{Error, Result};
use crate::kernels::rotary::PairRotation;
use candle_core::{DType, Device, Tensor, D};

#[derive(Debug, Clone)]
pub struct Rope {
    /// theta^(-2i/D) for i in 0..D/2
    inv_freq: Vec<f64>,
    max_pos: usize,
    dtype: DType,
    device: Device,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        Ok(Self {
            inv_freq,
            max_pos,
            dtype,
            device: dev.clone(),
        })
    }

    /// Host twin of [`apply`](Self::apply) for one token: rotate `x`, the token's heads
    /// side by side (each `2 * inv_freq.len()` wide), in place as position `pos`. Same
    /// arithmetic as the tensor path (angles in f64, rounded to f32).
    pub fn rotate_host(&self, x: &mut [f32], pos: usize) -> Result<()> {
        if pos >= self.max_pos {
            return Err(Error::Invalid(format!(
                "position {} exceeds max_position_embeddings {}",
                pos + 1,
                self.max_pos
            )));
        }
        let half = self.inv_freq.len();
        if half == 0 {
            return Ok(());
        }
        let mut cs = [(0f32, 0f32); 256];
        let table: &mut [(f32, f32)] = if half <= cs.len() {
            &mut cs[..half]
        } else {
            return Err(Error::Invalid(format!(
                "RoPE of {} dims is too wide",
                2 * half
            )));
        };
        for (slot, f) in table.iter_mut().zip(&self.inv_freq) {
            let (s, c) = (pos as f64 * f).sin_cos();
            *slot = (c as f32, s as f32);
        }
        for head in x.chunks_exact_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for ((a, b), &(c, s)) in x1.iter_mut().zip(x2.iter_mut()).zip(table.iter()) {
                let (u, w) = (*a, *b);
                *a = u * c - w * s;
                *b = w * c + u * s;
            }
        }
        Ok(())
    }

    /// Host twin of [`apply_interleaved`](Self::apply_interleaved) for one token: each
    /// head of `x` de-interleaved (even members, then odd members) and rotated as
    /// position `pos`, in place.
    pub fn rotate_interleaved_host(&self, x: &mut [f32], pos: usize) -> Result<()> {
        let d = 2 * self.inv_freq.len();
        let mut tmp = [0f32; 512];
        if d > tmp.len() {
            return Err(Error::Invalid(format!("RoPE of {d} dims is too wide")));
        }
        for head in x.chunks_exact_mut(d.max(1)) {
            let half = d / 2;
            for i in 0..half {
                tmp[i] = head[2 * i];
                tmp[half + i] = head[2 * i + 1];
            }
            head.copy_from_slice(&tmp[..d]);
            self.rotate_host(head, pos)?;
        }
        Ok(())
    }

    /// [`rotate_host`](Self::rotate_host) of the first `2 * inv_freq.len()` values of
    /// each `width`-wide head of `x` (the indexer's RoPE slice), the rest untouched.
    pub fn rotate_prefix_host(&self, x: &mut [f32], width: usize, pos: usize) -> Result<()> {
        let r = 2 * self.inv_freq.len();
        if width < r || width == 0 {
            return Err(Error::Invalid(format!(
                "RoPE of {r} dims applied to heads of {width}"
            )));
        }
        for head in x.chunks_exact_mut(width) {
            self.rotate_host(&mut head[..r], pos)?;
        }
        Ok(())
    }

    /// (cos, sin), each (T, D/2), for positions offset..offset+T.
    fn angles(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in offset..offset + t {
            for f in &self.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        let make = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (t, half), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok((make(cos)?, make(sin)?))
    }

    /// Rotate x (B, H, T, D) as positions offset..offset+T.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        self.rotate(&x1, &x2, offset)
    }

    /// DeepSeek's interleaved layout: pairs (x0, x1), (x2, x3), ... each rotated by one
    /// frequency. The result is written de-interleaved (all first members, then all
    /// second members), as transformers does; q . k is unchanged when q and k both go
    /// through it.
    pub fn apply_interleaved(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        let pairs = x.reshape((b, h, t, d / 2, 2))?;
        let x1 = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let x2 = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
        self.rotate(&x1, &x2, offset)
    }

    /// cat(x1 cos - x2 sin, x2 cos + x1 sin), x1 / x2 (B, H, T, D/2).
    fn rotate(&self, x1: &Tensor, x2: &Tensor, offset: usize) -> Result<Tensor> {
        let (_b, _h, t, half) = x1.dims4()?;
        if offset + t > self.max_pos {
            return Err(Error::Invalid(format!(
                "position {} exceeds max_position_embeddings {}",
                offset + t,
                self.max_pos
            )));
        }
        if half != self.inv_freq.len() {
            return Err(Error::Invalid(format!(
                "RoPE of {} dims applied to {} dims",
                2 * self.inv_freq.len(),
                2 * half
            )));
        }
        let (cos, sin) = self.angles(offset, t)?; // (T, D/2) each
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    }
}

/// DeepSeek-V4's RoPE: interleaved pairs `(x[2i], x[2i+1])` of the *trailing*
/// `2 * inv_freq.len()` dimensions of each head rotated in place (the leading ones
/// untouched, the layout kept), plain or YaRN-scaled frequencies, cos and sin scaled by
/// the YaRN attention factor. Positions are given per row, so compressed entries rotate
/// at their windows' first positions; `inverse` rotates by the negative angle (V4
/// de-rotates the attention output at the query position).
#[derive(Debug, Clone)]
pub struct TailRope {
    inv_freq: Vec<f64>,
    attention_factor: f64,
    max_pos: usize,
}

impl TailRope {
    /// RoPE over `dims` trailing dimensions with base `theta`, YaRN-scaled when `yarn` is
    /// given (transformers' `_compute_yarn_parameters`).
    pub fn new(
        dims: usize,
        theta: f64,
        yarn: Option<&crate::config::Yarn>,
        max_pos: usize,
    ) -> Self {
        let half = dims / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / dims as f64))
            .collect();
        let Some(y) = yarn else {
            return Self {
                inv_freq: base,
                attention_factor: 1.0,
                max_pos,
            };
        };
        // The dimension whose wavelength fits `rotations` turns into the original
        // context.
        let correction_dim = |rotations: f64| {
            dims as f64
                * (y.original_max_position_embeddings as f64
                    / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(dims as f64 - 1.0));
        let span = if low == high { 0.001 } else { high - low };
        let inv_freq = base
            .iter()
            .enumerate()
            .map(|(i, &extrapolated)| {
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                let keep = 1.0 - ramp; // share of the extrapolated (unscaled) frequency
                extrapolated / y.factor * (1.0 - keep) + extrapolated * keep
            })
            .collect();
        Self {
            inv_freq,
            attention_factor: y.attention_factor,
            max_pos,
        }
    }

    /// Dimensions rotated at the end of each head.
    pub fn dims(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// (cos, sin) per position and pair, (T * dims/2) row major, scaled by the
    /// attention factor and rounded to f32 (the host twin's arithmetic); sin negated
    /// when `inverse`.
    fn angles(&self, positions: &[usize], inverse: bool) -> Result<Vec<(f64, f64)>> {
        if let Some(&p) = positions.iter().find(|&&p| p >= self.max_pos) {
            return Err(Error::Invalid(format!(
                "position {} exceeds max_position_embeddings {}",
                p + 1,
                self.max_pos
            )));
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut table = Vec::with_capacity(positions.len() * self.inv_freq.len());
        for &p in positions {
            for f in &self.inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                table.push((
                    (c * self.attention_factor) as f32 as f64,
                    (sign * s * self.attention_factor) as f32 as f64,
                ));
            }
        }
        Ok(table)
    }

    /// Rotate x (..., T, D): row t of the second-to-last axis as position
    /// `positions[t]`, the trailing `dims()` of the last axis in interleaved pairs
    /// (`kernels::rotary`, one op with its backward).
    pub fn apply(&self, x: &Tensor, positions: &[usize], inverse: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let fits =
            matches!(dims[..], [.., t, d] if t == positions.len() && t > 0 && self.dims() <= d);
        if !fits {
            return Err(Error::Invalid(format!(
                "RoPE of {} trailing dims over {} positions applied to {dims:?}",
                self.dims(),
                positions.len()
            )));
        }
        let rotation = PairRotation::new(self.angles(positions, inverse)?, positions.len())?;
        Ok(rotation.apply(x)?)
    }
}

impl TailRope {
    /// Host twin of [`apply`](Self::apply) for one row: each `width`-wide head of `x`
    /// rotated in place as position `pos` (same arithmetic: angles in f64, cos / sin
    /// rounded to f32).
    pub fn rotate_host(
        &self,
        x: &mut [f32],
        width: usize,
        pos: usize,
        inverse: bool,
    ) -> Result<()> {
        let r = self.dims();
        if pos >= self.max_pos {
            return Err(Error::Invalid(format!(
                "position {} exceeds max_position_embeddings {}",
                pos + 1,
                self.max_pos
            )));
        }
        if r > width || width == 0 || !x.len().is_multiple_of(width) {
            return Err(Error::Invalid(format!(
                "RoPE of {r} trailing dims applied to heads of {width}"
            )));
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let table: Vec<(f32, f32)> = self
            .inv_freq
            .iter()
            .map(|f| {
                let (s, c) = (pos as f64 * f).sin_cos();
                (
                    (c * self.attention_factor) as f32,
                    (sign * s * self.attention_factor) as f32,
                )
            })
            .collect();
        for head in x.chunks_exact_mut(width) {
            let tail = &mut head[width - r..];
            for (pair, &(c, s)) in tail.chunks_exact_mut(2).zip(&table) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = b * c + a * s;
            }
        }
        Ok(())
    }
}

//! Differential: MoE dispatch (`Dispatch`, `GatherRows`, `CombineSlots`) against the
//! index reference (candle's `index_select` / `index_add`) on arbitrary routings:
//! any token count, k, expert count and width, dropped slots and out-of-range experts
//! (an error, never a panic); outputs and both gradients agree.
#![no_main]

use candle_core::{DType, Device, Tensor, Var};
use libfuzzer_sys::fuzz_target;
use sparrow::kernels::experts::{CombineSlots, Dispatch, GatherRows, DROPPED};
use sparrow::kernels::reference::{moe_combine_reference, moe_gather_reference};
use std::sync::Arc;

/// Largest difference over the larger of 1 and the reference's largest magnitude: the
/// inputs are O(1) (at most 4 in size), so sums whose terms cancel (one token sent to
/// one expert in several slots, weights of both signs) are judged against the size of
/// their terms, not against their own near-zero result.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fuzz_target!(|data: &[u8]| {
    let Some((&[n, k, e, c], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (n, k, e, c) = (
        1 + n as usize % 40,
        1 + k as usize % 4,
        1 + e as usize % 9,
        1 + c as usize % 7,
    );
    let mut bytes = rest.iter().copied().cycle();
    // Expert ids: mostly valid, some dropped, a few out of range.
    let ids: Vec<u32> = (0..n * k)
        .map(|_| match bytes.next().unwrap_or(0) {
            b if b >= 250 => e as u32 + (b as u32 - 250),
            b if b >= 220 => DROPPED,
            b => b as u32 % e as u32,
        })
        .collect();
    let plan = match Dispatch::new(&ids, k, e) {
        Ok(p) => Arc::new(p),
        Err(_) => {
            assert!(ids.iter().any(|&i| i != DROPPED && i as usize >= e));
            return;
        }
    };
    let mut value = || (bytes.next().unwrap_or(1) as f64 - 127.5) / 32.0;
    let x: Vec<f64> = (0..n * c).map(|_| value()).collect();
    let w: Vec<f64> = (0..n * k).map(|_| value()).collect();
    let probe: Vec<f64> = (0..n * c).map(|_| value()).collect();
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(x, (n, c), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(w, (n, k), &dev).unwrap()).unwrap();
    let probe = Tensor::from_vec(probe, (n, c), &dev).unwrap();
    let run = |fast: bool| {
        let xg = if fast {
            GatherRows(plan.clone()).apply(x.as_tensor()).unwrap()
        } else {
            moe_gather_reference(x.as_tensor(), &plan).unwrap()
        };
        let ys = xg.tanh().unwrap();
        let y = if fast {
            CombineSlots(plan.clone())
                .apply(&ys, w.as_tensor())
                .unwrap()
        } else {
            moe_combine_reference(&ys, w.as_tensor(), &plan).unwrap()
        };
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // A variable no path reaches (every slot dropped) has no gradient: zeros.
        let grad = |v: &Var| match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like().unwrap(),
        };
        (y, grad(&x), grad(&w))
    };
    let (y, dx, dw) = run(true);
    let (y_r, dx_r, dw_r) = run(false);
    assert_eq!(y.dtype(), DType::F64);
    for (name, a, b) in [("y", &y, &y_r), ("dx", &dx, &dx_r), ("dw", &dw, &dw_r)] {
        assert_eq!(a.dims(), b.dims(), "{name} shape");
        let err = rel_err(a, b);
        assert!(
            err < 1e-12,
            "{name}: n {n} k {k} experts {e} width {c}: error {err:e}"
        );
    }
});

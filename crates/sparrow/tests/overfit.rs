//! A tiny model memorises a fixed batch: the whole training path (forward, loss,
//! backward, clipping, AdamW) actually learns.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::model::Model;
use sparrow::train::loss::cross_entropy;
use sparrow::train::optimizer::{AdamW, AdamWConfig};

#[test]
fn tiny_model_overfits_a_fixed_batch() {
    let cfg = tiny_config();
    let model = Model::new_random(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let (b, t) = (2, 24);
    let seq: Vec<u32> = (0..(b * t + 1) as u32)
        .map(|i| (i * 31 + 7) % 200 + 2)
        .collect();
    let inp = Tensor::from_vec(seq[..b * t].to_vec(), (b, t), &Device::Cpu).unwrap();
    let tgt = Tensor::from_vec(seq[1..].to_vec(), b * t, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(
        model.store.vars(),
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut first = None;
    let mut last = f32::NAN;
    for _ in 0..150 {
        let out = model.forward(&inp).unwrap();
        let ce =
            cross_entropy(&out.logits.reshape((b * t, cfg.vocab_size)).unwrap(), &tgt).unwrap();
        let loss = (&ce + (out.diagnostics.aux_loss().unwrap().unwrap() * 0.01).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let norm = opt.grad_norm(&grads).unwrap();
        opt.step(&grads, 1e-2, if norm > 1.0 { 1.0 / norm } else { 1.0 })
            .unwrap();
        last = ce.to_scalar().unwrap();
        first.get_or_insert(last);
    }
    let first = first.unwrap();
    assert!(first > 5.5, "initial loss {first} should be near ln(512)");
    assert!(last < 0.3, "loss only fell from {first} to {last}");
}

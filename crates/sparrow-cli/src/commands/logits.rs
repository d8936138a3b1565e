//! `sparrow logits`: a model's logits for given ids, for comparison with other engines.

use crate::common::HoldArgs;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct LogitsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub decode: bool,
    #[command(flatten)]
    pub hold: HoldArgs,
}

pub fn run(a: LogitsArgs, progress: bool) -> Result<()> {
    let LogitsArgs {
        model,
        ids,
        out,
        decode,
        hold,
    } = a;
    let m = sparrow::model_source::load_model_for_inference(
        &sparrow::model_source::resolve(&model, progress)?,
        hold.weights.into(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |c| hold.edit(c),
    )?;
    let dev = candle_core::Device::Cpu;
    let t = ids.len();
    let input = candle_core::Tensor::from_vec(ids.clone(), (1, t), &dev)?;
    let mut tensors = vec![("logits".to_string(), m.forward(&input)?.logits)];
    if decode {
        // One token per engine step over the sequence's own cache: the decode
        // path every generation takes.
        let mut cache = sparrow::model::cache::SeqCache::for_config(&m.cfg);
        let opts = sparrow::model::step::StepOptions::default();
        let mut steps = Vec::with_capacity(t);
        for i in 0..t {
            let logits = m.step_one(&ids[i..i + 1], &mut cache, &opts)?.logits;
            steps.push(logits.unsqueeze(0)?);
        }
        tensors.push((
            "logits_decode".to_string(),
            candle_core::Tensor::cat(&steps, 1)?,
        ));
    }
    let ids_t = candle_core::Tensor::from_vec(ids, (1, t), &dev)?;
    tensors.push(("input_ids".to_string(), ids_t));
    sparrow::weights::save(&out, &tensors, Default::default())?;
    println!(
        "logits (1, {t}, {}) written to {}",
        m.cfg.vocab_size,
        out.display()
    );
    Ok(())
}

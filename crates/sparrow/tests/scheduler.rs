//! Continuous batching: sequences that join a running batch at later steps, wait for a
//! slot, or share steps with a long prompt's prefill generate exactly what they generate
//! alone; the batch never exceeds `max_batch`, a step never feeds more than its prompt
//! budget, every decoding sequence advances every step, a full queue refuses, and a
//! cancelled sequence frees its slot for the next step.

mod common;

use candle_core::{DType, Device};
use common::*;
use sparrow::engine::sampler::SamplerConfig;
use sparrow::engine::{
    Engine, EngineOptions, FinishReason, Refused, Scheduler, SchedulerOptions, Sequence,
    SequenceParams,
};
use sparrow::model::Model;
use std::collections::HashMap;

fn model() -> Model {
    let mut cfg = tiny_config();
    cfg.initializer_range = 0.2;
    Model::new_random(&cfg, 5, DType::F32, &Device::Cpu).unwrap()
}

fn prompt(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 53 + 7 + seed * 29 + (i * i) % 5) % vocab as u32)
        .collect()
}

fn seq(model: &Model, id: u64, len: usize, max_new: usize) -> Sequence {
    let params = SequenceParams {
        max_new_tokens: max_new,
        sampler: SamplerConfig {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 0,
        },
        seed: 1000 + id,
        stop_tokens: vec![],
        stop_strings: vec![],
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logprobs: None,
    };
    let p = prompt(len, id as u32, model.cfg.vocab_size);
    Sequence::new(id, p, params, &model.cfg).unwrap()
}

fn engine(model: &Model) -> Engine<'_> {
    let opts = EngineOptions {
        prefill_chunk: 6,
        ..Default::default()
    };
    Engine::new(model, None, opts).unwrap()
}

/// The tokens sequence `id` generates when it runs alone.
fn alone(model: &Model, id: u64, len: usize, max_new: usize) -> Vec<u32> {
    let mut s = [seq(model, id, len, max_new)];
    engine(model).run(&mut s, |_| {}).unwrap();
    s[0].generated().to_vec()
}

#[test]
fn late_joiners_and_waiting_sequences_generate_what_they_do_alone() {
    let model = model();
    // (id, prompt length, new tokens, the step it is submitted before)
    let plan: [(u64, usize, usize, usize); 6] = [
        (1, 5, 12, 0),
        (2, 23, 9, 0),
        (3, 3, 15, 2),
        (4, 40, 6, 3),
        (5, 8, 10, 3),
        (6, 11, 7, 9),
    ];
    let opts = SchedulerOptions {
        max_batch: 3,
        max_queue: 8,
        prefill_budget: 10,
        ..Default::default()
    };
    let mut sched = Scheduler::new(engine(&model), opts).unwrap();
    let mut got: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut ended: HashMap<u64, FinishReason> = HashMap::new();
    let mut step = 0;
    while step < 10 || !sched.is_idle() {
        for &(id, len, max_new, at) in &plan {
            if at == step {
                sched.submit(seq(&model, id, len, max_new)).unwrap();
            }
        }
        let decoding_before: Vec<u64> = (1..=6)
            .filter(|&id| {
                sched
                    .get(id)
                    .is_some_and(|s| !s.is_prefilling() && !s.generated().is_empty())
            })
            .collect();
        let events = sched.step().unwrap();
        assert!(
            sched.running() <= opts.max_batch,
            "step {step}: batch too big"
        );
        assert!(events.len() <= opts.max_batch, "step {step}: {events:?}");
        // Every sequence that was decoding produced a token in this step.
        for id in decoding_before {
            assert!(
                events.iter().any(|e| e.seq == id && e.token.is_some()),
                "step {step}: sequence {id} did not advance"
            );
        }
        for e in events {
            if let Some(t) = e.token {
                if !matches!(e.finished, Some(FinishReason::StopToken(_))) {
                    got.entry(e.seq).or_default().push(t);
                }
            }
            if let Some(r) = e.finished {
                ended.insert(e.seq, r);
            }
        }
        step += 1;
        assert!(step < 500, "the scheduler did not drain");
    }
    for &(id, len, max_new, _) in &plan {
        assert_eq!(ended.get(&id), Some(&FinishReason::Length), "sequence {id}");
        assert_eq!(
            got[&id],
            alone(&model, id, len, max_new),
            "sequence {id} batched vs alone"
        );
    }
}

#[test]
fn the_prefill_budget_bounds_each_step_and_decodes_keep_flowing() {
    let model = model();
    let budget = 7;
    let opts = SchedulerOptions {
        max_batch: 4,
        max_queue: 4,
        prefill_budget: budget,
        ..Default::default()
    };
    let mut sched = Scheduler::new(engine(&model), opts).unwrap();
    sched.submit(seq(&model, 1, 2, 40)).unwrap();
    sched.step().unwrap(); // 1 prefills and samples its first token
    sched.submit(seq(&model, 2, 50, 3)).unwrap();
    sched.submit(seq(&model, 3, 30, 3)).unwrap();
    let mut fed_before: HashMap<u64, usize> = HashMap::new();
    for _ in 0..12 {
        let pos = |s: &Scheduler, id| s.get(id).map_or(0, |q| q.position());
        for id in [2, 3] {
            fed_before.insert(id, pos(&sched, id));
        }
        let events = sched.step().unwrap();
        let fed: usize = [2, 3]
            .iter()
            .map(|&id| {
                let after = sched.get(id).map_or(fed_before[&id], |q| q.position());
                after - fed_before[&id]
            })
            .sum();
        assert!(fed <= budget + 1, "{fed} prompt tokens in one step"); // + a first decode
        assert!(
            events.iter().any(|e| e.seq == 1 && e.token.is_some()),
            "the decoding sequence stalled behind the prefills"
        );
    }
}

#[test]
fn a_full_queue_refuses_and_a_cancel_frees_the_slot() {
    let model = model();
    let opts = SchedulerOptions {
        max_batch: 1,
        max_queue: 1,
        prefill_budget: 64,
        ..Default::default()
    };
    let mut sched = Scheduler::new(engine(&model), opts).unwrap();
    sched.submit(seq(&model, 1, 4, 100)).unwrap();
    sched.step().unwrap();
    assert_eq!((sched.running(), sched.waiting()), (1, 0));
    sched.submit(seq(&model, 2, 4, 5)).unwrap();
    match sched.submit(seq(&model, 3, 4, 5)) {
        Err(Refused::QueueFull(s)) => assert_eq!(s.id, 3),
        other => panic!("expected a full queue, got {other:?}"),
    }
    match sched.submit(seq(&model, 1, 4, 5)) {
        Err(Refused::DuplicateId(_)) => {}
        other => panic!("expected a duplicate id, got {other:?}"),
    }
    sched.step().unwrap();
    assert_eq!((sched.running(), sched.waiting()), (1, 1), "2 waits for 1");
    assert!(sched.cancel(1));
    assert!(!sched.cancel(1));
    let events = sched.step().unwrap();
    assert!(events.iter().all(|e| e.seq == 2), "{events:?}");
    assert_eq!((sched.running(), sched.waiting()), (1, 0));
    // A budget of 0 tokens ends at admission, with an event.
    sched.submit(seq(&model, 4, 4, 0)).unwrap();
    let mut ended = false;
    while !sched.is_idle() {
        for e in sched.step().unwrap() {
            ended |= e.seq == 4 && e.finished == Some(FinishReason::Length);
        }
    }
    assert!(ended);
    assert!(Scheduler::new(
        engine(&model),
        SchedulerOptions {
            max_batch: 0,
            ..opts
        }
    )
    .is_err());
}

/// The running sequences' reserved cache positions stay within `max_cache_positions`:
/// a sequence that fits runs beside the others, one that does not waits (in arrival
/// order) until enough has finished, and one that could never fit is refused.
#[test]
fn the_cache_budget_bounds_what_runs_together() {
    let model = model();
    let opts = SchedulerOptions {
        max_batch: 8,
        max_queue: 8,
        prefill_budget: 64,
        max_cache_positions: 30,
    };
    let mut sched = Scheduler::new(engine(&model), opts).unwrap();
    // 4 + 10 and 4 + 8 positions: together 26 <= 30.
    sched.submit(seq(&model, 1, 4, 10)).unwrap();
    sched.submit(seq(&model, 2, 4, 8)).unwrap();
    // 4 + 6 = 10 more would make 36: waits; the small one behind it waits too (FIFO).
    sched.submit(seq(&model, 3, 4, 6)).unwrap();
    sched.submit(seq(&model, 4, 2, 1)).unwrap();
    match sched.submit(seq(&model, 5, 20, 11)) {
        Err(Refused::TooLarge(s)) => assert_eq!(s.reserved_positions(), 31),
        other => panic!("expected too large, got {other:?}"),
    }
    sched.step().unwrap();
    assert_eq!((sched.running(), sched.waiting()), (2, 2));
    let mut started = std::collections::HashMap::new();
    let mut step = 0;
    while !sched.is_idle() {
        step += 1;
        for e in sched.step().unwrap() {
            started.entry(e.seq).or_insert(step);
        }
        assert!(sched.running() <= 3, "step {step}");
    }
    // 2 generates its 8 tokens in steps 0-7; only then do 3 and 4 fit (14 + 10 + 3).
    assert_eq!((started[&3], started[&4]), (8, 8), "{started:?}");
}

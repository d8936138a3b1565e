//! `sparrow bench pool`: what one parallel call of the inference kernels costs beyond
//! its work, through the kernels' thread team ([`crate::kernels::pool`]) and through
//! rayon, alternated in the same run. Each iteration is a serial stretch (the host work
//! between two kernels of a decode step) then one parallel call of one task per thread,
//! every piece a busy wait of a set length, so the ideal iteration is serial + task.

use crate::error::{Error, Result};
use crate::kernels::pool;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// One (serial, task) pattern.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PoolRow {
    /// Microseconds of serial work before each call.
    pub serial_us: f64,
    /// Microseconds of each task of the call (one per thread).
    pub task_us: f64,
    /// Ideal microseconds per iteration: serial + task.
    pub ideal_us: f64,
    /// Measured microseconds per iteration through the kernels' team.
    pub team_us: f64,
    /// The same through rayon.
    pub rayon_us: f64,
}

fn busy(us: f64) {
    let t = Instant::now();
    let d = Duration::from_secs_f64(us * 1e-6);
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Microseconds per iteration of `iters` iterations.
fn per_iter(iters: usize, serial: f64, call: impl Fn()) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        busy(serial);
        call();
    }
    t.elapsed().as_secs_f64() * 1e6 / iters as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Time each `(serial_us, task_us)` pattern, `iters` iterations per round, five rounds
/// alternating the team and rayon.
pub fn run(patterns: &[(f64, f64)], iters: usize) -> Result<Vec<PoolRow>> {
    if iters == 0
        || patterns
            .iter()
            .any(|&(s, t)| !(s >= 0.0 && t > 0.0 && s + t < 1e6))
    {
        return Err(Error::Invalid(
            "bench pool needs iterations and patterns of serial >= 0 and task > 0 microseconds (under a second)".into(),
        ));
    }
    let threads = pool::threads();
    patterns
        .iter()
        .map(|&(serial, task)| {
            let (mut team, mut ray) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                team.push(per_iter(iters, serial, || {
                    pool::for_each(threads, |_| busy(task))
                }));
                ray.push(per_iter(iters, serial, || {
                    (0..threads).into_par_iter().for_each(|_| busy(task))
                }));
            }
            Ok(PoolRow {
                serial_us: serial,
                task_us: task,
                ideal_us: serial + task,
                team_us: median(team),
                rayon_us: median(ray),
            })
        })
        .collect()
}

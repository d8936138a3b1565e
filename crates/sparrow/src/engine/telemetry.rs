//! What the model's sparse parts did over the engine's recent steps: each DSA layer's
//! sampled indexer recall and each MoE layer's expert balance (MaxVio), over a window
//! of the last steps that measured them. The server exports these in `/metrics`.

use crate::model::step::LayerTelemetry;
use crate::model::utilization::RoutingStats;
use std::collections::VecDeque;

/// Steps a window holds unless told otherwise.
pub const DEFAULT_WINDOW: usize = 256;

/// Per layer, the last `window` measurements of recall and of routing counts.
#[derive(Debug, Clone)]
pub struct TelemetryWindow {
    window: usize,
    recall: Vec<VecDeque<f32>>,
    routing: Vec<VecDeque<RoutingStats>>,
}

/// One layer's summary over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSummary {
    /// Mean sampled recall (DSA layers that ran sparse within the window).
    pub recall: Option<f64>,
    /// Recall samples in the window.
    pub recall_samples: usize,
    /// MaxVio of the expert load summed over the window (MoE layers).
    pub max_vio: Option<f64>,
    /// Tokens routed in the window.
    pub routed_tokens: u64,
}

impl TelemetryWindow {
    /// A window of the last `window` (>= 1) measuring steps for `layers` layers.
    pub fn new(layers: usize, window: usize) -> Self {
        Self {
            window: window.max(1),
            recall: vec![VecDeque::new(); layers],
            routing: vec![VecDeque::new(); layers],
        }
    }

    /// Add one step's measurements (one entry per layer; an empty slice adds nothing).
    pub fn push(&mut self, step: &[LayerTelemetry]) {
        for (l, t) in step.iter().enumerate().take(self.recall.len()) {
            if let Some(r) = t.recall {
                push_bounded(&mut self.recall[l], r, self.window);
            }
            if let Some(s) = &t.routing {
                push_bounded(&mut self.routing[l], s.clone(), self.window);
            }
        }
    }

    /// Each layer's summary, in layer order.
    pub fn summary(&self) -> Vec<LayerSummary> {
        self.recall
            .iter()
            .zip(&self.routing)
            .map(|(rec, rout)| {
                let recall = (!rec.is_empty())
                    .then(|| rec.iter().map(|&r| r as f64).sum::<f64>() / rec.len() as f64);
                let mut total = RoutingStats::default();
                for s in rout {
                    total.merge(s);
                }
                LayerSummary {
                    recall,
                    recall_samples: rec.len(),
                    max_vio: (!rout.is_empty()).then(|| total.utilization().max_vio),
                    routed_tokens: total.tokens,
                }
            })
            .collect()
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, x: T, cap: usize) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(x);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(load: &[u64]) -> RoutingStats {
        RoutingStats {
            tokens: load.iter().sum(),
            demand: load.to_vec(),
            load: load.to_vec(),
        }
    }

    #[test]
    fn the_window_keeps_the_last_steps_and_sums_their_load() {
        let mut w = TelemetryWindow::new(2, 2);
        let step = |r: Option<f32>, load: &[u64]| {
            vec![
                LayerTelemetry {
                    routing: None,
                    recall: r,
                    selected: None,
                },
                LayerTelemetry {
                    routing: Some(routed(load)),
                    recall: None,
                    selected: None,
                },
            ]
        };
        w.push(&step(Some(0.2), &[4, 0]));
        w.push(&step(None, &[0, 4]));
        let s = w.summary();
        assert_eq!(s[0].recall, Some(0.2f32 as f64));
        assert_eq!(s[0].max_vio, None);
        // [4, 4] over two steps: even.
        assert_eq!(s[1].max_vio, Some(0.0));
        assert_eq!(s[1].routed_tokens, 8);
        assert_eq!(s[1].recall, None);
        // A third step pushes the first out: [0, 4] + [2, 0] -> max 4 / mean 3 - 1.
        w.push(&step(Some(0.6), &[2, 0]));
        let s = w.summary();
        assert!((s[0].recall.unwrap() - 0.4).abs() < 1e-6, "{s:?}");
        assert_eq!(s[0].recall_samples, 2);
        assert!(
            (s[1].max_vio.unwrap() - (4.0 / 3.0 - 1.0)).abs() < 1e-12,
            "{s:?}"
        );
        assert!(w.summary().len() == 2 && TelemetryWindow::new(3, 0).summary().len() == 3);
    }
}

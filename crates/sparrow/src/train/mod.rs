//! Training: AdamW with decoupled weight decay, warmup + cosine schedule, the loss,
//! the training loop with validation and metrics, and atomic, exactly resumable
//! checkpoints, and the run directory's lock.

pub mod checkpoint;
pub mod lock;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod options;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use trainer::{
    recover_run, resume, train, ResumeRequest, TrainOptions, TrainRequest, TrainSummary,
};

//! The Kindling trainer. Nothing in this crate knows about masked LM, contrastive losses or
//! BERT: an [`Objective`] turns a batch into a loss, and the [`Trainer`] does the engineering
//! (optimiser, schedule, accumulation, clipping, evaluation, metrics, plots, checkpoints).

pub mod callbacks;
pub mod checkpoint;
pub mod distributed;
pub mod muon;
pub mod objective;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use callbacks::{Callback, EvalRecord, MetricsLog, PlotCallback, ProgressCallback, StepRecord};
pub use checkpoint::{Best, TrainerState};
pub use muon::Muon;
pub use objective::{Objective, StepOutput};
pub use optim::{AdamW, Optimizer, OptimizerConfig, OptimizerKind, Sgd};
pub use schedule::{DecayShape, Schedule, ScheduleKind};
pub use tensorboard::TensorBoard;
pub use trainer::{FitSummary, Goal, Monitor, StopReason, TrainConfig, Trainer};

/// Trainer errors; each names the step or file involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("non-finite loss ({loss}) at step {step}; the last checkpoint is untouched")]
    NonFiniteLoss { step: u64, loss: f64 },
    #[error("non-finite gradient norm at step {step}; the last checkpoint is untouched")]
    NonFiniteGrad { step: u64 },
    #[error("the training data ran out at step {step}")]
    DataExhausted { step: u64 },
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("invalid training setting `{key}`: {msg}")]
    Config { key: &'static str, msg: String },
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

//! Run engineering shared by every recipe: the device, the run folder and its lock, resuming,
//! and the trainer with its callbacks. Recipe modules hold the research code (data, objective,
//! export) and call these; none of them holds run engineering of its own.

pub mod device;
pub mod experiment;
pub mod folder;
pub mod resume;
pub mod trainer;

pub use device::{compute_dtype, device, loss_scale, DeviceSetting, Precision};
pub(crate) use device::{join_group, rank_device};
pub(crate) use experiment::shared_header;
pub use experiment::{drive, Context, Experiment, Loader, Prefetched, Prepared, Ran, RunOf};
pub(crate) use folder::{io, plan_run, RunLock};
pub(crate) use resume::first_loadable;
pub(crate) use resume::{cursor_within, load_checked};
pub use resume::{resume_candidates, resume_checkpoint_in, Candidates};
pub(crate) use trainer::{group_trainer, standard_trainer};

/// Metrics on one line, for the log: `loss 2.3026, accuracy 0.1000`.
pub fn format_metrics(m: &std::collections::BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect::<Vec<_>>()
        .join(", ")
}

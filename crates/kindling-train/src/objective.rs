//! The one trait research code implements.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor};
use candle_nn::VarMap;
use kindling_core::Mode;

/// What one step of an objective produced.
pub struct StepOutput {
    /// Scalar loss, still attached to the graph in training.
    pub loss: Tensor,
    /// How much this batch counts when averaging over batches (predicted tokens, samples).
    pub weight: f64,
    /// Units of throughput processed (tokens or samples), for the tokens/s display.
    pub units: usize,
    /// Extra per-batch metrics (already averaged within the batch), e.g. accuracy.
    pub metrics: BTreeMap<String, f64>,
}

/// A self-supervised objective: builds its parameters in a [`VarMap`] (names become checkpoint
/// keys) and turns a batch into a loss. The trainer owns everything else.
pub trait Objective {
    type Batch: Send + 'static;

    /// One forward pass. `mode` says train (dropout on, with its seed) or eval.
    fn step(&self, batch: &Self::Batch, mode: Mode) -> candle_core::Result<StepOutput>;

    /// A training step that computes its gradients itself, for objectives whose loss does not
    /// fit one graph in memory (GradCache: a loss over a batch of 512 back-propagated chunk by
    /// chunk). The returned loss is detached; the gradients are those of that loss. `None` (the
    /// default): the trainer calls [`Objective::step`] and back-propagates its loss.
    fn step_with_grads(
        &self,
        _batch: &Self::Batch,
        _mode: Mode,
    ) -> candle_core::Result<Option<(StepOutput, GradStore)>> {
        Ok(None)
    }

    /// The trainable parameters.
    fn varmap(&self) -> &VarMap;

    /// Parameters excluded from weight decay: biases and normalisation weights, as HF and
    /// BERT's original optimiser do.
    fn no_decay(&self, name: &str) -> bool {
        name.ends_with("bias") || name.contains("LayerNorm") || name.contains("norm.")
    }

    /// Matmul FLOPs of one training step on `batch` (forward + backward), if known; used for
    /// the achieved-GFLOP/s display.
    fn train_flops(&self, _batch: &Self::Batch) -> Option<f64> {
        None
    }

    /// Whether the optimiser updates this VarMap entry. Entries that are state rather than
    /// parameters (BatchNorm running statistics, a momentum encoder, a queue of negatives) live
    /// in the VarMap so that checkpoints carry them, and answer false here.
    fn trainable(&self, _name: &str) -> bool {
        true
    }

    /// Parameters trained at the peak learning rate throughout, outside the schedule's warmup
    /// and decay (SimSiam's predictor: "fix_pred_lr", Chen & He 2021, section 4.4).
    fn fixed_lr(&self, _name: &str) -> bool {
        false
    }

    /// Called after every optimiser update (`step` updates done of `total`): momentum-encoder
    /// and EMA-target updates go here, with their schedule.
    fn after_update(&self, _step: u64, _total: u64) -> candle_core::Result<()> {
        Ok(())
    }

    /// Adds derived metrics (perplexity from loss, say) to averaged eval metrics.
    fn finish_eval(&self, _metrics: &mut BTreeMap<String, f64>) {}
}

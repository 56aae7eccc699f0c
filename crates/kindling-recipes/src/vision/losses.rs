//! What the vision methods share: the projections of every view, the `SslLoss` trait each method implements, and the helpers they use (cosine, normalisation); `build_loss` picks a method's loss.

#[allow(unused_imports)]
use super::*;

/// What a method's loss sees: the online projections `z`, the predictions `p` (BYOL, SimSiam),
/// and the target network's projections `t` (BYOL, MoCo; detached), one per view.
pub struct Outputs {
    pub z: [Tensor; 2],
    pub p: Option<[Tensor; 2]>,
    pub t: Option<[Tensor; 2]>,
    pub train: bool,
    /// The data-parallel group, in training steps of a run over several ranks (losses that
    /// compare samples across the batch gather over it).
    pub group: Option<Arc<dyn Collective>>,
}

/// A method: its loss, and which parts of the model it needs.
pub trait SslLoss: Send + Sync {
    fn predictor(&self) -> bool {
        false
    }
    fn target(&self) -> bool {
        false
    }
    fn loss(&self, o: &Outputs) -> candle_core::Result<Tensor>;
    /// After each optimiser update (MoCo's enqueue).
    fn after_update(&self) -> candle_core::Result<()> {
        Ok(())
    }
}

/// Both views' projections over the whole data-parallel group, gathered with their gradient,
/// for losses made of batch statistics (Barlow Twins' cross-correlation, VICReg's variance and
/// covariance): every rank then computes the global batch's loss, each rank's rows receive the
/// sum of the ranks' (equal) gradients, and the trainer's average over ranks leaves exactly the
/// global batch's gradient. One process: the views as they are.
pub fn group_views(o: &Outputs) -> candle_core::Result<(Tensor, Tensor)> {
    match &o.group {
        Some(g) => Ok((
            gather_with_grad(&o.z[0], g.clone())?,
            gather_with_grad(&o.z[1], g.clone())?,
        )),
        None => Ok((o.z[0].clone(), o.z[1].clone())),
    }
}

pub use kindling_models::ops::l2_normalize;

/// -cos(p, z), averaged over the batch (SimSiam's D).
pub fn negative_cosine(p: &Tensor, z: &Tensor) -> candle_core::Result<Tensor> {
    (l2_normalize(p)? * l2_normalize(z)?)?
        .sum(1)?
        .mean_all()?
        .neg()
}

pub(super) fn build_loss(
    recipe: &VisionRecipe,
    proj_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Box<dyn SslLoss>> {
    let l = &recipe.loss;
    Ok(match recipe.objective.as_str() {
        "simclr" => Box::new(simclr::SimClr {
            temperature: l.temperature,
        }),
        "moco" => Box::new(moco::MoCo::new(l.temperature, l.queue_size, proj_dim, vb)?),
        "byol" => Box::new(byol::Byol),
        "simsiam" => Box::new(simsiam::SimSiam),
        "barlow" => Box::new(barlow::BarlowTwins {
            lambda: l.lambda.unwrap_or(1.0 / proj_dim as f64),
            scale: l.scale,
        }),
        "vicreg" => Box::new(vicreg::VicReg {
            sim_weight: l.sim_weight,
            var_weight: l.var_weight,
            cov_weight: l.cov_weight,
        }),
        other => candle_core::bail!("unknown vision objective {other}"),
    })
}

/// The `[loss]` keys each method reads; a recipe that sets another is an error naming these
/// (a `queue_size` in a SimCLR recipe would otherwise be silently ignored).
pub fn loss_keys(method: &str) -> &'static [&'static str] {
    match method {
        "simclr" => &["temperature"],
        "moco" => &["temperature", "queue_size", "ema_base", "ema_final"],
        "byol" => &["ema_base", "ema_final", "fix_predictor_lr"],
        "simsiam" => &["fix_predictor_lr"],
        "barlow" => &["lambda", "scale"],
        "vicreg" => &["sim_weight", "var_weight", "cov_weight"],
        _ => &[],
    }
}

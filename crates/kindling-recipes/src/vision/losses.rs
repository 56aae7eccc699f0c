//! What the vision methods share: the projections of every view, the `SslLoss` trait each method implements, and the helpers they use (cosine, normalisation); [`LossConfig`] holds a method's settings and builds its loss.

#[allow(unused_imports)]
use super::*;

/// What a method's loss sees: the online projections `z`, the predictions `p` (BYOL, SimSiam),
/// one per view, and the target network's projections `t` (BYOL, MoCo, DINO; detached) of the
/// first [`SslLoss::target_views`] views. The two-view methods get exactly two views.
pub struct Outputs {
    pub z: Vec<Tensor>,
    pub p: Option<Vec<Tensor>>,
    pub t: Option<Vec<Tensor>>,
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
    /// The views the target network sees, the first ones (`None`: all; DINO's teacher sees the
    /// global crops only).
    fn target_views(&self) -> Option<usize> {
        None
    }
    /// Whether a VarMap entry the loss made is state the optimiser leaves alone (MoCo's
    /// queue, DINO's centre), not a parameter.
    fn is_state(&self, _name: &str) -> bool {
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

/// `[loss]`: the method's own settings, one type per method (the recipe's `objective` says
/// which), so a key meant for another method is an error naming this method's keys. Written
/// back (recipe.toml) as the method's keys alone.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(untagged)]
pub enum LossConfig {
    SimClr(simclr::Settings),
    MoCo(moco::Settings),
    Byol(byol::Settings),
    SimSiam(simsiam::Settings),
    Barlow(barlow::Settings),
    VicReg(vicreg::Settings),
    Mae(mae::Settings),
    Dino(dino::Settings),
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig::SimClr(Default::default())
    }
}

impl LossConfig {
    /// The method's defaults.
    pub fn default_for(method: &str) -> Option<Self> {
        Some(match method {
            "simclr" => LossConfig::SimClr(Default::default()),
            "moco" => LossConfig::MoCo(Default::default()),
            "byol" => LossConfig::Byol(Default::default()),
            "simsiam" => LossConfig::SimSiam(Default::default()),
            "barlow" => LossConfig::Barlow(Default::default()),
            "vicreg" => LossConfig::VicReg(Default::default()),
            "mae" => LossConfig::Mae(Default::default()),
            "dino" => LossConfig::Dino(Default::default()),
            _ => return None,
        })
    }

    /// `[loss]` of a `method` recipe (`table` as the file gives it), its values checked.
    /// Errors name `loss.KEY`, the method and its keys.
    ///
    /// Run folders written before the settings were split hold every method's keys at their
    /// defaults: a key of another method at that method's default changes nothing and is
    /// dropped, so those folders still resume and export.
    pub fn from_table(
        method: &str,
        mut table: toml::Table,
        path: &Path,
    ) -> Result<Self, RecipeError> {
        let mine = Self::default_for(method).ok_or_else(|| RecipeError::Key {
            path: path.to_path_buf(),
            key: "objective".into(),
            msg: format!("`{method}` is not a vision method"),
        })?;
        let keys = mine.keys();
        table.retain(|k, v| {
            keys.contains(&k.as_ref())
                || !crate::registry::names_of(crate::registry::Family::Vision)
                    .iter()
                    .filter_map(|m| Self::default_for(m))
                    .any(|d| d.table().get(k) == Some(v))
        });
        let err = |key: &str, msg: String| RecipeError::Key {
            path: path.to_path_buf(),
            key: format!("loss.{key}"),
            msg,
        };
        if let Some(k) = table.keys().find(|k| !keys.contains(&k.as_ref())) {
            return Err(err(
                k,
                format!(
                    "`{k}` is not a setting of {method}; its [loss] keys are: {}",
                    if keys.is_empty() {
                        "(none)".to_string()
                    } else {
                        keys.join(", ")
                    }
                ),
            ));
        }
        fn typed<T: serde::de::DeserializeOwned>(t: toml::Table) -> Result<T, (String, String)> {
            serde_path_to_error::deserialize(toml::Value::Table(t))
                .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
        }
        let parsed = match mine {
            LossConfig::SimClr(_) => typed(table).map(LossConfig::SimClr),
            LossConfig::MoCo(_) => typed(table).map(LossConfig::MoCo),
            LossConfig::Byol(_) => typed(table).map(LossConfig::Byol),
            LossConfig::SimSiam(_) => typed(table).map(LossConfig::SimSiam),
            LossConfig::Barlow(_) => typed(table).map(LossConfig::Barlow),
            LossConfig::VicReg(_) => typed(table).map(LossConfig::VicReg),
            LossConfig::Mae(_) => typed(table).map(LossConfig::Mae),
            LossConfig::Dino(_) => typed(table).map(LossConfig::Dino),
        }
        .map_err(|(k, msg)| err(&k, msg))?;
        parsed.check().map_err(|(k, msg)| err(k, msg))?;
        Ok(parsed)
    }

    /// The keys this method reads.
    pub fn keys(&self) -> Vec<&'static str> {
        match self {
            LossConfig::SimClr(_) => vec!["temperature"],
            LossConfig::MoCo(_) => vec!["temperature", "queue_size", "ema_base", "ema_final"],
            LossConfig::Byol(_) => vec!["ema_base", "ema_final", "fix_predictor_lr"],
            LossConfig::SimSiam(_) => vec!["fix_predictor_lr"],
            LossConfig::Barlow(_) => vec!["lambda", "scale"],
            LossConfig::VicReg(_) => vec!["sim_weight", "var_weight", "cov_weight"],
            LossConfig::Mae(_) => vec![
                "mask_ratio",
                "norm_pix_loss",
                "decoder_hidden_size",
                "decoder_num_hidden_layers",
                "decoder_num_attention_heads",
                "decoder_intermediate_size",
            ],
            LossConfig::Dino(_) => vec![
                "out_dim",
                "student_temperature",
                "teacher_temperature",
                "warmup_teacher_temperature",
                "warmup_teacher_temperature_steps",
                "center_momentum",
                "global_views",
                "ema_base",
                "ema_final",
                "norm_last_layer",
                "freeze_last_layer_steps",
            ],
        }
    }

    fn table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("loss settings serialise")
    }

    /// Each value in its range (`Err((key, what was expected))`).
    fn check(&self) -> Result<(), (&'static str, String)> {
        match self {
            LossConfig::SimClr(s) => s.check(),
            LossConfig::MoCo(s) => s.check(),
            LossConfig::Byol(s) => s.check(),
            LossConfig::SimSiam(_) => Ok(()),
            LossConfig::Barlow(s) => s.check(),
            LossConfig::VicReg(s) => s.check(),
            LossConfig::Mae(s) => s.check(),
            LossConfig::Dino(s) => s.check(),
        }
    }

    /// The target network's momentum schedule, (base, final) (methods with a target network).
    pub fn ema(&self) -> (f64, f64) {
        match self {
            LossConfig::MoCo(s) => (s.ema_base, s.ema_final),
            LossConfig::Byol(s) => (s.ema_base, s.ema_final),
            LossConfig::Dino(s) => (s.ema_base, s.ema_final),
            _ => (0.99, 1.0),
        }
    }

    /// The predictor stays at the peak learning rate (methods with a predictor).
    pub fn fix_predictor_lr(&self) -> bool {
        match self {
            LossConfig::Byol(s) => s.fix_predictor_lr,
            LossConfig::SimSiam(s) => s.fix_predictor_lr,
            _ => false,
        }
    }

    /// DINO's settings (the one multi-crop method).
    pub fn dino(&self) -> Option<dino::Settings> {
        match *self {
            LossConfig::Dino(s) => Some(s),
            _ => None,
        }
    }

    /// MAE's settings, for the one method that reconstructs instead of comparing two views.
    pub fn mae(&self) -> Option<mae::Settings> {
        match *self {
            LossConfig::Mae(s) => Some(s),
            _ => None,
        }
    }

    /// The method's loss over projections of width `proj_dim`; `None` for MAE (its decoder is
    /// its loss, [`mae::MaeHead`]).
    pub fn build(
        &self,
        proj_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Option<Box<dyn SslLoss>>> {
        Ok(Some(match *self {
            LossConfig::SimClr(s) => Box::new(simclr::SimClr {
                temperature: s.temperature,
            }),
            LossConfig::MoCo(s) => {
                Box::new(moco::MoCo::new(s.temperature, s.queue_size, proj_dim, vb)?)
            }
            LossConfig::Byol(_) => Box::new(byol::Byol),
            LossConfig::SimSiam(_) => Box::new(simsiam::SimSiam),
            LossConfig::Barlow(s) => Box::new(barlow::BarlowTwins {
                lambda: s.lambda.unwrap_or(1.0 / proj_dim as f64),
                scale: s.scale,
            }),
            LossConfig::VicReg(s) => Box::new(vicreg::VicReg {
                sim_weight: s.sim_weight,
                var_weight: s.var_weight,
                cov_weight: s.cov_weight,
            }),
            LossConfig::Mae(_) => return Ok(None),
            LossConfig::Dino(s) => Box::new(dino::Dino::new(s, proj_dim, vb)?),
        }))
    }
}

/// `value` is finite and above 0.
pub(super) fn positive(key: &'static str, value: f64) -> Result<(), (&'static str, String)> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err((key, format!("must be finite and above 0, got {value}")))
    }
}

/// A momentum schedule: 0 <= base <= final <= 1.
pub(super) fn momentum(base: f64, end: f64) -> Result<(), (&'static str, String)> {
    if !(0.0..=1.0).contains(&base) {
        return Err(("ema_base", format!("must be in [0, 1], got {base}")));
    }
    if !(base..=1.0).contains(&end) {
        return Err((
            "ema_final",
            format!("must be in [ema_base, 1] = [{base}, 1], got {end}"),
        ));
    }
    Ok(())
}

//! Loading any Hugging Face BERT-family folder (config.json + model.safetensors; BERT and
//! RoBERTa): Kindling's own exports, base-model checkpoints without the `bert.`/`roberta.`
//! prefix (all-MiniLM-L6-v2), and the task models' (`BertForMaskedLM`,
//! `RobertaForSequenceClassification`, ...) with it.
//!
//! The weights go into a `VarMap`, so an imported model trains like a fresh one. Like HF's
//! `from_pretrained`, loading reports the model's tensors the file lacks (`missing`) and the
//! file's tensors the model does not use (`unused`: a pooler, an MLM head, a classifier).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::bert::{BertConfig, BertModel};
use crate::{ModelError, Result};

/// Which of the model's tensors were not in the file, and which of the file's were not used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyReport {
    pub missing: Vec<String>,
    pub unused: Vec<String>,
}

/// A BERT encoder loaded from a folder, trainable.
pub struct ImportedBert {
    pub model: BertModel,
    pub config: BertConfig,
    pub varmap: VarMap,
    /// `"bert."` (`"roberta."`) when the file's names carry the prefix of HF's task models,
    /// else `""`.
    pub prefix: String,
    pub report: KeyReport,
}

/// An encoder of any supported architecture loaded from a folder, trainable.
pub struct ImportedEncoder {
    pub model: crate::Encoder,
    pub config: crate::EncoderConfig,
    pub varmap: VarMap,
    /// The task models' prefix (`"bert."`, `"roberta."`, `"model."`) when the file's names
    /// carry it, else `""`.
    pub prefix: String,
    pub report: KeyReport,
}

/// Loads the encoder of the folder `dir` (BERT, RoBERTa or ModernBERT, by `model_type`), as
/// [`load_bert`] does for BERT.
pub fn load_encoder(dir: &Path, device: &Device) -> Result<ImportedEncoder> {
    let config = read_encoder_config(dir)?;
    let (path, tensors) = read_weights(dir, device)?;
    let name = config.prefix();
    let prefix = if tensors.keys().any(|k| k.starts_with(&format!("{name}."))) {
        format!("{name}.")
    } else {
        String::new()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let vb = if prefix.is_empty() { vb } else { vb.pp(name) };
    let model = crate::Encoder::load(vb, &config)?;
    let report = copy_tensors(&varmap, &tensors, &path)?;
    check_complete(&report, path)?;
    Ok(ImportedEncoder {
        model,
        config,
        varmap,
        prefix,
        report,
    })
}

/// A loaded encoder with missing tensors would only look loaded.
fn check_complete(report: &KeyReport, path: PathBuf) -> Result<()> {
    if report.missing.is_empty() {
        return Ok(());
    }
    Err(ModelError::File {
        path,
        msg: format!(
            "the encoder's tensors {:?} are missing{}",
            &report.missing[..report.missing.len().min(5)],
            if report.missing.len() > 5 {
                " (and more)"
            } else {
                ""
            }
        ),
    })
}

/// Buffers HF writes beside the weights (not parameters).
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("token_type_ids")
}

/// Reads `config.json` as an HF `BertConfig`.
pub fn read_config(dir: &Path) -> Result<BertConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::File {
        path: path.clone(),
        msg: format!("not a BERT config: {e}"),
    })?;
    cfg.validate().map_err(|e| ModelError::File {
        path,
        msg: e.to_string(),
    })?;
    Ok(cfg)
}

/// Reads `config.json` as any supported encoder's config (by `model_type`).
pub fn read_encoder_config(dir: &Path) -> Result<crate::EncoderConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::File {
        path: path.clone(),
        msg: format!("not JSON: {e}"),
    })?;
    crate::EncoderConfig::from_json(value).map_err(|e| ModelError::File {
        path,
        msg: e.to_string(),
    })
}

/// Loads the encoder of the BERT folder `dir`. Missing encoder tensors are an error (an encoder
/// with random layers would only look loaded); unused ones are reported.
pub fn load_bert(dir: &Path, device: &Device) -> Result<ImportedBert> {
    let e = load_encoder(dir, device)?;
    let (crate::Encoder::Bert(model), crate::EncoderConfig::Bert(config)) = (e.model, e.config)
    else {
        return Err(ModelError::File {
            path: dir.join("config.json"),
            msg: "not a BERT or RoBERTa folder".into(),
        });
    };
    Ok(ImportedBert {
        model,
        config,
        varmap: e.varmap,
        prefix: e.prefix,
        report: e.report,
    })
}

/// Copies the tensors of `tensors` (read from `path`) into the variables of `varmap` with the
/// same name, or, for a `bert.`- (`roberta.`-) prefixed variable, the unprefixed name (HF's
/// base `BertModel` checkpoints, such as all-MiniLM-L6-v2, carry no prefix). A shape that differs from the
/// model's is an error; names on either side without a partner are reported.
pub fn copy_tensors(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<KeyReport> {
    let mut report = KeyReport::default();
    let mut used = BTreeSet::new();
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        // HF's task models hold the encoder as `bert.`, `roberta.` or (ModernBERT) `model.`.
        let unprefixed = crate::bert::Flavour::NAMES
            .iter()
            .chain(&["model"])
            .find_map(|p| name.strip_prefix(p)?.strip_prefix('.'));
        let found = [Some(name.as_str()), unprefixed]
            .into_iter()
            .flatten()
            .find_map(|n| tensors.get(n).map(|t| (n, t)));
        match found {
            Some((key, t)) if t.dims() == data[name].dims() => {
                data[name].set(&t.to_dtype(DType::F32)?)?;
                used.insert(key.to_string());
            }
            Some((key, t)) => {
                return Err(ModelError::File {
                    path: path.to_path_buf(),
                    msg: format!(
                        "`{key}` has shape {:?}, the model (config.json) needs {:?}",
                        t.dims(),
                        data[name].dims()
                    ),
                })
            }
            None => report.missing.push(name.clone()),
        }
    }
    report.unused = tensors
        .keys()
        .filter(|k| !used.contains(*k) && !is_buffer(k))
        .cloned()
        .collect();
    report.unused.sort();
    Ok(report)
}

/// Reads `dir/model.safetensors`.
pub fn read_weights(dir: &Path, device: &Device) -> Result<(PathBuf, HashMap<String, Tensor>)> {
    let path = dir.join("model.safetensors");
    if !path.is_file() {
        return Err(ModelError::File {
            path,
            msg: "no such file (a BERT folder needs config.json and model.safetensors)".into(),
        });
    }
    let tensors = candle_core::safetensors::load(&path, device).map_err(|e| ModelError::File {
        path: path.clone(),
        msg: format!("not a readable safetensors file: {e}"),
    })?;
    Ok((path, tensors))
}

/// Sentence embeddings from the last hidden states `(tokens, hidden)` of one sequence: the mean
/// over tokens (`mean`) or the `[CLS]` vector, L2-normalised when `normalize`.
pub fn pool(hidden: &Tensor, mean: bool, normalize: bool) -> Result<Tensor> {
    let v = if mean {
        hidden.mean(0)?
    } else {
        hidden.get(0)?
    };
    if !normalize {
        return Ok(v);
    }
    let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12);
    Ok((v / norm as f64)?)
}

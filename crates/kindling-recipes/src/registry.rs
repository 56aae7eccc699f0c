//! The one list of what a recipe can name: pretraining objectives (`objective = "..."`) and
//! downstream tasks (`task = "..."`), each with the module that runs it. `kindling pretrain`,
//! `finetune`, `probe`, `export` and `prepare` dispatch through it, the CLI's help lists it, and
//! an unknown name is an error that lists it. A new objective adds its module and one line here.

use crate::RecipeError;

/// The module that runs an entry: what a recipe of this name is parsed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `bert_mlm`: masked-language-model pretraining ([`crate::Recipe`]).
    MaskedLm,
    /// `simcse`: contrastive sentence embeddings ([`crate::simcse::SimcseRecipe`]).
    Simcse,
    /// `vision`: two-view image SSL on a ResNet ([`crate::vision::VisionRecipe`]).
    Vision,
    /// `finetune`: a text classifier from an export ([`crate::finetune::FinetuneRecipe`]).
    TextClassification,
    /// `vision::probe`: linear probes of an image encoder ([`crate::vision::probe`]).
    ImageProbe,
}

/// Whether an entry is named by `objective` (pretraining) or `task` (downstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Objective,
    Task,
}

/// One name a recipe can give.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub kind: Kind,
    pub family: Family,
    /// One line for `--help` and the docs.
    pub summary: &'static str,
    /// `kindling prepare` tokenises its corpus into shards.
    pub prepares: bool,
}

const fn objective(name: &'static str, family: Family, summary: &'static str) -> Entry {
    Entry {
        name,
        kind: Kind::Objective,
        family,
        summary,
        prepares: matches!(family, Family::MaskedLm),
    }
}

const fn task(name: &'static str, family: Family, summary: &'static str) -> Entry {
    Entry {
        name,
        kind: Kind::Task,
        family,
        summary,
        prepares: false,
    }
}

/// Every objective and task.
pub const REGISTRY: &[Entry] = &[
    objective(
        "bert-mlm",
        Family::MaskedLm,
        "BERT masked-language modelling (dynamic masks, whole-word option)",
    ),
    objective(
        "simcse",
        Family::Simcse,
        "SimCSE sentence embeddings (unsupervised dropout views or supervised pairs)",
    ),
    objective(
        "simclr",
        Family::Vision,
        "SimCLR: NT-Xent over two augmented views",
    ),
    objective(
        "moco",
        Family::Vision,
        "MoCo v2: momentum encoder and a queue of negatives",
    ),
    objective(
        "byol",
        Family::Vision,
        "BYOL: predictor and momentum target, no negatives",
    ),
    objective(
        "simsiam",
        Family::Vision,
        "SimSiam: predictor and stop-gradient",
    ),
    objective(
        "barlow",
        Family::Vision,
        "Barlow Twins: cross-correlation to the identity",
    ),
    objective(
        "vicreg",
        Family::Vision,
        "VICReg: variance, invariance, covariance",
    ),
    objective(
        "mae",
        Family::Vision,
        "MAE: a ViT reconstructs the pixels of hidden patches",
    ),
    objective(
        "dino",
        Family::Vision,
        "DINO: self-distillation over global and local crops",
    ),
    task(
        "sequence-classification",
        Family::TextClassification,
        "fine-tune (or probe) a text classifier from an export",
    ),
    task(
        "image-classification",
        Family::ImageProbe,
        "linear probes of a vision export",
    ),
];

/// The names of one kind, in registry order.
pub fn names(kind: Kind) -> Vec<&'static str> {
    REGISTRY
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.name)
        .collect()
}

/// The names of one family.
pub fn names_of(family: Family) -> Vec<&'static str> {
    REGISTRY
        .iter()
        .filter(|e| e.family == family)
        .map(|e| e.name)
        .collect()
}

/// The entry `name` names as `kind`, or an error listing the known names (`key` is the recipe
/// key that gave it: `objective` or `task`).
pub fn lookup(kind: Kind, name: &str) -> Result<&'static Entry, RecipeError> {
    let key = match kind {
        Kind::Objective => "objective",
        Kind::Task => "task",
    };
    REGISTRY
        .iter()
        .find(|e| e.kind == kind && e.name == name)
        .ok_or_else(|| RecipeError::Invalid {
            key: key.into(),
            msg: format!("unknown {key} `{name}`; known: {}", names(kind).join(", ")),
        })
}

/// The registry as a help text: a line per entry.
pub fn help() -> String {
    let mut s = String::from("Objectives (objective = \"...\" in a pretraining recipe):\n");
    let line = |e: &Entry| format!("  {:<26}{}\n", e.name, e.summary);
    for e in REGISTRY.iter().filter(|e| e.kind == Kind::Objective) {
        s += &line(e);
    }
    s += "Tasks (task = \"...\" in a fine-tuning or probe recipe):\n";
    for e in REGISTRY.iter().filter(|e| e.kind == Kind::Task) {
        s += &line(e);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_listed_once_and_unknown_ones_list_the_known() {
        let mut all: Vec<(Kind, &str)> = REGISTRY.iter().map(|e| (e.kind, e.name)).collect();
        let n = all.len();
        all.sort_by_key(|(k, n)| (*k as u8, *n));
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(
            lookup(Kind::Objective, "moco").unwrap().family,
            Family::Vision
        );
        let e = lookup(Kind::Objective, "not-a-method")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("objective") && e.contains("bert-mlm, simcse, simclr"),
            "{e}"
        );
        assert!(help().contains("vicreg"));
    }
}

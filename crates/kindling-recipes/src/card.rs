//! The model card (`README.md` with YAML front matter) that the Hub shows for an export.

use std::collections::BTreeMap;

/// What a card says about a masked-LM export.
pub struct CardInfo<'a> {
    pub name: &'a str,
    pub license: &'a str,
    pub pipeline_tag: &'a str,
    pub datasets: Vec<String>,
    pub corpus: &'a [String],
    pub architecture: String,
    /// HF's class (`BertForMaskedLM`), as the card says to load it.
    pub class: String,
    /// The architecture's tag on the Hub (`bert`, `roberta`).
    pub tag: &'a str,
    /// Continued pretraining: where it started (the log's line); `None`: from scratch.
    pub start: Option<String>,
    /// The Hub repo it continued, for the card's `base_model`.
    pub base_model: Option<String>,
    /// Continued pretraining: the starting model's eval scores.
    pub initial: &'a BTreeMap<String, f64>,
    pub params: usize,
    pub recipe_toml: &'a str,
    pub eval: &'a BTreeMap<String, f64>,
    pub baseline: Option<(String, f64)>,
    pub steps: u64,
}

fn yaml_str(s: &str) -> String {
    // Double-quoted YAML scalars accept JSON string escapes.
    serde_json::to_string(s).expect("strings serialise")
}

pub fn render(c: &CardInfo) -> String {
    let mut s = String::from("---\n");
    s += &format!("license: {}\n", yaml_str(c.license));
    s += "library_name: transformers\n";
    s += &format!("pipeline_tag: {}\n", c.pipeline_tag);
    if let Some(b) = &c.base_model {
        s += &format!("base_model: {}\n", yaml_str(b));
    }
    s += &format!(
        "tags:\n  - kindling\n  - {}\n  - masked-lm\n  - self-supervised\n",
        c.tag
    );
    if !c.datasets.is_empty() {
        s += "datasets:\n";
        for d in &c.datasets {
            s += &format!("  - {}\n", yaml_str(d));
        }
    }
    s += "---\n\n";
    s += &format!("# {}\n\n", c.name);
    let how = match &c.start {
        None => "pretrained from scratch with".to_string(),
        Some(start) => format!("{start}, then trained further with"),
    };
    s += &format!(
        "A {} ({:.2}M parameters) {how} masked language modelling by \
         [Kindling](https://github.com/) for {} steps. It loads with `transformers` \
         (`{}.from_pretrained(dir)`) and with candle-transformers' `BertModel`.\n\n",
        c.architecture,
        c.params as f64 / 1e6,
        c.steps,
        c.class,
    );
    s += "## Training data\n\n";
    for p in c.corpus {
        s += &format!("- `{p}`\n");
    }
    s += "\n## Evaluation (held-out blocks, masked positions)\n\n| metric | value |\n|---|---|\n";
    for (k, v) in c.eval {
        s += &format!("| {k} | {v:.4} |\n");
    }
    for (k, v) in c.initial {
        s += &format!("| {k} before training (the starting model) | {v:.4} |\n");
    }
    if let Some((label, v)) = &c.baseline {
        s += &format!("| {label} | {v:.4} |\n");
    }
    s += "\n## Recipe\n\n```toml\n";
    s += c.recipe_toml;
    s += "```\n";
    s
}

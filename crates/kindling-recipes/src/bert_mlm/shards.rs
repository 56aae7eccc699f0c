//! Token shards for a masked-LM recipe: `kindling prepare`, and opening the prepared splits as blocks.

#[allow(unused_imports)]
use super::*;

/// Prepares (or reuses) the recipe's token shards and opens their train and eval splits.
pub(super) fn shard_blocks(
    recipe: &Recipe,
    cfg: &kindling_data::PrepareConfig,
    tokenizer: &Tokenizer,
    specials: &kindling_data::SpecialTokens,
) -> Result<(ShardBlocks, ShardBlocks), RecipeError> {
    let report = prepare_shards(recipe, cfg, tokenizer, specials)?;
    let open = |split: &str| -> Result<ShardBlocks, RecipeError> {
        Ok(ShardBlocks::new(
            ShardStream::open(&cfg.dir, split)?,
            recipe.data.seq_len,
            specials,
        )?)
    };
    let (train, eval) = (open("train")?, open("eval")?);
    if eval.is_empty() && recipe.data.eval_fraction > 0.0 {
        return Err(RecipeError::Invalid {
            key: "data.eval_fraction".into(),
            msg: format!(
                "the eval split of {} holds {} tokens, less than one block of {}",
                cfg.dir.display(),
                report.manifest.eval.tokens,
                recipe.data.seq_len
            ),
        });
    }
    Ok((train, eval))
}

/// `kindling prepare RECIPE`: builds the recipe's tokenizer (trained ones come from the same
/// cache `pretrain` uses, so both see the same vocabulary) and prepares its token shards.
pub fn prepare_recipe(recipe: &Recipe) -> Result<kindling_data::PrepareReport, RecipeError> {
    let Some(cfg) = &recipe.data.prepare else {
        return Err(RecipeError::Invalid {
            key: "data.prepare".into(),
            msg: "the recipe packs its corpus in memory; give [data.prepare] dir = \"...\" to \
                  stream it from token shards"
                .into(),
        });
    };
    let corpus = if trains_tokenizer(recipe) {
        recipe.read_corpus()?
    } else {
        Corpus::default()
    };
    let tokenizer = build_tokenizer(recipe, &corpus)?;
    drop(corpus);
    let specials = tok::special_tokens(&tokenizer)?;
    prepare_shards(recipe, cfg, &tokenizer, &specials)
}

/// `kindling prepare`, and the first step of a recipe with `[data.prepare]`: tokenises the
/// corpus into shards (with a progress bar and a summary), or reuses them when nothing changed.
pub fn prepare_shards(
    recipe: &Recipe,
    cfg: &kindling_data::PrepareConfig,
    tokenizer: &Tokenizer,
    specials: &kindling_data::SpecialTokens,
) -> Result<kindling_data::PrepareReport, RecipeError> {
    let sources = kindling_data::corpus::resolve_patterns(&recipe.data.corpus, Path::new("."))?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "prepare {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("template parses"),
    );
    let report = kindling_data::shards::prepare(
        &sources,
        tokenizer,
        specials,
        cfg,
        recipe.data.eval_fraction,
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    let m = &report.manifest;
    eprintln!(
        "prepare: {} ({}): {} files, {:.1} MB of text -> train {} documents, {} tokens in {} shards; \
         eval {} documents, {} tokens{}",
        cfg.dir.display(),
        if report.reused {
            "up to date, reused"
        } else {
            "prepared"
        },
        m.sources.len(),
        m.text_bytes as f64 / 1e6,
        m.train.documents,
        m.train.tokens,
        m.train.shards.len(),
        m.eval.documents,
        m.eval.tokens,
        if report.reused {
            String::new()
        } else {
            format!("; {:.1} s, {:.2} MB/s", report.seconds, report.mb_per_s())
        }
    );
    Ok(report)
}

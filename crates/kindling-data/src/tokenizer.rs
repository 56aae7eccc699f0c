//! Tokenizers: train a vocabulary on the corpus (WordPiece as BERT's, byte-level BPE as
//! RoBERTa's and ModernBERT's, or Unigram as ALBERT's and XLM-R's), or load an existing one
//! (`tokenizer.json`, a BERT `vocab.txt`, or a folder holding either).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Model, Tokenizer, TokenizerBuilder};

use crate::corpus::Corpus;
use crate::error::{DataError, Result};

/// `[data.tokenizer]`: exactly one of `train` or `path`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Train a vocabulary on the corpus.
    pub train: Option<TokenizerTraining>,
    /// Load `tokenizer.json`, `vocab.txt`, or a folder holding one of them.
    pub path: Option<PathBuf>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            train: Some(TokenizerTraining::default()),
            path: None,
        }
    }
}

/// Which subword model a trained tokenizer uses, each in its usual pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// BERT's: BertNormalizer, BertPreTokenizer, `##` continuations, `[CLS] x [SEP]`, specials
    /// `[PAD] [UNK] [CLS] [SEP] [MASK]`.
    #[default]
    Wordpiece,
    /// RoBERTa's byte-level BPE (GPT-2's bytes-to-characters, so no text is unknown): no
    /// normaliser, `<s> x </s>`, specials `<s> <pad> </s> <unk> <mask>` (ids 0-4, as roberta-base).
    Bpe,
    /// Unigram (Kudo, 2018) over NFKC text with SentencePiece's `▁` word marker, `<s> x </s>`,
    /// the same specials as BPE.
    Unigram,
}

/// Vocabulary training, as HF's tokenizers library offers it (`BertWordPieceTokenizer`,
/// `ByteLevelBPETokenizer`, `SentencePieceUnigramTokenizer`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerTraining {
    /// `"wordpiece"` (unset), `"bpe"` or `"unigram"`.
    #[serde(skip_serializing_if = "is_wordpiece")]
    pub kind: TokenizerKind,
    pub vocab_size: usize,
    /// Pairs (BPE) or words (WordPiece) seen fewer times are not merged; unused by Unigram.
    pub min_frequency: u64,
    /// Unset: true for WordPiece (uncased BERT), false for BPE and Unigram (cased, as RoBERTa).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lowercase: Option<bool>,
    /// Keep at most this many distinct characters. Unlimited makes a mixed-script corpus spend
    /// the whole vocabulary on single characters; 1000 is HF's default. Byte-level BPE's
    /// alphabet is the 256 bytes whatever this says.
    pub limit_alphabet: usize,
}

fn is_wordpiece(k: &TokenizerKind) -> bool {
    *k == TokenizerKind::Wordpiece
}

impl Default for TokenizerTraining {
    fn default() -> Self {
        TokenizerTraining {
            kind: TokenizerKind::Wordpiece,
            vocab_size: 8192,
            min_frequency: 2,
            lowercase: None,
            limit_alphabet: 1000,
        }
    }
}

impl TokenizerTraining {
    /// Whether the trained tokenizer lowercases.
    pub fn lowercases(&self) -> bool {
        self.lowercase
            .unwrap_or(self.kind == TokenizerKind::Wordpiece)
    }

    /// The settings as the cache key hashes them. For WordPiece exactly what earlier versions
    /// hashed, so their cached vocabularies stay in use (a retrained one could differ).
    fn cache_settings(&self) -> String {
        // Written out by hand: earlier versions hashed this struct's serde_json form, field by
        // field in this order (a json! map would sort the keys and change every key).
        let fields = format!(
            r#"{{"vocab_size":{},"min_frequency":{},"lowercase":{},"limit_alphabet":{}}}"#,
            self.vocab_size,
            self.min_frequency,
            self.lowercases(),
            self.limit_alphabet
        );
        match self.kind {
            TokenizerKind::Wordpiece => fields,
            _ => format!("{}:{fields}", self.cache_name()),
        }
    }

    fn cache_name(&self) -> &'static str {
        match self.kind {
            TokenizerKind::Wordpiece => "wordpiece",
            TokenizerKind::Bpe => "bpe",
            TokenizerKind::Unigram => "unigram",
        }
    }
}

/// The ids of the tokens a masked LM needs to know about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
    /// Every special token id (never masked, never drawn as a random replacement).
    pub all: Vec<u32>,
}

impl TokenizerConfig {
    /// Builds the tokenizer this config describes; `base` resolves relative paths.
    ///
    /// A trained tokenizer is cached in `cache_dir` under a hash of the corpus text and the
    /// training settings, and reused from there. Besides saving the training time, the cache is
    /// what makes runs repeatable: the tokenizers crate's WordPiece trainer breaks ties through
    /// hash maps with per-process random keys, so two trainings on the same text can differ in
    /// a few tokens near the vocabulary cut-off.
    pub fn build(
        &self,
        corpus: &Corpus,
        base: &Path,
        cache_dir: Option<&Path>,
    ) -> Result<Tokenizer> {
        match (&self.train, &self.path) {
            (Some(t), None) => {
                let Some(cache_dir) = cache_dir else {
                    return train(corpus, t);
                };
                let key = corpus_fingerprint(corpus, &t.cache_settings());
                let name = t.cache_name();
                let cached = cache_dir.join(format!("{name}-{key:016x}.json"));
                if cached.is_file() {
                    return load(&cached);
                }
                let tk = train(corpus, t)?;
                std::fs::create_dir_all(cache_dir).map_err(|e| DataError::io(cache_dir, e))?;
                let tmp = cache_dir.join(format!(".{name}-{key:016x}.{}.tmp", std::process::id()));
                tk.save(&tmp, false).map_err(|e| DataError::TokenizerFile {
                    path: tmp.clone(),
                    msg: e.to_string(),
                })?;
                std::fs::rename(&tmp, &cached).map_err(|e| DataError::io(&cached, e))?;
                Ok(tk)
            }
            (None, Some(p)) => load(&base.join(p)),
            _ => Err(DataError::Config {
                key: "data.tokenizer",
                msg: "give exactly one of `train = {...}` or `path = \"...\"`".into(),
            }),
        }
    }
}

/// A 64-bit FNV-1a fingerprint of the corpus text (in corpus order) and a settings string.
fn corpus_fingerprint(corpus: &Corpus, settings: &str) -> u64 {
    let mut h = kindling_core::rng::Fnv64::default();
    for d in &corpus.documents {
        h.feed(d.text.as_bytes());
        h.feed(&[0xff]); // document separator: never valid inside UTF-8
    }
    h.feed(settings.as_bytes());
    h.finish()
}

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

type BertPipeline = tokenizers::TokenizerImpl<
    WordPiece,
    BertNormalizer,
    BertPreTokenizer,
    BertProcessing,
    WordPieceDecoder,
>;

/// BERT's pipeline around a WordPiece model: BertNormalizer (clean text, Chinese characters,
/// accents stripped with lowercasing), BertPreTokenizer, the WordPiece decoder. The `[CLS]` x `[SEP]`
/// post-processor is added once the special tokens' ids are known.
fn bert_pipeline(model: WordPiece, lowercase: bool) -> tokenizers::Result<BertPipeline> {
    TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(WordPieceDecoder::default()))
        .build()
}

/// Trains the tokenizer `cfg` describes on the corpus's paragraphs.
pub fn train(corpus: &Corpus, cfg: &TokenizerTraining) -> Result<Tokenizer> {
    if cfg.vocab_size < SPECIALS.len() + 1 {
        return Err(DataError::Config {
            key: "data.tokenizer.train.vocab_size",
            msg: format!(
                "must be more than {}, got {}",
                SPECIALS.len(),
                cfg.vocab_size
            ),
        });
    }
    match cfg.kind {
        TokenizerKind::Wordpiece => train_wordpiece(corpus, cfg),
        TokenizerKind::Bpe | TokenizerKind::Unigram => train_sentencepiece_style(corpus, cfg),
    }
}

/// RoBERTa's special tokens, in roberta-base's id order.
const ROBERTA_SPECIALS: [&str; 5] = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"];

/// Byte-level BPE or Unigram, each in its usual pipeline (see [`TokenizerKind`]), with
/// RoBERTa's `<s> x </s>` (pairs `<s> a </s></s> b </s>`) post-processor.
fn train_sentencepiece_style(corpus: &Corpus, cfg: &TokenizerTraining) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::unigram::{Unigram, UnigramTrainer};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::normalizers::{unicode::NFKC, utils::Lowercase, NormalizerWrapper, Sequence};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::processors::roberta::RobertaProcessing;

    let specials: Vec<AddedToken> = ROBERTA_SPECIALS
        .iter()
        // As roberta-base's: "<mask>" takes the space before it, so "a <mask>." masks " word".
        .map(|s| AddedToken::from(*s, true).lstrip(*s == "<mask>"))
        .collect();
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    let (model, mut trainer) = match cfg.kind {
        TokenizerKind::Bpe => (
            ModelWrapper::BPE(BPE::default()),
            TrainerWrapper::BpeTrainer(
                BpeTrainer::builder()
                    .vocab_size(cfg.vocab_size)
                    .min_frequency(cfg.min_frequency)
                    .special_tokens(specials)
                    .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                    .show_progress(false)
                    .build(),
            ),
        ),
        _ => {
            norms.push(NFKC.into());
            (
                ModelWrapper::Unigram(Unigram::default()),
                TrainerWrapper::UnigramTrainer(
                    UnigramTrainer::builder()
                        .vocab_size(cfg.vocab_size as u32)
                        .special_tokens(specials)
                        .unk_token(Some("<unk>".into()))
                        .show_progress(false)
                        .build()
                        .map_err(|e| DataError::Tokenizer(e.to_string()))?,
                ),
            )
        }
    };
    if cfg.lowercases() {
        norms.push(Lowercase.into());
    }
    let mut tk = Tokenizer::new(model);
    if !norms.is_empty() {
        tk.with_normalizer(Some(Sequence::new(norms)))
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    }
    let byte_level = cfg.kind == TokenizerKind::Bpe;
    if byte_level {
        let bl = ByteLevel::new(false, true, true);
        tk.with_pre_tokenizer(Some(bl));
        tk.with_decoder(Some(bl));
    } else {
        let ms = Metaspace::new('▁', PrependScheme::Always, true);
        tk.with_pre_tokenizer(Some(ms.clone()));
        tk.with_decoder(Some(ms));
    }
    let paragraphs = corpus.documents.iter().flat_map(|d| d.paragraphs());
    tk.train(&mut trainer, paragraphs)
        .map_err(|e| DataError::Tokenizer(format!("training {:?}: {e}", cfg.kind)))?;
    let id = |t: &str| tk.token_to_id(t).expect("special token was trained");
    let (bos, eos) = (id("<s>"), id("</s>"));
    tk.with_post_processor(Some(
        RobertaProcessing::new(("</s>".into(), eos), ("<s>".into(), bos))
            .trim_offsets(byte_level)
            .add_prefix_space(false),
    ));
    Ok(tk)
}

/// Trains a BERT-style WordPiece tokenizer (BertNormalizer, BertPreTokenizer, `[CLS]` x `[SEP]`).
fn train_wordpiece(corpus: &Corpus, cfg: &TokenizerTraining) -> Result<Tokenizer> {
    let mut trainer = WordPieceTrainer::builder()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .limit_alphabet(cfg.limit_alphabet)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .show_progress(false)
        .build();
    let mut tk = bert_pipeline(WordPiece::default(), cfg.lowercases())
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let paragraphs = corpus.documents.iter().flat_map(|d| d.paragraphs());
    tk.train(&mut trainer, paragraphs)
        .map_err(|e| DataError::Tokenizer(format!("training WordPiece: {e}")))?;
    let cls = tk.token_to_id("[CLS]").expect("special token was trained");
    let sep = tk.token_to_id("[SEP]").expect("special token was trained");
    tk.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(Tokenizer::from(tk))
}

/// Loads `tokenizer.json`, a BERT `vocab.txt`, or a folder holding either (tokenizer.json first).
pub fn load(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() {
        [path.join("tokenizer.json"), path.join("vocab.txt")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| DataError::TokenizerFile {
                path: path.into(),
                msg: "folder holds neither tokenizer.json nor vocab.txt".into(),
            })?
    } else {
        path.to_path_buf()
    };
    let bad = |msg: String| DataError::TokenizerFile {
        path: file.clone(),
        msg,
    };
    if !file.is_file() {
        return Err(bad("no such file".into()));
    }
    let mut tk = if file.extension().is_some_and(|e| e == "txt") {
        let wp = WordPiece::from_file(&file.to_string_lossy())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let cls = wp
            .token_to_id("[CLS]")
            .ok_or_else(|| bad("vocab has no [CLS]".into()))?;
        let sep = wp
            .token_to_id("[SEP]")
            .ok_or_else(|| bad("vocab has no [SEP]".into()))?;
        let mut tk = bert_pipeline(wp, true).map_err(|e| bad(e.to_string()))?;
        tk.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        Tokenizer::from(tk)
    } else {
        Tokenizer::from_file(&file).map_err(|e| bad(e.to_string()))?
    };
    // Packing decides lengths itself; a tokenizer.json that pads or truncates (MiniLM's pads
    // to 128) would corrupt the stream.
    tk.with_padding(None);
    tk.with_truncation(None).map_err(|e| bad(e.to_string()))?;
    Ok(tk)
}

/// Finds the special tokens by their conventional names (BERT's, then RoBERTa's).
pub fn special_tokens(tk: &Tokenizer) -> Result<SpecialTokens> {
    let find = |names: &[&str]| names.iter().find_map(|n| tk.token_to_id(n));
    let need = |names: &[&str]| {
        find(names)
            .ok_or_else(|| DataError::Tokenizer(format!("the vocabulary has none of {names:?}")))
    };
    let pad = need(&["[PAD]", "<pad>"])?;
    let unk = need(&["[UNK]", "<unk>"])?;
    let cls = need(&["[CLS]", "<s>"])?;
    let sep = need(&["[SEP]", "</s>"])?;
    let mask = need(&["[MASK]", "<mask>"])?;
    let mut all: Vec<u32> = tk
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .chain([pad, unk, cls, sep, mask])
        .collect();
    all.sort_unstable();
    all.dedup();
    Ok(SpecialTokens {
        pad,
        unk,
        cls,
        sep,
        mask,
        all,
    })
}

/// The vocabulary as `vocab.txt` lines, in id order. Fails if ids have gaps.
pub fn vocab_lines(tk: &Tokenizer) -> Result<Vec<String>> {
    let vocab: HashMap<String, u32> = tk.get_vocab(true);
    let mut by_id = vec![None; vocab.len()];
    for (tok, id) in vocab {
        match by_id.get_mut(id as usize) {
            Some(slot) => *slot = Some(tok),
            None => {
                return Err(DataError::Tokenizer(format!(
                    "vocabulary ids are not contiguous (id {id})"
                )))
            }
        }
    }
    by_id
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.ok_or_else(|| DataError::Tokenizer(format!("vocabulary has no token with id {i}")))
        })
        .collect()
}

/// Writes the HF tokenizer files of a model folder: tokenizer.json, tokenizer_config.json and
/// special_tokens_map.json, and for WordPiece BERT's vocab.txt (what `BertTokenizer` and
/// candle's examples read). A BPE or Unigram tokenizer is declared `PreTrainedTokenizerFast`,
/// which `AutoTokenizer` builds from tokenizer.json as it is, so its ids are Kindling's.
pub fn save_hf_files(
    tk: &Tokenizer,
    dir: &Path,
    lowercase: bool,
    model_max_length: usize,
) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| DataError::io(p, e);
    let tj = dir.join("tokenizer.json");
    tk.save(&tj, false).map_err(|e| DataError::TokenizerFile {
        path: tj.clone(),
        msg: e.to_string(),
    })?;
    let wordpiece = matches!(tk.get_model(), tokenizers::ModelWrapper::WordPiece(_));
    if wordpiece {
        let vocab = dir.join("vocab.txt");
        std::fs::write(&vocab, vocab_lines(tk)?.join("\n") + "\n").map_err(|e| io(&vocab, e))?;
    }
    let sp = special_tokens(tk)?;
    let name = |id: u32| tk.id_to_token(id).unwrap_or_default();
    let mut map = serde_json::json!({
        "cls_token": name(sp.cls), "mask_token": name(sp.mask), "pad_token": name(sp.pad),
        "sep_token": name(sp.sep), "unk_token": name(sp.unk),
    });
    if !wordpiece {
        // RoBERTa's <s> and </s> begin and end a sequence as well as standing for [CLS]/[SEP].
        map["bos_token"] = name(sp.cls).into();
        map["eos_token"] = name(sp.sep).into();
    }
    let p = dir.join("special_tokens_map.json");
    std::fs::write(&p, serde_json::to_string_pretty(&map).unwrap()).map_err(|e| io(&p, e))?;
    let mut cfg = map.clone();
    let obj = cfg.as_object_mut().unwrap();
    obj.insert("model_max_length".into(), model_max_length.into());
    if wordpiece {
        obj.insert("tokenizer_class".into(), "BertTokenizer".into());
        obj.insert("do_lower_case".into(), lowercase.into());
        obj.insert("clean_up_tokenization_spaces".into(), true.into());
        obj.insert("strip_accents".into(), serde_json::Value::Null);
        obj.insert("tokenize_chinese_chars".into(), true.into());
    } else {
        obj.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        obj.insert("clean_up_tokenization_spaces".into(), false.into());
    }
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).map_err(|e| io(&p, e))?;
    Ok(())
}

/// Whether the tokenizer lowercases (read from its BertNormalizer, if any).
pub fn lowercases(tk: &Tokenizer) -> bool {
    serde_json::to_value(tk.get_normalizer())
        .ok()
        .and_then(|v| v.get("lowercase").and_then(|l| l.as_bool()))
        .unwrap_or(false)
}

#[cfg(test)]
mod cache_key_tests {
    use super::*;

    #[test]
    fn a_wordpiece_cache_key_is_what_earlier_versions_hashed() {
        // Cached vocabularies are found by this string: changing it retrains every cached
        // tokenizer, and WordPiece training breaks ties differently in each process.
        assert_eq!(
            TokenizerTraining::default().cache_settings(),
            r#"{"vocab_size":8192,"min_frequency":2,"lowercase":true,"limit_alphabet":1000}"#
        );
        let bpe = TokenizerTraining {
            kind: TokenizerKind::Bpe,
            ..Default::default()
        };
        assert_eq!(
            bpe.cache_settings(),
            r#"bpe:{"vocab_size":8192,"min_frequency":2,"lowercase":false,"limit_alphabet":1000}"#
        );
    }
}

"""Kindling's MLM data path in Python, for the PyTorch-side scripts: paragraphs, one token
stream with [SEP] between files, concatenate-and-chunk packing into [CLS] ... [SEP] blocks, the
last 5% of blocks held out, and the add-one-smoothed unigram baseline of that split."""
import glob
import gzip
import math

CORPUS = ["datasets/janeausten/*.txt.gz", "datasets/mobydick/*.txt.gz"]


def paragraphs(text):
    out, cur = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            if cur:
                out.append(" ".join(cur))
                cur = []
        else:
            cur.append(line)
    if cur:
        out.append(" ".join(cur))
    return out


def split_blocks(tk, corpus=CORPUS, seq_len=128, eval_fraction=0.05):
    """(train blocks, held-out blocks) of token ids, as Kindling packs them."""
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    stream = []
    files = [f for pat in corpus for f in sorted(glob.glob(pat))]
    for i, f in enumerate(files):
        opener = gzip.open if f.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            text = fh.read()
        if i > 0 and stream:
            stream.append(sep)
        for enc in tk.encode_batch(paragraphs(text), add_special_tokens=False):
            stream.extend(enc.ids)
    body = seq_len - 2
    blocks = [[cls] + stream[b * body:(b + 1) * body] + [sep] for b in range(len(stream) // body)]
    n_eval = round(len(blocks) * eval_fraction)
    return blocks[: len(blocks) - n_eval], blocks[len(blocks) - n_eval:]


def special_ids(tk):
    return {tk.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")}


def unigram_baseline(tk, train, held):
    """Cross-entropy of the held-out tokens under the training split's add-one-smoothed token
    frequencies: the best a model that ignores context can do."""
    vocab = tk.get_vocab_size(with_added_tokens=True)
    specials = special_ids(tk)
    counts = [0] * vocab
    for b in train:
        for t in b:
            if t not in specials:
                counts[t] += 1
    total = sum(counts) + vocab
    ev = [t for b in held for t in b if t not in specials]
    return -sum(math.log((counts[t] + 1) / total) for t in ev) / len(ev)

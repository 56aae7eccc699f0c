"""Reference check: Kindling's fine-tuning input for sentence pairs is HF's
`tokenizer(a, b, truncation="longest_first", max_length=L)`: the same input_ids, and the same
token_type_ids where the tokenizer returns them.

    python tests/reference/hf_pair_encoding.py TOKENIZER_DIR KINDLING_PAIRS_JSON

KINDLING_PAIRS_JSON holds {"max_length": L, "pairs": [[a, b, ids, type_ids], ...]}, written by
the Rust test `pair_encoding_is_hfs_longest_first_on_the_reviews`. Exits 1 when any pair differs.
"""
import json
import sys

from transformers import AutoTokenizer

tok_dir, path = sys.argv[1], sys.argv[2]
ref = json.load(open(path))
tok = AutoTokenizer.from_pretrained(tok_dir)
bad, truncated = [], 0
for a, b, ids, types in ref["pairs"]:
    enc = tok(a, b, truncation="longest_first", max_length=ref["max_length"])
    theirs_types = enc.get("token_type_ids", [0] * len(enc["input_ids"]))
    truncated += len(enc["input_ids"]) == ref["max_length"]
    if enc["input_ids"] != ids or theirs_types != types:
        bad.append({"pair": [a, b], "kindling": [ids, types],
                    "transformers": [enc["input_ids"], theirs_types]})
print(json.dumps({"class": type(tok).__name__, "pairs": len(ref["pairs"]),
                  "at_max_length": truncated, "differ": len(bad), "first": bad[:2]}))
sys.exit(1 if bad else 0)

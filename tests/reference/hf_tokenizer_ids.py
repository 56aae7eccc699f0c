"""Reference check: an exported tokenizer loads in HF transformers' AutoTokenizer and gives
Kindling's ids, for single texts and pairs.

    python tests/reference/hf_tokenizer_ids.py EXPORT_DIR KINDLING_IDS_JSON

KINDLING_IDS_JSON holds {"single": [[text, [ids]], ...], "pairs": [[a, b, [ids]], ...]}
written by the Rust test `trained_tokenizers_give_transformers_ids_and_group_whole_words`.
Exits 1 on the first text whose ids differ.
"""
import json
import sys

from transformers import AutoTokenizer

export_dir, path = sys.argv[1], sys.argv[2]
ref = json.load(open(path))
tok = AutoTokenizer.from_pretrained(export_dir)
bad = []
for text, ids in ref["single"]:
    theirs = tok(text)["input_ids"]
    if theirs != ids:
        bad.append({"text": text, "kindling": ids, "transformers": theirs})
for a, b, ids in ref["pairs"]:
    theirs = tok(a, b)["input_ids"]
    if theirs != ids:
        bad.append({"pair": [a, b], "kindling": ids, "transformers": theirs})
print(json.dumps({"class": type(tok).__name__, "texts": len(ref["single"]) + len(ref["pairs"]),
                  "differ": bad[:3]}))
sys.exit(1 if bad else 0)

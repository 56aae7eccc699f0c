"""HF tokenizers' Python `encode_batch` throughput on the same text, for comparison with
`kindling prepare`: paragraphs of the first SAMPLE_MB of the corpus, in batches of 1000.

Usage: hf_tokenize.py TOKENIZER_JSON CORPUS_DIR SAMPLE_MB
"""
import glob
import os
import sys
import time

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
limit = float(sys.argv[3]) * 1e6
paras, size = [], 0
for path in sorted(glob.glob(os.path.join(sys.argv[2], "*.txt"))):
    for p in open(path, encoding="utf-8").read().split("\n\n"):
        p = " ".join(p.split())
        if p:
            paras.append(p)
            size += len(p.encode("utf-8"))
        if size >= limit:
            break
    if size >= limit:
        break
t0 = time.perf_counter()
tokens = 0
for i in range(0, len(paras), 1000):
    tokens += sum(len(e.ids) for e in tok.encode_batch(paras[i:i + 1000], add_special_tokens=False))
dt = time.perf_counter() - t0
print(f"HF tokenizers {tok.__class__.__module__} encode_batch: {size / 1e6:.1f} MB, {tokens} tokens in {dt:.1f} s: {size / 1e6 / dt:.2f} MB/s")

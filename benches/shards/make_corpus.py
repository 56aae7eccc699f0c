"""Makes a large text corpus from the shipped novels: their sentences, shuffled (seeded), in
paragraphs of 3-8 sentences, written as part-NNN.txt files until SIZE_MB of text.

Usage: make_corpus.py OUT_DIR SIZE_MB
"""
import glob
import gzip
import os
import random
import re
import sys

out, size_mb = sys.argv[1], float(sys.argv[2])
root = os.path.join(os.path.dirname(__file__), "..", "..", "datasets")
sentences = []
for path in sorted(glob.glob(os.path.join(root, "janeausten", "*.txt.gz")) + glob.glob(os.path.join(root, "mobydick", "*.txt.gz"))):
    text = gzip.open(path, "rt", encoding="utf-8").read()
    text = re.sub(r"\s+", " ", text)
    sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]
rng = random.Random(17)
os.makedirs(out, exist_ok=True)
target = int(size_mb * 1e6)
written, part = 0, 0
while written < target:
    rng.shuffle(sentences)
    with open(os.path.join(out, f"part-{part:03d}.txt"), "w", encoding="utf-8") as f:
        i, part_bytes = 0, 0
        while i < len(sentences) and part_bytes < 64e6 and written + part_bytes < target:
            k = rng.randint(3, 8)
            para = " ".join(sentences[i:i + k]) + "\n\n"
            f.write(para)
            part_bytes += len(para.encode("utf-8"))
            i += k
    written += part_bytes
    part += 1
print(f"{written / 1e6:.1f} MB in {part} files, {len(sentences)} distinct sentences")

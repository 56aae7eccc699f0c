"""Builds reviews-sts.tsv.gz, an STS-style table from reviews.tsv.gz: pairs of reviews of the
same `class_name` within one split, scored by how much their ratings agree
(score = 4 - |rating_a - rating_b|, 0..4). Seeded, so the file is reproducible:

    python3 datasets/womens-clothing-reviews/make_sts_pairs.py

Columns: split, sentence1, sentence2, score. 1,000 test pairs and 1,000 train pairs; half the
pairs are drawn with equal ratings, so every score level is well represented.
"""
import csv
import gzip
import random
from pathlib import Path

here = Path(__file__).parent
rng = random.Random(17)
rows = list(csv.DictReader(gzip.open(here / "reviews.tsv.gz", "rt", encoding="utf-8"), delimiter="\t"))
out = []
for split in ["train", "test"]:
    by_class = {}
    for r in rows:
        if r["split"] == split and r["text"].strip():
            by_class.setdefault(r["class_name"], []).append(r)
    groups = [g for g in by_class.values() if len(g) >= 2]
    weights = [len(g) for g in groups]
    pairs = []
    while len(pairs) < 1000:
        g = rng.choices(groups, weights)[0]
        a, b = rng.sample(g, 2)
        if len(pairs) % 2 == 0 and a["rating"] != b["rating"]:
            continue
        score = 4 - abs(int(a["rating"]) - int(b["rating"]))
        pairs.append((split, a["text"].strip(), b["text"].strip(), score))
    out.extend(pairs)
import io
text = io.StringIO()
w = csv.writer(text, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
w.writerow(["split", "sentence1", "sentence2", "score"])
w.writerows(out)
# mtime 0: the same bytes on every run.
with gzip.GzipFile(here / "reviews-sts.tsv.gz", "wb", mtime=0) as f:
    f.write(text.getvalue().encode("utf-8"))
print(f"{len(out)} pairs")

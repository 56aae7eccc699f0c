"""Reference check for Kindling's embedding evaluators: STS (Spearman and Pearson of cosine
similarity against gold scores, as sentence-transformers' EmbeddingSimilarityEvaluator, with
scipy.stats) and retrieval (recall@k, MRR, nDCG@10 with each query's own row as its one relevant
document, with numpy and sklearn.metrics.ndcg_score).

    python tests/reference/embedding_scores.py KINDLING_SCORES_JSON

The JSON (written by the Rust test `embedding_scores_match_scipy_and_sklearn`) holds the
vectors ("sts_a", "sts_b", "gold", "queries", "docs", "k") and Kindling's "scores". Exits 1 when
any score differs by more than 1e-6.
"""
import json
import sys

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import ndcg_score

ref = json.load(open(sys.argv[1]))
unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
a, b = unit(np.array(ref["sts_a"], dtype=np.float64)), unit(np.array(ref["sts_b"], dtype=np.float64))
cos = (a * b).sum(1)
want = {
    "sts_spearman": spearmanr(cos, ref["gold"]).statistic,
    "sts_pearson": pearsonr(cos, ref["gold"]).statistic,
}
q, d = unit(np.array(ref["queries"], dtype=np.float64)), unit(np.array(ref["docs"], dtype=np.float64))
sim = q @ d.T
own = np.diag(sim)
# Documents at least as similar as the query's own (itself excluded): rank - 1.
above = (sim >= own[:, None]).sum(1) - 1
for k in ref["k"]:
    want[f"recall_at_{k}"] = float((above < k).mean())
want["mrr"] = float((1.0 / (above + 1)).mean())
want["ndcg_at_10"] = float(ndcg_score(np.eye(len(q)), sim, k=10))
got = ref["scores"]
diff = {k: abs(got[k] - v) for k, v in want.items()}
print(json.dumps({"reference": want, "diff": diff, "max_abs_diff": max(diff.values())}))
sys.exit(1 if max(diff.values()) > 1e-6 else 0)

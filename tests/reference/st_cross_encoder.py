"""Reference check: a fine-tuned pair classifier or regressor loads in sentence-transformers as a
CrossEncoder, and its raw scores on the same sentence pairs are Kindling's logits.

    python tests/reference/st_cross_encoder.py EXPORT_DIR KINDLING_LOGITS_JSON

KINDLING_LOGITS_JSON holds "pairs" ([[a, b], ...]) and Kindling's "logits" for them, written by
tests/downstream.rs (`check_with_transformers`). CrossEncoder tokenises the pairs itself
(`tokenizer(a, b)`, as Kindling's pair encoding). Exits 1 when the scores differ by more than
1e-4.
"""
import json
import sys

import numpy as np
import torch
from sentence_transformers import CrossEncoder

export_dir, path = sys.argv[1], sys.argv[2]
ref = json.load(open(path))
model = CrossEncoder(export_dir, device="cpu")
scores = model.predict([tuple(p) for p in ref["pairs"]], activation_fn=torch.nn.Identity())
scores = np.asarray(scores, dtype=np.float64).reshape(len(ref["pairs"]), -1)
diff = float(np.abs(scores - np.asarray(ref["logits"], dtype=np.float64)).max())
print(json.dumps({"num_labels": model.num_labels, "max_abs_diff": diff}))
sys.exit(1 if diff > 1e-4 else 0)

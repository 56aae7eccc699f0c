"""Reference check: the MLM loss and every parameter's gradient, as PyTorch + HF compute them.

    python tests/reference/hf_mlm_grads.py EXPORT_DIR KINDLING_GRADS_JSON

KINDLING_GRADS_JSON (written by the Rust test `mlm_loss_and_gradients_match_transformers`)
holds a batch (input_ids, flat masked positions, labels) and Kindling's loss and per-parameter
gradient L2 norms, computed in eval mode (no dropout). This script computes the same with
`AutoModelForMaskedLM` (BertForMaskedLM, RobertaForMaskedLM; labels -100 away from the masked positions) and exits 1 when the loss differs
by more than 1e-4 or a gradient norm by more than 1e-3 relative.
"""
import json
import sys

import torch
from transformers import AutoModelForMaskedLM

export_dir, path = sys.argv[1], sys.argv[2]
ref = json.load(open(path))
model = AutoModelForMaskedLM.from_pretrained(export_dir)
model.eval()  # no dropout: the comparison is deterministic
ids = torch.tensor(ref["input_ids"])
labels = torch.full_like(ids, -100).view(-1)
labels[torch.tensor(ref["positions"])] = torch.tensor(ref["labels"])
out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels.view(ids.shape))
out.loss.backward()
norms = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
# HF ties the decoder's weight and bias to the word embeddings and the head's bias
# (cls.predictions.bias, lm_head.bias): named_parameters lists each once.
worst, worst_name = 0.0, None
for name, theirs in norms.items():
    ours = ref["grad_norms"].get(name)
    if ours is None:
        print(f"kindling has no gradient for {name}")
        sys.exit(1)
    # The key biases' true gradient is zero (softmax ignores a per-query constant), so both
    # sides hold rounding noise there: compare against a floor of 1e-6 of the largest norm.
    rel = abs(ours - theirs) / max(theirs, 1e-6 * max(norms.values()))
    if rel > worst:
        worst, worst_name = rel, name
loss_diff = abs(out.loss.item() - ref["loss"])
print(json.dumps({"loss": out.loss.item(), "loss_diff": loss_diff, "params": len(norms),
                  "worst_rel_grad_diff": worst, "worst_param": worst_name}))
sys.exit(0 if loss_diff <= 1e-4 and worst <= 1e-3 else 1)

"""Reference check for the whole MAE export (tests/vision.rs).

    python tests/reference/hf_vit_mae_outputs.py EXPORT_DIR KINDLING_OUTPUTS_JSON

The folder loads in transformers as `ViTMAEForPreTraining` with no missing or unexpected keys;
with the masks Kindling used given as `noise` ({"pixel_values": NCHW, "noise": (batch,
patches), "logits": (batch, patches, pixels), "loss"}), its reconstructions of every patch and
its loss equal Kindling's to 1e-4. Exits 1 otherwise.
"""
import json
import sys

import torch
from transformers import ViTMAEForPreTraining

folder, outputs = sys.argv[1], sys.argv[2]
model, info = ViTMAEForPreTraining.from_pretrained(folder, output_loading_info=True)
model.eval()
problems = {k: v for k, v in info.items() if v}
ref = json.load(open(outputs))
with torch.no_grad():
    out = model(pixel_values=torch.tensor(ref["pixel_values"]), noise=torch.tensor(ref["noise"]))
diffs = {
    "logits": (out.logits - torch.tensor(ref["logits"])).abs().max().item(),
    "loss": abs(out.loss.item() - ref["loss"]),
}
print(json.dumps({"class": type(model).__name__, "max_abs_diff": diffs}))
if problems:
    print(f"loading problems: {problems}")
    sys.exit(1)
if max(diffs.values()) > 1e-4:
    print(f"outputs differ by {diffs}")
    sys.exit(1)

"""Reference check for ViT folders, both ways.

    python tests/reference/hf_vit_outputs.py check EXPORT_DIR KINDLING_OUTPUTS_JSON
    python tests/reference/hf_vit_outputs.py make DIR OUTPUTS_JSON

check: Kindling's export loads in HF transformers as the class its config.json names
(`ViTModel`, or a fine-tuned `ViTForImageClassification`) with no missing or unexpected keys,
and gives the last hidden states and pooler output (a classifier: the "logits") Kindling
computed (KINDLING_OUTPUTS_JSON: {"pixel_values": NCHW, "last_hidden_state",
"pooler_output" | "logits"}, written by tests/vit.rs and tests/vision.rs) to 1e-4; with
"raw_pixels" (uint8 NHWC) too, the folder's AutoImageProcessor turns them into "pixel_values"
to 1e-5. Exits 1 otherwise.

make: saves a randomly initialised transformers ViTForImageClassification of a small config
(seeded) and a ViTImageProcessor to DIR, and writes its encoder's outputs on seeded images to OUTPUTS_JSON, for Kindling
to load the folder (under its `vit.` prefix) and compare; "interpolated" holds the outputs on
images of other sizes (4x4, 12x12, 8x12) with `interpolate_pos_encoding=True`.
"""
import json
import os
import sys

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForImageClassification, ViTConfig,
                          ViTForImageClassification)

mode, folder, outputs = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "check":
    expected = AutoConfig.from_pretrained(folder).architectures[0]
    # A fine-tuned classifier loads as its task class and is compared by its logits.
    classifier = expected.endswith("ForImageClassification")
    auto = AutoModelForImageClassification if classifier else AutoModel
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    ref = json.load(open(outputs))
    pixels = torch.tensor(ref["pixel_values"])
    with torch.no_grad():
        out = model(pixel_values=pixels)
    keys = ["logits"] if classifier else ["last_hidden_state", "pooler_output"]
    diffs = {k: (getattr(out, k) - torch.tensor(ref[k])).abs().max().item() for k in keys}
    print(json.dumps({"class": type(model).__name__, "loading_info": {k: list(v) for k, v in info.items()}, "max_abs_diff": diffs}))
    if type(model).__name__ != expected:
        print(f"loaded as {type(model).__name__}, config.json names {expected}")
        sys.exit(1)
    if problems:
        print(f"loading problems: {problems}")
        sys.exit(1)
    if max(diffs.values()) > 1e-4:
        print(f"outputs differ by {diffs}")
        sys.exit(1)
    if "raw_pixels" in ref:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _processor import check_processor
        check_processor(folder, ref, pixels)
elif mode == "make":
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                    image_size=8, patch_size=4, num_channels=3, num_labels=3)
    model = ViTForImageClassification(cfg).eval()
    # Non-trivial norms, biases, positions and [CLS], so that each is seen in the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    # Its image processor, as a Hub folder has one (Kindling reads it as the eval view).
    from transformers import ViTImageProcessor
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5] * 3,
                      image_std=[0.25] * 3).save_pretrained(folder)
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.vit(pixel_values=pixels).last_hidden_state
        # Other sizes read positions resized bicubically (`interpolate_pos_encoding`, DINO's
        # local crops): a smaller, a larger and a non-square grid.
        resized = []
        for (h, w) in [(4, 4), (12, 12), (8, 12)]:
            x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
            y = model.vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            resized.append({"pixel_values": x.tolist(), "last_hidden_state": y.tolist()})
    json.dump({"pixel_values": pixels.tolist(), "last_hidden_state": hidden.tolist(),
               "interpolated": resized}, open(outputs, "w"))
else:
    sys.exit(f"unknown mode {mode}")

"""Reference check for Kindling's ResNet exports.

    python tests/reference/hf_resnet_outputs.py check EXPORT_DIR KINDLING_OUTPUTS_JSON

KINDLING_OUTPUTS_JSON: {"pixel_values": NCHW, "features" | "logits", "raw_pixels"?} written by
tests/resnet.rs with Kindling's own encoder on the export.

By the class config.json names:
- ResNetModel / ResNetForImageClassification (a standard-stem ResNet): the folder loads in
  transformers as that class with no missing or unexpected keys, and its `pooler_output`
  (flattened) or `logits` equal Kindling's to 1e-4; with "raw_pixels" (uint8 NHWC) the folder's
  AutoImageProcessor turns them into "pixel_values" to 1e-5.
- KindlingResNetModel (the small-image stem): the Python block of the folder's README.md (the
  model card's torchvision lines) runs in the folder, loads `torchvision.safetensors` into
  torchvision's ResNet with `load_state_dict` (strict: no missing or unexpected keys), and the
  module's output equals Kindling's features to 1e-4.
Exits 1 otherwise.
"""
import json
import os
import re
import sys

import torch

mode, folder, outputs = sys.argv[1], sys.argv[2], sys.argv[3]
if mode != "check":
    sys.exit(f"unknown mode {mode}")
config = json.load(open(os.path.join(folder, "config.json")))
expected = config["architectures"][0]
ref = json.load(open(outputs))
pixels = torch.tensor(ref["pixel_values"])
key = "logits" if "logits" in ref else "features"

if expected == "KindlingResNetModel":
    card = open(os.path.join(folder, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", card, re.S)
    if code is None:
        print("the model card has no Python block")
        sys.exit(1)
    os.chdir(folder)
    scope = {}
    exec(code.group(1), scope)
    model = scope["m"].eval()
    with torch.no_grad():
        got = model(pixels)
    loaded = type(model).__module__ + "." + type(model).__name__
else:
    from transformers import AutoModel, AutoModelForImageClassification
    auto = AutoModelForImageClassification if key == "logits" else AutoModel
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    loaded = type(model).__name__
    if loaded != expected:
        print(f"loaded as {loaded}, config.json names {expected}")
        sys.exit(1)
    if problems:
        print(f"loading problems: {problems}")
        sys.exit(1)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    got = out.logits if key == "logits" else out.pooler_output.flatten(1)

diff = (got - torch.tensor(ref[key])).abs().max().item()
print(json.dumps({"class": loaded, "max_abs_diff": {key: diff}}))
if diff > 1e-4:
    print(f"{key} differ by {diff}")
    sys.exit(1)
if "raw_pixels" in ref:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _processor import check_processor
    check_processor(folder, ref, pixels)

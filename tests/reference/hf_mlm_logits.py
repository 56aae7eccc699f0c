"""Reference check: a masked-LM export loads in HF transformers (AutoModelForMaskedLM, as the
class its config.json names: BertForMaskedLM, RobertaForMaskedLM) and gives Kindling's logits.

    python tests/reference/hf_mlm_logits.py EXPORT_DIR KINDLING_LOGITS_JSON

KINDLING_LOGITS_JSON holds {"input_ids": [[...]], "logits": [[[...]]]} written by the Rust tests
(`export_reproduces_the_logits_transformers_computes` and the architectures' tests). Exits 1
when a key is missing or unexpected, when the class is not the config's, or when the logits
differ by more than 1e-4.
"""
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForMaskedLM

export_dir, logits_path = sys.argv[1], sys.argv[2]
model, info = AutoModelForMaskedLM.from_pretrained(export_dir, output_loading_info=True)
expected = AutoConfig.from_pretrained(export_dir).architectures[0]
model.eval()
problems = {k: v for k, v in info.items() if v}
ref = json.load(open(logits_path))
ids = torch.tensor(ref["input_ids"])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
diff = (logits - torch.tensor(ref["logits"])).abs().max().item()
print(json.dumps({"class": type(model).__name__, "loading_info": {k: list(v) for k, v in info.items()}, "max_abs_diff": diff}))
if type(model).__name__ != expected:
    print(f"loaded as {type(model).__name__}, config.json names {expected}")
    sys.exit(1)
if problems:
    print(f"loading problems: {problems}")
    sys.exit(1)
if diff > 1e-4:
    print(f"logits differ by {diff}")
    sys.exit(1)

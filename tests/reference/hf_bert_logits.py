"""Reference check: an export loads in HF transformers and gives Kindling's logits.

    python tests/reference/hf_bert_logits.py EXPORT_DIR KINDLING_LOGITS_JSON

KINDLING_LOGITS_JSON holds {"input_ids": [[...]], "logits": [[[...]]]} written by the Rust test
`export_reproduces_the_logits_transformers_computes`. Exits 1 when a key is missing or
unexpected, or when the logits differ by more than 1e-4.
"""
import json
import sys

import torch
from transformers import BertForMaskedLM

export_dir, logits_path = sys.argv[1], sys.argv[2]
model, info = BertForMaskedLM.from_pretrained(export_dir, output_loading_info=True)
model.eval()
problems = {k: v for k, v in info.items() if v}
ref = json.load(open(logits_path))
ids = torch.tensor(ref["input_ids"])
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
diff = (logits - torch.tensor(ref["logits"])).abs().max().item()
print(json.dumps({"loading_info": {k: list(v) for k, v in info.items()}, "max_abs_diff": diff}))
if problems:
    print(f"loading problems: {problems}")
    sys.exit(1)
if diff > 1e-4:
    print(f"logits differ by {diff}")
    sys.exit(1)

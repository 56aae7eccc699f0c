"""Reference check: a fine-tuned export loads in HF transformers as a sequence classifier and
gives Kindling's logits.

    python tests/reference/hf_cls_logits.py EXPORT_DIR KINDLING_LOGITS_JSON

KINDLING_LOGITS_JSON holds {"input_ids", "attention_mask", "logits"} written by the Rust test
`finetuned_export_reproduces_the_logits_transformers_computes` (padded rows included, so the
attention mask is exercised); optionally "token_type_ids" (sentence pairs), "problem_type" (what
config.json must say) and "labels" with Kindling's "loss" on them (transformers' loss for that
problem type must agree to 1e-4). Exits 1 when a key is missing or unexpected, when the model is not
the class config.json names (BertForSequenceClassification, RobertaForSequenceClassification)
with the export's id2label, or when the logits differ by more than 1e-4.
"""
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

export_dir, logits_path = sys.argv[1], sys.argv[2]
model, info = AutoModelForSequenceClassification.from_pretrained(export_dir, output_loading_info=True)
model.eval()
config = AutoConfig.from_pretrained(export_dir)
problems = {k: v for k, v in info.items() if v}
ref = json.load(open(logits_path))
inputs = dict(input_ids=torch.tensor(ref["input_ids"]), attention_mask=torch.tensor(ref["attention_mask"]))
if "token_type_ids" in ref:
    inputs["token_type_ids"] = torch.tensor(ref["token_type_ids"])
with torch.no_grad():
    logits = model(**inputs).logits
    hf_loss = None
    if "labels" in ref:
        labels = torch.tensor(ref["labels"])
        hf_loss = model(**inputs, labels=labels).loss.item()
diff = (logits - torch.tensor(ref["logits"])).abs().max().item()
print(json.dumps({
    "class": type(model).__name__,
    "id2label": config.id2label,
    "loading_info": {k: list(v) for k, v in info.items()},
    "max_abs_diff": diff,
    "problem_type": config.problem_type,
    "loss": hf_loss,
}))
if "problem_type" in ref and config.problem_type != ref["problem_type"]:
    print(f"problem_type {config.problem_type}, expected {ref['problem_type']}")
    sys.exit(1)
if hf_loss is not None and abs(hf_loss - ref["loss"]) > 1e-4:
    print(f"transformers' loss {hf_loss} vs Kindling's {ref['loss']}")
    sys.exit(1)
if type(model).__name__ != config.architectures[0] or not config.architectures[0].endswith("ForSequenceClassification"):
    print(f"loaded as {type(model).__name__}")
    sys.exit(1)
if problems:
    print(f"loading problems: {problems}")
    sys.exit(1)
if diff > 1e-4:
    print(f"logits differ by {diff}")
    sys.exit(1)

"""Reference folder: a small ModernBertForMaskedLM saved by transformers itself (no ModernBERT
weights ship in a package), with the logits transformers computes on a fixed input.

    python tests/reference/hf_modernbert_folder.py OUT_DIR TOKENIZER_DIR

TOKENIZER_DIR holds a tokenizer.json (with <s> </s> <pad> <mask>) that is copied into OUT_DIR.
Writes OUT_DIR/{config.json, model.safetensors, tokenizer files} as save_pretrained does, and
OUT_DIR/hf_logits.json: {"input_ids", "attention_mask", "logits"} (eval mode, the second row
padded), which the Rust test `an_hf_modernbert_folder_imports_continues_and_exports_back`
compares with Kindling's.
"""
import json
import shutil
import sys

import torch
from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

out_dir, tok_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(tok_dir)
ids = {t: tok.convert_tokens_to_ids(t) for t in ["<s>", "</s>", "<pad>", "<mask>"]}
config = ModernBertConfig(
    vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=2, max_position_embeddings=128, local_attention=16,
    pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], cls_token_id=ids["<s>"],
    eos_token_id=ids["</s>"], sep_token_id=ids["</s>"],
)
torch.manual_seed(0)
model = ModernBertForMaskedLM(config)
# Non-trivial norms and biases, so that their loading is tested too.
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            p.add_(0.1 * torch.randn_like(p))
model.eval()
model.save_pretrained(out_dir)
tok.save_pretrained(out_dir)
shutil.copy(f"{tok_dir}/tokenizer.json", f"{out_dir}/tokenizer.json")
g = torch.Generator().manual_seed(1)
input_ids = torch.randint(5, len(tok), (2, 40), generator=g)
mask = torch.ones_like(input_ids)
mask[1, 30:] = 0
input_ids[1, 30:] = ids["<pad>"]
with torch.no_grad():
    logits = model(input_ids=input_ids, attention_mask=mask).logits
json.dump({"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(),
           "logits": logits.tolist()}, open(f"{out_dir}/hf_logits.json", "w"))
print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                  "layer_types": config.layer_types}))

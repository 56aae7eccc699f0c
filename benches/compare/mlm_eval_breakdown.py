"""Held-out masked-token loss of MLM exports, split by what the target position showed the
model: [MASK] (80% of targets), a random token (10%) or the original token (10%, "kept").

The eval loss Kindling reports (and HF's run_mlm) averages all three; a model that learns to
trust a visible token gains on the kept tenth, one that reads the context gains on the [MASK]
ones. Run with the venv that has torch + transformers:

    python benches/compare/mlm_eval_breakdown.py runs/a/export runs/b/export

Same data path as Kindling (mlm_data.py), masks from HF's DataCollatorForLanguageModeling (15%,
80/10/10) with a fixed seed, identical for every export given the same tokenizer.
"""
import argparse
import json

import torch
from tokenizers import Tokenizer
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from mlm_data import split_blocks, unigram_baseline

p = argparse.ArgumentParser()
p.add_argument("exports", nargs="+")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)

for export in args.exports:
    tk = Tokenizer.from_file(f"{export}/tokenizer.json")
    tk.no_padding()
    tk.no_truncation()
    train, held = split_blocks(tk)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]",
                                     pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
    model = BertForMaskedLM.from_pretrained(export).eval()
    mask_id = tk.token_to_id("[MASK]")
    torch.manual_seed(1234)
    sums = {k: [0.0, 0, 0] for k in ("mask", "random", "kept", "all")}
    with torch.no_grad():
        for i in range(0, len(held), 64):
            orig = torch.tensor(held[i:i + 64])
            batch = collator([{"input_ids": b} for b in held[i:i + 64]])
            logits = model(input_ids=batch["input_ids"]).logits
            sel = batch["labels"] != -100
            inp, lb = batch["input_ids"][sel], batch["labels"][sel]
            nll = torch.nn.functional.cross_entropy(logits[sel], lb, reduction="none")
            hit = logits[sel].argmax(-1) == lb
            kinds = {"mask": inp == mask_id, "kept": inp == orig[sel],
                     "random": (inp != mask_id) & (inp != orig[sel]), "all": torch.ones_like(lb, dtype=torch.bool)}
            for k, m in kinds.items():
                sums[k][0] += nll[m].sum().item()
                sums[k][1] += m.sum().item()
                sums[k][2] += hit[m].sum().item()
    out = {"export": export, "unigram_baseline": round(unigram_baseline(tk, train, held), 4)}
    for k, (s, n, h) in sums.items():
        out[k] = {"targets": n, "loss": round(s / max(n, 1), 4), "accuracy": round(h / max(n, 1), 4)}
    print(json.dumps(out), flush=True)

"""The PyTorch + HF transformers side of the MLM comparison (issue: the MLM slice).

Trains HF `BertForMaskedLM` on exactly the data Kindling trains on -- the same tokenizer.json
(from a Kindling run folder), the same paragraph split, the same concatenate-and-chunk packing
with [SEP] between documents, the same held-out tail (last 5% of blocks) -- with HF's
`DataCollatorForLanguageModeling` (15%, 80/10/10), AdamW and a linear warmup/decay schedule,
for a wall-clock budget. Then evaluates the masked-token cross-entropy on the held-out blocks.

    benches/compare/.venv/bin/python benches/compare/hf_mlm_budget.py \
        --tokenizer runs/bert-mini-mlm/tokenizer.json --budget-s 720 --steps 494

Prints one JSON line: steps done, seconds, eval loss/accuracy, unigram baseline.
Run it right after (or before) `kindling pretrain recipes/bert-mini-mlm.toml` on a quiet machine;
`benches/compare/run_mlm_compare.sh` does both back to back.
"""
import argparse
import json
import time

import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from mlm_data import CORPUS, split_blocks, unigram_baseline

p = argparse.ArgumentParser()
p.add_argument("--tokenizer", required=True)
p.add_argument("--corpus", nargs="+", default=CORPUS)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=40)
p.add_argument("--steps", type=int, default=494, help="schedule length (stops earlier at the budget)")
p.add_argument("--budget-s", type=float, default=720)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=17)
p.add_argument("--train-mask-rate", type=float, default=0.15, help="masking rate of training batches (eval stays 0.15)")
p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
p.add_argument("--schedule", choices=["linear", "wsd"], default="linear")
p.add_argument("--decay-fraction", type=float, default=0.25, help="wsd: the last fraction of steps decays")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)


tk = Tokenizer.from_file(args.tokenizer)
tk.no_padding()
tk.no_truncation()
pad = tk.token_to_id("[PAD]")
train, held = split_blocks(tk, args.corpus, args.seq_len)
vocab = tk.get_vocab_size(with_added_tokens=True)
baseline = unigram_baseline(tk, train, held)  # as Kindling computes it

hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                 mask_token="[MASK]", unk_token="[UNK]")
collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
train_collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=args.train_mask_rate)
cfg = BertConfig(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, intermediate_size=4 * args.hidden, pad_token_id=pad,
                 hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
model = BertForMaskedLM(cfg)
no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


def lr_at(step):
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "wsd":
        decay_start = args.steps - int(args.decay_fraction * args.steps)
        if step < decay_start:
            return 1.0
        return max(0.0, 1 - (step - decay_start) / max(1, args.steps - decay_start))
    return max(0.0, 1 - (step - args.warmup) / max(1, args.steps - args.warmup))


sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
g = torch.Generator().manual_seed(args.seed)
order = torch.randperm(len(train), generator=g).tolist()
pos, step, t0 = 0, 0, time.time()
model.train()
while step < args.steps and time.time() - t0 < args.budget_s:
    if pos + args.batch > len(order):
        order, pos = torch.randperm(len(train), generator=g).tolist(), 0
    batch = train_collator([{"input_ids": train[i]} for i in order[pos:pos + args.batch]])
    pos += args.batch
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    step += 1
    if step % 25 == 0:
        print(json.dumps({"step": step, "loss": loss.item(), "elapsed_s": time.time() - t0}), flush=True)
train_s = time.time() - t0

model.eval()
torch.manual_seed(1234)  # fixed eval masks
nll, n, hits = 0.0, 0, 0
with torch.no_grad():
    for i in range(0, len(held), 64):
        batch = collator([{"input_ids": b} for b in held[i:i + 64]])
        logits = model(input_ids=batch["input_ids"]).logits
        sel = batch["labels"] != -100
        lg, lb = logits[sel], batch["labels"][sel]
        nll += torch.nn.functional.cross_entropy(lg, lb, reduction="sum").item()
        hits += (lg.argmax(-1) == lb).sum().item()
        n += lb.numel()
print(json.dumps({"side": "pytorch+hf", "steps": step, "train_s": round(train_s, 1), "eval_loss": nll / n,
                  "eval_accuracy": hits / n, "unigram_baseline": baseline, "eval_blocks": len(held),
                  "train_blocks": len(train), "torch": torch.__version__}))

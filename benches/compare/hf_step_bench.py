"""PyTorch + HF transformers side of the step comparison (benches/compare/run_step_compare.sh).

Times one BertForMaskedLM training step (forward with HF's full-vocabulary logits, backward,
AdamW) at batch 32 x 128, vocab 8192, dropout 0.1, 15% masks from DataCollatorForLanguageModeling,
for the tiny (h128 L2), mini (h256 L4) and small (h512 L4) shapes, and the collator's masking
throughput. One JSON object per line: {"bench", "tokens_per_s" | "seq_per_s", "median_s",
"gflop_per_step"}. FLOPs are counted as Kindling counts them (matmuls, training = 3x forward),
with the head at every position, since that is what HF computes.
"""
import argparse
import json
import os
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling,
                          ModernBertConfig, ModernBertForMaskedLM, PreTrainedTokenizerFast,
                          RobertaConfig, RobertaForMaskedLM)

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--only", default="",
               help="comma-separated subset: masking,tiny,mini,small,gemm,roberta,modernbert")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
V, SEQ, BATCH = 8192, 128, 32
# Exactly V entries: the collator draws its random replacements from range(len(tokenizer)), so
# a duplicate id (a word and a special sharing it) would let it draw ids past the embeddings.
vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
vocab.update({f"t{i}": i for i in range(5, V)})
tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15)
gen = torch.Generator().manual_seed(0)


def blocks(n):
    x = torch.randint(5, V, (n, SEQ), generator=gen)
    x[:, 0], x[:, -1] = 2, 3
    return [{"input_ids": r} for r in x.tolist()]


wanted = set(filter(None, args.only.split(",")))
if not wanted or "masking" in wanted:
    data = blocks(4096)
    t = time.time()
    for i in range(0, len(data), BATCH):
        collator(data[i:i + BATCH])
    print(json.dumps({"bench": "masking", "seq_per_s": len(data) / (time.time() - t)}), flush=True)

# The small step's encoder products, the list benches/mlm.rs times with the gemm crate.
GEMM_SHAPES = json.load(open(os.path.join(os.path.dirname(__file__), "gemm_shapes.json")))
if "gemm" in wanted:  # only on request: not part of the default step table
    for g in GEMM_SHAPES:
        name, m, n, k = g["name"], g["m"], g["n"], g["k"]
        lhs = torch.randn(k, m).t() if g["lhs_transposed"] else torch.randn(m, k)
        rhs = torch.randn(n, k).t() if g["rhs_transposed"] else torch.randn(k, n)
        times = []
        for _ in range(12):
            t = time.perf_counter()
            torch.mm(lhs, rhs)
            times.append(time.perf_counter() - t)
        times.sort()
        print(json.dumps({"bench": f"gemm {name}", "gflop_per_s": 2 * m * n * k / times[6] / 1e9}),
              flush=True)

def median_step_s(model, loss_of, steps):
    """Median seconds of one training step (forward, loss, backward, AdamW) over `steps` steps
    after two warm-up steps; `loss_of(model, batch)` is the loss of a freshly masked batch."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 2):
        batch = collator(blocks(BATCH))
        t = time.time()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.time() - t)
    times.sort()
    return times[len(times) // 2]


def stock_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


for name, h, l, a, steps in [("tiny", 128, 2, 2, 10), ("mini", 256, 4, 4, 8), ("small", 512, 4, 8, 4)]:
    if wanted and name not in wanted:
        continue
    cfg = BertConfig(vocab_size=V, hidden_size=h, num_hidden_layers=l, num_attention_heads=a,
                     intermediate_size=4 * h, max_position_embeddings=512)
    median = median_step_s(BertForMaskedLM(cfg), stock_loss, steps)
    tokens = BATCH * SEQ
    enc = 6 * l * (4 * h * h + 2 * h * 4 * h) * tokens
    attn = 12 * l * SEQ * h * tokens
    head = 6 * (h * h + h * V) * tokens
    print(json.dumps({"bench": name, "tokens_per_s": tokens / median, "median_s": median,
                      "gflop_per_step": (enc + attn + head) / 1e9}), flush=True)


# The other architectures' mini shapes (recipes/{roberta,modernbert}-mini-mlm.toml), stock and in
# their strongest form: the vocabulary projection at the masked rows only (RoBERTa by gathering
# the hidden states before lm_head, as Cramming does; ModernBERT with its own
# sparse_prediction=True, as ModernBERT's training code does).
def arch_models():
    r = RobertaConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=514, type_vocab_size=1,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2)
    m = dict(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=384, max_position_embeddings=512, local_attention=128,
             pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
    yield "roberta", "roberta-mini", RobertaForMaskedLM(r), False
    yield "roberta", "roberta-mini gathered", RobertaForMaskedLM(r), True
    yield "modernbert", "modernbert-mini", ModernBertForMaskedLM(ModernBertConfig(**m)), False
    yield ("modernbert", "modernbert-mini sparse",
           ModernBertForMaskedLM(ModernBertConfig(sparse_prediction=True, **m)), False)


def gathered_loss(model, batch):
    """RoBERTa's loss with lm_head applied to the masked rows only (Cramming's form)."""
    # No pad tokens in the blocks: RoBERTa's positions are its usual 2.. offsets.
    hidden = model.roberta(input_ids=batch["input_ids"])[0]
    labels = batch["labels"].view(-1)
    rows = labels != -100
    logits = model.lm_head(hidden.view(-1, hidden.shape[-1])[rows])
    return torch.nn.functional.cross_entropy(logits, labels[rows])


for family, name, model, gathered in arch_models():
    if wanted and family not in wanted:
        continue
    median = median_step_s(model, gathered_loss if gathered else stock_loss, 8)
    print(json.dumps({"bench": name, "tokens_per_s": BATCH * SEQ / median, "median_s": median}),
          flush=True)

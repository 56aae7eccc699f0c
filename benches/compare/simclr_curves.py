"""Loss curves and probe accuracies of the two whole SimCLR runs side by side:
runs/simclr-compare (Kindling, metrics.jsonl, `ssl_loss` = NT-Xent) and
runs/simclr-compare/torch (simclr_reference.py, metrics.csv). Means over windows of 50 steps.

    benches/compare/.venv/bin/python benches/compare/simclr_curves.py
"""
import csv
import json
import sys

run = sys.argv[1] if len(sys.argv) > 1 else "runs/simclr-compare"
k = {}
with open(f"{run}/metrics.jsonl") as f:
    for line in f:
        d = json.loads(line)
        if d.get("split") == "train" and "ssl_loss" in d:
            k[d["step"]] = d["ssl_loss"]
t = {}
with open(f"{run}/torch/metrics.csv") as f:
    for row in csv.DictReader(f):
        t[int(row["step"])] = float(row["loss"])
last = max(k)
print("| steps | Kindling NT-Xent | PyTorch NT-Xent | difference |")
print("|---|---|---|---|")
for a in range(1, last + 1, 50):
    ks = [k[s] for s in range(a, a + 50) if s in k]
    ts = [t[s] for s in range(a, a + 50) if s in t]
    if ks and ts:
        km, tm = sum(ks) / len(ks), sum(ts) / len(ts)
        print(f"| {a}-{a + 49} | {km:.4f} | {tm:.4f} | {km - tm:+.4f} |")
with open(f"{run}/probe_results.json") as f:
    kp = {d["what"].split(" ")[0]: d["accuracy"] for d in json.load(f)}
with open(f"{run}/torch/result.json") as f:
    tp = json.load(f)["probe"]
print()
print("| probe | Kindling | PyTorch |")
print("|---|---|---|")
for name, key in [("pretrained encoder", "pretrained"), ("random encoder", "random"), ("raw pixels", "raw_pixels")]:
    print(f"| {name} | {kp[name.split(' ')[0] if name != 'raw pixels' else 'raw']:.4f} | {tp[key]:.4f} |")

"""PyTorch reference for recipes/simclr-fashion-mnist.toml: the same encoder, projector, loss,
LARS rule, schedule, augmentations, batch and steps, then the same linear probe. Not run in CI.

    benches/compare/.venv/bin/python benches/compare/simclr_reference.py --out /tmp/simclr-torch

Writes OUT/metrics.csv (step, loss, lr, step_s) and OUT/result.json (probe accuracies, images/s).
Written from the Kindling recipe, not from another implementation: every choice below mirrors a
line of crates/kindling-recipes/src/vision, crates/kindling-models/src/{resnet,conv,heads}.rs,
crates/kindling-train/src/optim.rs (LARS) and crates/kindling-data/src/augment.rs.
Only torch and numpy are needed (no torchvision): the augmentations are written out.
"""

import argparse
import gzip
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride, relu):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = ConvBN(cin, cout, 3, stride, True)
        self.b = ConvBN(cout, cout, 3, 1, False)
        self.short = ConvBN(cin, cout, 1, stride, False) if (cin != cout or stride != 1) else None

    def forward(self, x):
        y = self.b(self.a(x))
        return F.relu(y + (self.short(x) if self.short is not None else x))


class Encoder(nn.Module):
    """[model.backbone] of the recipe: 3x3 stem (32), stages 32/64/128 of one block, all stride 2."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(1, 32, 3, 1, True)
        self.stages = nn.Sequential(Block(32, 32, 2), Block(32, 64, 2), Block(64, 128, 2))

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))


def projector():
    return nn.Sequential(nn.Linear(128, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))


def nt_xent(z1, z2, t):
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / t - torch.eye(2 * n) * 1e9
    target = (torch.arange(2 * n) + n) % (2 * n)
    return F.cross_entropy(sim, target)


class Lars:
    """crates/kindling-train/src/optim.rs, kind = "lars": g += wd * w and the trust ratio
    eta * |w| / |g| for weights (not biases or norms), then SGD momentum."""

    def __init__(self, params, momentum, wd, eta):
        # (parameter, decayed and adapted): biases and BatchNorm parameters (1-d) are exempt,
        # as Objective::no_decay says in Kindling.
        self.groups = [(p, p.ndim > 1) for p in params]
        self.momentum, self.wd, self.eta = momentum, wd, eta
        self.buf = {}

    @torch.no_grad()
    def step(self, lr):
        for p, decay in self.groups:
            if p.grad is None:
                continue
            g = p.grad.clone()
            if decay and self.wd:
                g += self.wd * p
            if decay:
                wn, gn = p.norm(), g.norm()
                if wn > 0 and gn > 0:
                    g *= self.eta * wn / gn
            b = self.buf.get(p)
            b = g if b is None else b * self.momentum + g
            self.buf[p] = b
            p -= lr * b


def augment(x, gen):
    """[[data.views]] of the recipe on a (n, 1, 28, 28) batch in [0, 1]."""
    n = x.shape[0]
    out = torch.empty_like(x)
    for i in range(n):
        img = x[i: i + 1]
        # random_resized_crop, scale [0.25, 1], ratio [3/4, 4/3], bilinear, align_corners=False
        h = w = 28
        for _ in range(10):
            area = h * w * (0.25 + 0.75 * torch.rand(1, generator=gen).item())
            logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=gen).item()
            r = math.exp(logr)
            cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                break
        else:
            ch, cw, top, left = h, w, 0, 0
        img = F.interpolate(img[:, :, top: top + ch, left: left + cw], size=(28, 28), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            img = img.flip(3)
        if torch.rand(1, generator=gen).item() < 0.8:
            for op in torch.randperm(2, generator=gen).tolist():
                f = 0.6 + 0.8 * torch.rand(1, generator=gen).item()
                img = (img * f).clamp(0, 1) if op == 0 else ((img - img.mean()) * f + img.mean()).clamp(0, 1)
        if torch.rand(1, generator=gen).item() < 0.2:
            sigma = 0.1 + 0.9 * torch.rand(1, generator=gen).item()
            k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma * sigma))
            k = k / k.sum()
            img = F.pad(img, (1, 1, 1, 1), mode="reflect")
            img = F.conv2d(img, k.view(1, 1, 1, 3))
            img = F.conv2d(img, k.view(1, 1, 3, 1))
        out[i] = img[0]
    return (out - MEAN) / STD


def features(enc, x):
    enc.eval()
    with torch.no_grad():
        return torch.cat([enc(((x[i: i + 512] - MEAN) / STD)) for i in range(0, len(x), 512)])


def probe(train_x, train_y, test_x, test_y, l2s=(1e-4, 1e-3, 1e-2), steps=300, lr=0.05):
    """crates/kindling-recipes/src/vision/mod.rs linear_probe: standardise, full-batch Adam
    logistic regression, L2 chosen on the last 10% of train, refit on all, test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1

    def fit(x, y, l2):
        w = torch.zeros(x.shape[1], classes, requires_grad=True)
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + l2 / 2 * (w * w).sum()
            loss.backward()
            opt.step()
        return lambda z: (z @ w + b).argmax(1)

    cut = len(train_x) - len(train_x) // 10
    best = max(l2s, key=lambda l2: (fit(train_x[:cut], train_y[:cut], l2)(train_x[cut:]) == train_y[cut:]).float().mean().item())
    pred = fit(train_x, train_y, best)(test_x)
    return (pred == test_y).float().mean().item(), best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument("--bench", type=int, default=0,
                    help="time N training steps on pre-made views (no augmentation), print images/s, exit")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    d = "datasets/fashion-mnist/"
    xtr = torch.from_numpy(read_idx(d + "train10k-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    ytr = torch.from_numpy(read_idx(d + "train10k-labels-idx1-ubyte.gz").astype(np.int64))
    xte = torch.from_numpy(read_idx(d + "t10k-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    yte = torch.from_numpy(read_idx(d + "t10k-labels-idx1-ubyte.gz").astype(np.int64))

    enc, proj = Encoder(), projector()
    random_feats = (features(enc, xtr), features(enc, xte))
    opt = Lars(list(enc.parameters()) + list(proj.parameters()), 0.9, 1e-5, 0.02)
    gen = torch.Generator().manual_seed(a.seed)
    batch, warm, peak = 256, 20, 0.4
    if a.bench:
        # The step alone, as benches/vision.rs times Kindling's: views made beforehand.
        v1 = augment(xtr[:batch], gen)
        v2 = augment(xtr[:batch], gen)
        times = []
        for i in range(a.bench + 2):
            t0 = time.perf_counter()
            enc.train(), proj.train()
            loss = nt_xent(proj(enc(v1)), proj(enc(v2)), 0.2)
            for p in list(enc.parameters()) + list(proj.parameters()):
                p.grad = None
            loss.backward()
            opt.step(peak)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        print(json.dumps({"bench": "simclr step 2x256 28x28", "images_per_s": batch / med,
                          "median_ms": med * 1e3, "steps": a.bench, "threads": a.threads,
                          "torch": torch.__version__}))
        return
    per_epoch = len(xtr) // batch
    rows, images, train_s, aug_s = [], 0, 0.0, 0.0
    order = torch.randperm(len(xtr), generator=gen)
    for step in range(a.steps):
        if step % per_epoch == 0 and step > 0:
            order = torch.randperm(len(xtr), generator=gen)
        idx = order[(step % per_epoch) * batch: (step % per_epoch + 1) * batch]
        lr = peak * (step + 1) / warm if step < warm else peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / (a.steps - warm)))
        t0 = time.perf_counter()
        x = xtr[idx]
        v1, v2 = augment(x, gen), augment(x, gen)
        aug_s += time.perf_counter() - t0
        enc.train(), proj.train()
        loss = nt_xent(proj(enc(v1)), proj(enc(v2)), 0.2)
        for p in list(enc.parameters()) + list(proj.parameters()):
            p.grad = None
        loss.backward()
        opt.step(lr)
        dt = time.perf_counter() - t0
        train_s += dt
        images += batch
        rows.append((step + 1, loss.item(), lr, dt))
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}/{a.steps} loss {loss.item():.4f} lr {lr:.3g} {images / train_s:.0f} img/s", flush=True)
    with open(os.path.join(a.out, "metrics.csv"), "w") as f:
        f.write("step,loss,lr,step_s\n")
        f.writelines(f"{s},{l},{r},{t}\n" for s, l, r, t in rows)
    ps = a.probe_steps
    pre = probe(features(enc, xtr), ytr, features(enc, xte), yte, steps=ps)
    rnd = probe(random_feats[0], ytr, random_feats[1], yte, steps=ps)
    px = probe(((xtr - MEAN) / STD).flatten(1), ytr, ((xte - MEAN) / STD).flatten(1), yte, steps=ps)
    result = {
        "images_per_s": images / train_s, "train_s": train_s, "augment_s": aug_s,
        "step_images_per_s": images / (train_s - aug_s), "final_loss": rows[-1][1],
        "probe": {"pretrained": pre[0], "random": rnd[0], "raw_pixels": px[0]}, "threads": a.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

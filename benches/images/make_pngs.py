"""Writes N 28x28 grey PNGs, one subfolder per class, for the streamed-folder memory bench.

    python benches/images/make_pngs.py N DIR

The images are Fashion-MNIST's shipped 10k training images (datasets/fashion-mnist), repeated
with a per-copy brightness shift so no two files are equal; DIR/<label>/<index>.png. Not
committed: the bench makes them (20k and 200k files).
"""
import gzip
import os
import sys

import numpy as np
from PIL import Image

n, out = int(sys.argv[1]), sys.argv[2]
root = os.path.join(os.path.dirname(__file__), "..", "..", "datasets", "fashion-mnist")
with gzip.open(os.path.join(root, "train10k-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
with gzip.open(os.path.join(root, "train10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
for k in range(10):
    os.makedirs(os.path.join(out, str(k)), exist_ok=True)
for i in range(n):
    j = i % len(images)
    px = np.clip(images[j].astype(np.int16) + (i // len(images)) % 7, 0, 255).astype(np.uint8)
    Image.fromarray(px, "L").save(os.path.join(out, str(labels[j]), f"{i:07d}.png"))

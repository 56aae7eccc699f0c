"""Sentence embeddings from sentence-transformers, for tests/simcse.rs.

Usage: st_embed.py MODEL_DIR SENTENCES_JSON -> prints a JSON list of embeddings (normalised,
as the folder's modules.json says). Prints {"skipped": ...} when sentence-transformers is not
installed, so the Rust test can say so instead of failing.
"""
import json
import sys

try:
    from sentence_transformers import SentenceTransformer
except ImportError as e:  # the test skips, naming why
    print(json.dumps({"skipped": f"sentence-transformers not installed: {e}"}))
    sys.exit(0)

model = SentenceTransformer(sys.argv[1], device="cpu")
sentences = json.load(open(sys.argv[2]))
emb = model.encode(sentences, batch_size=8, convert_to_numpy=True)
print(json.dumps(emb.tolist()))

"""The official client against Kindling's test Hub server (tests/hub.rs).

    python tests/reference/hub_client.py upload ENDPOINT TOKEN REPO FOLDER
    python tests/reference/hub_client.py download ENDPOINT TOKEN REPO CACHE_DIR

`upload`: HfApi(endpoint).create_repo + upload_folder (the Git LFS path: HF_HUB_DISABLE_XET=1
must be set, as no server but the Hub speaks Xet). `download`: snapshot_download into CACHE_DIR;
prints {"snapshot": path, "files": {path: sha256}} on the last line.
"""
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
from huggingface_hub import HfApi, snapshot_download  # noqa: E402

cmd, endpoint, token, repo, path = sys.argv[1:6]
if cmd == "upload":
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo, exist_ok=True)
    info = api.upload_folder(folder_path=path, repo_id=repo, commit_message="upload from huggingface_hub")
    print(json.dumps({"commit": info.oid}))
elif cmd == "download":
    snap = snapshot_download(repo, cache_dir=path, endpoint=endpoint, token=token)
    files = {}
    for root, _, names in os.walk(snap):
        for n in names:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, snap)
            files[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    print(json.dumps({"snapshot": snap, "files": files}))
else:
    sys.exit(f"unknown command {cmd}")

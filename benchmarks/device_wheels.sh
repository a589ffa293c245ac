#!/bin/sh
# The wheels a lent GPU machine needs for benchmarks/full_size.py and train_speed.py. It cannot reach a package
# registry, and its image has torch, transformers, peft and accelerate but not diffusers or bitsandbytes (QLoRA's
# library there). Run this here: it fills .whl/ (git-ignored, about 50 MB, within the 64 MiB a call may carry) with
# the versions constraints.txt pins. Then every device call carries .whl and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit;
# followed by, one per call for the 10-minute limit:
#   python3 benchmarks/full_size.py --family sd1 --out $OUT/full_size_sd1.json
#   python3 benchmarks/full_size.py --family sdxl --out $OUT/full_size_sdxl.json
#   python3 benchmarks/full_size.py --family sdxl --quantize-base nf4 --budgets --out $OUT/full_size_sdxl_nf4.json
set -e
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $(grep -E '^(diffusers|bitsandbytes)==' constraints.txt)
ls -l .whl

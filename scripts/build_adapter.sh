#!/usr/bin/env bash
# Rebuild the shipped voices adapter from scratch with fixed seeds: synth -> train -> export.
# Writes src/thoughtform/adapters/voices-seed.gguf (+ voices-seed.json, the training report).
# About 13.5 minutes on this 2-core CPU (measured 13 min 32 s, 771 s of it training, with other
# work on the machine); two CPU builds are byte-identical. Uses CUDA when present. `make adapter`
# runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

TF=${TF:-.venv/bin/thoughtform}
WORK=${WORK:-$(mktemp -d -t thoughtform-adapter.XXXXXX)}
DEST=src/thoughtform/adapters

# Keep these in step with SHIPPED_SYNTH in src/thoughtform/adapters/__init__.py.
"$TF" dataset synth --voices seed --n 2000 --seed 0 --out "$WORK/train.jsonl"
start=$(date +%s)
"$TF" train "$WORK/train.jsonl" --out "$WORK/run" --base embedded \
    --steps 240 --batch 4 --max-len 256 --lr 4e-4 --warmup 10 \
    --lora-r 8 --lora-alpha 16 --seed 0 --save-every 40 --export-dtype f16
end=$(date +%s)

cp "$WORK/run/adapter.gguf" "$DEST/voices-seed.gguf"
# The report without machine-specific paths.
"${PY:-.venv/bin/python}" - "$WORK/run/training.json" "$DEST/voices-seed.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["config"]["data"] = ["thoughtform dataset synth --voices seed --n 2000 --seed 0"]
r["config"]["out"] = "."
r.pop("base_path", None)
json.dump(r, open(sys.argv[2], "w"), indent=1)
PY
echo "voices adapter: $DEST/voices-seed.gguf ($(du -h "$DEST/voices-seed.gguf" | cut -f1)), trained in $((end - start))s; work dir $WORK"

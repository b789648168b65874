#!/usr/bin/env bash
# Rebuild the shipped seed voice vectors from nothing with fixed seeds: synth -> vectors train.
# Writes src/thoughtform/vectors/seed/<Voice>.gguf + vectors.json. CPU; `make vectors` runs this.
# THREADS=N sets torch's CPU threads (on a busy machine 1 is faster than many).
set -euo pipefail
cd "$(dirname "$0")/.."

TF=${TF:-.venv/bin/thoughtform}
# numpy's share of the work is small; threaded BLAS only spins on a busy machine.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
WORK=${WORK:-$(mktemp -d -t thoughtform-vectors.XXXXXX)}
DEST=src/thoughtform/vectors/seed

"$TF" dataset synth --voices seed --n 500 --seed 0 --out "$WORK/seed-synth.jsonl"
start=$(date +%s)
"$TF" vectors train "$WORK/seed-synth.jsonl" --voices seed --base embedded --seed 0 \
    --max-examples 400 --holdout 0.2 --out "$WORK/seed" ${THREADS:+--threads "$THREADS"}
end=$(date +%s)

# The default strengths the set ships with: those `thoughtform eval vectors` picked on these
# vectors (docs/vectors-eval.json, made by the command in the README), else 1 for every voice.
EVAL=docs/vectors-eval.json
if [ -f "$EVAL" ]; then
    "$TF" vectors strengths "$WORK/seed" --from-eval "$EVAL"
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.gguf "$DEST/vectors.json"
cp "$WORK"/seed/*.gguf "$WORK/seed/vectors.json" "$DEST/"
echo "seed voice vectors: $DEST ($(du -ch "$DEST"/*.gguf | tail -1 | cut -f1)), trained in $((end - start))s; work dir $WORK"

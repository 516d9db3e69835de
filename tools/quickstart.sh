#!/usr/bin/env bash
# From a fresh checkout, offline: install, synthesize a dataset, train, export a bundle, predict.
#   bash tools/quickstart.sh            (EPOCHS=20 MODEL=resnet bash tools/quickstart.sh to change)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-15}
MODEL=${MODEL:-shufflenet}
PER_WORD=${PER_WORD:-150}

if [ ! -x .venv/bin/kws-train ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-ci.txt -e ".[train,dev]"
fi
bin=.venv/bin

# Synthetic speech in the Speech Commands layout (eSpeak NG from PyPI, no download).
[ -f data/synth/synth.json ] || $bin/kws-data synth data/synth --per-word "$PER_WORD" --seed 0
# The original flags: -m model -d data -t(rain) -e epochs -b batch; add -g on a CUDA machine.
$bin/kws-train -m "$MODEL" -d data/synth -t -e "$EPOCHS" -b 128 --out "runs/quickstart-$MODEL"
$bin/kws-export "runs/quickstart-$MODEL/best.pt" --out "bundles/quickstart-$MODEL" --data data/synth --force
$bin/kws info "bundles/quickstart-$MODEL"
# The torch-free runtime on a few held-out clips.
$bin/kws predict "bundles/quickstart-$MODEL" $(grep -m 8 -E '^(yes|no|stop|go)/' data/synth/testing_list.txt | sed 's|^|data/synth/|')

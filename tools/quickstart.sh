#!/usr/bin/env bash
# The main job in one command, offline: set up, show the shipped model at work, then
# synthesize speech, train, export and score a bundle, and classify clips with it.
#   bash tools/quickstart.sh
#   MODEL=resnet EPOCHS=20 PER_WORD=300 bash tools/quickstart.sh     # longer, better
#   DATA=data/speech_commands_v0.02 bash tools/quickstart.sh          # real data instead of synthetic
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-shufflenet}
EPOCHS=${EPOCHS:-15}
PER_WORD=${PER_WORD:-200}
DATA=${DATA:-data/synth}
REAL=${KWS_REAL_DATA:-../shared/data/speech_commands_real}
PRETRAINED=pretrained/shufflenet-v2-0.5x
RUN=runs/quickstart-$MODEL
BUNDLE=bundles/quickstart-$MODEL
bin=.venv/bin
started=$SECONDS

step() { printf '\n== [%d:%02d] %s\n' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) "$*"; }

echo "kws quick start: about 6 minutes on 2 CPU cores (1-2 more for the first install), under 2 GB of memory."
if [ ! -x $bin/kws-train ]; then
  step "setting up .venv (the pinned CPU torch installs from a local wheel)"
  python3 -m venv .venv
  $bin/python -m pip install -q --upgrade pip
  $bin/python -m pip install -q -r requirements-ci.txt -e ".[train,dev]"
fi

# One clip of each of ten words, never seen in training: from the dataset's test list, or the
# first of each word in a folder of unseen speakers (globs are sorted: the same clips each run).
demo_clips() {
  local root=$1 word file
  for word in yes no up down left right on off stop go; do
    if [ -f "$root/testing_list.txt" ]; then
      file=$(grep -m 1 "^$word/" "$root/testing_list.txt" || true)
      if [ -n "$file" ]; then echo "$root/$file"; fi
      continue
    fi
    for file in "$root/$word"/*.wav "$root/$word"/*.flac; do
      if [ -f "$file" ]; then echo "$file"; break; fi
    done
  done
}

if [ -d "$REAL/yes" ]; then
  step "1/6 the shipped model ($PRETRAINED) on real recordings of ten words from $REAL"
  mapfile -t demo < <(demo_clips "$REAL")
  $bin/kws predict "$PRETRAINED" "${demo[@]}"
  echo "   (each line: file, predicted word, probability; the file's folder is the word spoken)"
  step "2/6 the shipped model finding keywords in a 30 s recording (real words over real noise at 10 dB)"
  $bin/kws evaluate-stream "$PRETRAINED" "$REAL" --out runs/quickstart-stream --minutes 0.5 --snr 10 > /dev/null 2>&1
  echo "   spoken (word start-end, seconds):" $(awk -F, 'NR > 1 && $1 != "_unknown_" {printf "%s %.1f-%.1f, ", $1, $2, $3}' runs/quickstart-stream/stream-10dB.csv)
  echo "   found (seconds, word, score):"
  $bin/kws stream "$PRETRAINED" runs/quickstart-stream/stream-10dB.wav | sed 's/^/   /'
  echo "   (trained on isolated 1 s clips, it misses words in streams: docs/streaming.md measures how many)"
else
  step "1/6 the shipped model ($PRETRAINED): no real recordings here (set KWS_REAL_DATA); it runs on synthetic clips in step 6"
fi

if [ "$DATA" = data/synth ]; then
  step "3/6 synthesizing speech with eSpeak NG into data/synth ($PER_WORD clips per word)"
  [ -f data/synth/synth.json ] || $bin/kws-data synth data/synth --per-word "$PER_WORD" --seed 0
else
  step "3/6 using the dataset in $DATA"
fi

step "4/6 training $MODEL for $EPOCHS epochs on $DATA (one line per epoch)"
# The original flags (-m -d -t -e -b); batch 64 keeps training under 2 GB; add -g on a CUDA machine.
$bin/kws-train -m "$MODEL" -d "$DATA" -t -e "$EPOCHS" -b 64 --lr 1e-2 --out "$RUN" --threads 2

if [ -d "$REAL/yes" ]; then
  step "5/6 exporting the ONNX artifacts into $BUNDLE, scored on every clip of $REAL (real speakers)"
  scored_on=(--test "$REAL" --test-all)
else
  step "5/6 exporting the ONNX artifacts into $BUNDLE, scored on the test split of $DATA"
  scored_on=(--test "$DATA")
fi
$bin/kws-export "$RUN/best.pt" --out "$BUNDLE" --calib "$DATA" "${scored_on[@]}" --formats onnx --latency-runs 20 --force --quiet

step "6/6 your model and the shipped one on held-out clips"
if [ -d "$REAL/yes" ]; then
  mapfile -t demo < <(demo_clips "$REAL")
else
  mapfile -t demo < <(demo_clips "$DATA")
fi
echo "-- $BUNDLE (trained just now):"
$bin/kws predict "$BUNDLE" "${demo[@]}"
echo "-- $PRETRAINED (trained on real clips of 1,713 speakers):"
$bin/kws predict "$PRETRAINED" "${demo[@]}"

accuracy() {  # int8 accuracy and test clips recorded in a bundle's manifest
  $bin/python -c "import json, sys; m = json.load(open(sys.argv[1]))['artifacts']['onnx_int8']['metrics']; print(f\"{100 * m['accuracy']:.1f} % of {m['test_clips']} test clips\")" "$1/manifest.json"
}
step "done"
cat <<EOF
Accuracy (12 classes, int8): the model trained just now $(accuracy "$BUNDLE"); the shipped one
$(accuracy "$PRETRAINED") of speakers it never heard.
What to expect: a model trained for minutes on synthetic speech alone knows eSpeak's voices, not
people's, so on real recordings it is far behind the shipped one, which learned from real
recordings of 1,713 speakers. Train on real data (below) for real accuracy.

Where everything is:
  runs/quickstart-stream/     the 30 s recording (stream-10dB.wav), what is said where (.csv), report.json
  $RUN/            best.pt, last.pt, metrics.jsonl, curves.png, confusion.png, summary.json
  $BUNDLE/         manifest.json, model.onnx, model.int8.onnx, model.e2e.onnx, scorecard.md, scorecard.png
  $PRETRAINED/ the shipped bundle and its MODEL_CARD.md

Next:
  kws-data download --version 0.02 --out data/       # real Speech Commands (2.4 GB), then DATA=data/speech_commands_v0.02
  $bin/kws-train -m resnet -d data/speech_commands_v0.02 -t -e 30 -g    # on a GPU machine
  $bin/kws info $BUNDLE                             # every artifact and the scorecard
  $bin/kws stream $BUNDLE recording.wav              # keywords in a recording of any length
  $bin/kws listen $PRETRAINED                    # live from the microphone (pip install '.[mic]')
EOF

#!/usr/bin/env bash
# One federated round of FedCDD end to end on the built-in setup, on the CPU:
# a tiny random LLaMA (`init-model --preset tiny`), five clients with one synthetic domain each
# (`gen-corpus`), each fine-tunes LoRA from the global adapter (`train`), masks and encodes its
# update (`encode`), the server aggregates the uploads with FedCDD and with FedAvg
# (`aggregate`), and every model is evaluated per domain (`eval`).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-run}
steps=${DEMO_STEPS:-15}

cargo build --release -q -p fedcdd-host
fedcdd=./target/release/fedcdd

rm -rf "$out"
mkdir -p "$out"
"$fedcdd" init-model --preset tiny --out "$out/model"
"$fedcdd" gen-corpus --n 300 --seed 1 --split --out "$out/data"
"$fedcdd" gen-corpus --n 40 --seed 2 --out "$out/eval.jsonl"
"$fedcdd" init-adapter --model "$out/model" --out "$out/global" --lora-r 8 --seed 0

uploads=()
i=0
for data in "$out"/data/*.jsonl; do
  domain=$(basename "$data" .jsonl)
  echo "== client $i ($domain): $steps LoRA steps from the global adapter"
  "$fedcdd" train --model "$out/model" --adapter-init "$out/global" --data "$data" \
    --out "$out/client-$i" --steps "$steps" --batch 8 --seq 128 --lr 3e-3 --seed "$i"
  "$fedcdd" encode --global "$out/global" --local "$out/client-$i" --out "$out/client-$i.fcdu" \
    --keep-ratio 0.5 --noise-scale 0.5 --round 1 --client-id "$i" --samples 300
  uploads+=(--client "$out/client-$i.fcdu")
  i=$((i + 1))
done

"$fedcdd" inspect "$out/client-0.fcdu" | head -n 8
"$fedcdd" aggregate --algorithm fedcdd --global "$out/global" "${uploads[@]}" \
  --out "$out/global-fedcdd" --report "$out/fedcdd-report.json"
"$fedcdd" aggregate --algorithm fedavg --global "$out/global" "${uploads[@]}" --out "$out/global-fedavg"

for model in global global-fedavg global-fedcdd; do
  echo "== eval: $model"
  "$fedcdd" eval --model "$out/model" --adapter "$out/$model" --data "$out/eval.jsonl"
done
echo "new global adapter (PEFT format): $out/global-fedcdd"

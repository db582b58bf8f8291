#!/usr/bin/env bash
# One federated round end to end on a synthetic PEFT LoRA setup:
# 4 clients mask and encode their updates, the server aggregates them with FedCDD
# (and FedAvg, for comparison), and one upload is inspected.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-run}

cargo build --release -q -p fedcdd-host
fedcdd=./target/release/fedcdd

rm -rf "$out"
"$fedcdd" make-example --out "$out" --clients 4 --layers 4 --hidden 256 --rank 8

uploads=()
for i in 0 1 2 3; do
  "$fedcdd" encode --global "$out/global" --local "$out/client-$i" --out "$out/client-$i.fcdu" \
    --keep-ratio 0.25 --noise-scale 0.5 --round 1 --client-id "$i" --samples $((100 + 50 * i))
  uploads+=(--client "$out/client-$i.fcdu")
done

"$fedcdd" inspect "$out/client-0.fcdu" | head -n 8
"$fedcdd" aggregate --algorithm fedcdd --global "$out/global" "${uploads[@]}" \
  --out "$out/global-next" --report "$out/fedcdd-report.json"
"$fedcdd" aggregate --algorithm fedavg --global "$out/global" "${uploads[@]}" --out "$out/global-fedavg"
echo "new global adapter (PEFT format): $out/global-next"

"""What the server sees through FedCDD's Gaussian-noise mask, measured (docs/privacy.md).

Eight clients of the built-in benchmark (client k holds domain k mod 4, so every domain has
two clients) train one round of FedCDD from the same global adapter. For each client we
compare the true update (trained adapter minus global) with what the server decodes from the
upload, and print a Markdown table:

- the share of the update's energy in the kept columns (sent exactly);
- how well the server reconstructs the masked columns: from the decoded noise, from the other
  clients' kept values at the same positions, from the same-domain peer's;
- whether the uploads give away which clients share a domain (cosine of the server-visible
  updates: same-domain pairs against cross-domain pairs, and whether each client's nearest
  neighbour is its peer), against dense uploads.

Run (needs libfedcdd: `cargo build --release -p fedcdd-ffi`):
    python3 scripts/mask_leakage.py [--keep 0.5 0.1] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
import fedcdd  # noqa: E402

NUM_CLIENTS = 8
DOMAINS = 4


def flat(tensors: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([tensors[n].ravel() for n in names]).astype(np.float64)


def kept_columns(true: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Columns the server received exactly (the mask keeps whole columns of [R, C])."""
    return np.all(true == seen, axis=0)


def measure(keep: float, seed: int) -> dict[str, float]:
    config = {
        "algorithm": "fedcdd",
        "num_clients": NUM_CLIENTS,
        "sample_clients": NUM_CLIENTS,
        "keep_ratio": keep,
        "seed": seed,
        "references": [],
    }
    clients = [fedcdd.Client(config, k) for k in range(NUM_CLIENTS)]
    global_ = clients[0].initial_adapter()
    truth, seen, kept = [], [], []
    for c in clients:
        result = c.train_round(0, global_)
        up = fedcdd.decode_upload(result.upload)
        names = sorted(up.tensors)
        delta = {n: (result.adapter[n] - global_[n]).astype(np.float32) for n in names}
        masks = {}
        for n in names:
            t, s = delta[n].reshape(delta[n].shape[0], -1), up.tensors[n].reshape(delta[n].shape[0], -1)
            cols = kept_columns(t, s) if up.masked[n] else np.ones(t.shape[1], bool)
            masks[n] = np.broadcast_to(cols, t.shape)
        truth.append(flat(delta, names))
        seen.append(flat(up.tensors, names))
        kept.append(flat({n: masks[n].astype(np.float32) for n in names}, names) > 0.5)

    def rel_err(est: np.ndarray, true: np.ndarray) -> float:
        return float(np.linalg.norm(est - true) / np.linalg.norm(true))

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    energy, noise_err, others_err, others_cos, peer_err, peer_cover = [], [], [], [], [], []
    for k in range(NUM_CLIENTS):
        t, m = truth[k], ~kept[k]
        energy.append(float(np.sum(t[kept[k]] ** 2) / np.sum(t**2)))
        noise_err.append(rel_err(seen[k][m], t[m]))
        # The other clients' kept values at client k's masked positions (mean where any kept).
        vals = np.array([np.where(kept[j], truth[j], 0.0) for j in range(NUM_CLIENTS) if j != k])
        count = np.array([kept[j] for j in range(NUM_CLIENTS) if j != k]).sum(axis=0)
        mean_others = np.where(count > 0, vals.sum(axis=0) / np.maximum(count, 1), 0.0)
        others_err.append(rel_err(mean_others[m], t[m]))
        others_cos.append(cos(mean_others[m], t[m]))
        peer = (k + DOMAINS) % NUM_CLIENTS
        guess = np.where(kept[peer], truth[peer], 0.0)
        peer_err.append(rel_err(guess[m], t[m]))
        peer_cover.append(float(np.mean(kept[peer][m])))

    def domain_signal(vectors: list[np.ndarray]) -> tuple[float, float, int]:
        same, cross = [], []
        for i, j in itertools.combinations(range(NUM_CLIENTS), 2):
            (same if i % DOMAINS == j % DOMAINS else cross).append(cos(vectors[i], vectors[j]))
        hits = 0
        for i in range(NUM_CLIENTS):
            sims = [(cos(vectors[i], vectors[j]), j) for j in range(NUM_CLIENTS) if j != i]
            hits += max(sims)[1] % DOMAINS == i % DOMAINS
        return float(np.mean(same)), float(np.mean(cross)), hits

    visible = [np.where(kept[k], truth[k], 0.0) for k in range(NUM_CLIENTS)]
    m_same, m_cross, m_hits = domain_signal(visible)
    d_same, d_cross, d_hits = domain_signal(truth)
    return {
        "energy": float(np.mean(energy)),
        "noise_err": float(np.mean(noise_err)),
        "others_err": float(np.mean(others_err)),
        "others_cos": float(np.mean(others_cos)),
        "peer_err": float(np.mean(peer_err)),
        "peer_cover": float(np.mean(peer_cover)),
        "masked_same": m_same,
        "masked_cross": m_cross,
        "masked_hits": m_hits,
        "dense_same": d_same,
        "dense_cross": d_cross,
        "dense_hits": d_hits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"FedCDD round 1, {NUM_CLIENTS} clients (two per domain), seed {args.seed}; means over clients.\n")
    print(
        "| keep ratio ρ | energy in kept columns | masked: error of decoded noise | masked: error "
        "(cosine) of others' mean | masked: error of peer's values (covered) | cosine same / cross "
        "domain, masked | nearest is peer, masked | cosine same / cross, dense | nearest is peer, dense |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for keep in args.keep:
        r = measure(keep, args.seed)
        print(
            f"| {keep} | {r['energy']:.1%} | {r['noise_err']:.3f} | {r['others_err']:.3f} "
            f"({r['others_cos']:.3f}) | {r['peer_err']:.3f} ({r['peer_cover']:.0%}) | "
            f"{r['masked_same']:.3f} / {r['masked_cross']:.3f} | {r['masked_hits']}/{NUM_CLIENTS} | "
            f"{r['dense_same']:.3f} / {r['dense_cross']:.3f} | {r['dense_hits']}/{NUM_CLIENTS} |"
        )


if __name__ == "__main__":
    main()

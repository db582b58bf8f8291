#!/usr/bin/env python3
"""PEFT interoperability check of the `fedcdd` binary (run by tests/tests/peft_interop.rs).

Builds a tiny LLaMA from a config (no download), wraps it with PEFT LoRA, saves a global
adapter and three client adapters (one in float16) with `save_pretrained`, then:

* `fedcdd aggregate --algorithm fedavg` is checked against numpy  sum_i p_i theta_i  (f64);
* `fedcdd aggregate --algorithm fedcdd` is checked against a numpy reimplementation of
  FedCDD written from docs/fedcdd-spec.md (default switches);
* every output loads with `PeftModel.from_pretrained` on a fresh base model, its LoRA
  weights equal the file's tensors, a forward pass gives finite logits, and its
  adapter_config.json round-trips through `PeftConfig.from_pretrained`;
* `fedcdd encode --keep-ratio 1` + `fedcdd decode` reproduces client 0's adapter.

Prints one line per check and exits 1 if any check failed.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import (  # noqa: E402
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
)
from safetensors import safe_open  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
torch.set_num_threads(1)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COUNTS = [10, 20, 30]
EPS = 1e-8

FAILURES = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def base_model():
    """The same tiny LLaMA every time (fixed seed), in eval mode."""
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def read_tensors(path):
    """name -> (np.float64 array, dtype string) of an adapter dir or .safetensors file."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (t.to(torch.float64).numpy(), str(t.dtype).replace("torch.", ""))
    return out


def run(fedcdd, *args):
    cmd = [fedcdd, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"command failed ({r.returncode}): {' '.join(cmd)}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        )
    return r


def rel(a, b):
    d = np.linalg.norm(a - b)
    n = np.linalg.norm(b)
    return d / n if n > 0 else d


def elementwise_rel(a, e):
    """max |a - e| / (|e| + rms(e))."""
    floor = np.sqrt(np.mean(e * e))
    return float(np.max(np.abs(a - e) / (np.abs(e) + floor + 1e-300)))


def ref_fedcdd(g, deltas, n):
    """FedCDD on one [R, C] tensor from the spec: column norms of the stored tensor,
    target delta, weighting p_relu with the p_i fallback, renormalise on, lambda = 1."""
    p = np.asarray(n, dtype=np.float64)
    p = p / p.sum()
    N = len(deltas)
    mags = [np.linalg.norm(x, axis=0) for x in deltas]  # [C] each
    dirs = [x / np.maximum(m, EPS)[None, :] for x, m in zip(deltas, mags)]
    mbar = sum(pi * m for pi, m in zip(p, mags))
    if N == 1:
        w = np.ones(1)
    else:
        units = []
        for d in dirs:
            nd = np.linalg.norm(d)
            units.append(d.ravel() / nd if nd > 0 else np.zeros(d.size))
        v = np.array(
            [sum(units[i] @ units[k] for k in range(N) if k != i) / (N - 1) for i in range(N)]
        )
        denom = float(np.sum(p * np.maximum(v, 0.0)))
        w = p if denom < EPS else p * np.maximum(v, 0.0) / denom
    dbar = sum(wi * d for wi, d in zip(w, dirs))
    dhat = dbar / np.maximum(np.linalg.norm(dbar, axis=0), EPS)[None, :]
    return g + mbar[None, :] * dhat


def lora_state(model):
    """LoRA tensors of a PEFT model, keyed as in adapter_model.safetensors."""
    return {k: v.detach().to(torch.float64).numpy() for k, v in get_peft_model_state_dict(model).items()}


def check_loads_in_peft(tag, out_dir, global_cfg, fedcdd_tensors, input_ids, base_logits):
    """PeftModel.from_pretrained + weights equal the file + finite logits + config round trip."""
    model = PeftModel.from_pretrained(base_model(), str(out_dir))
    model.eval()
    loaded = lora_state(model)
    missing = sorted(set(fedcdd_tensors) - set(loaded))
    extra = sorted(set(loaded) - set(fedcdd_tensors))
    check(f"{tag}: PEFT loads every tensor of the file", not missing and not extra,
          f"missing {missing[:3]}, extra {extra[:3]}")
    worst = 0.0
    for k, (arr, _) in fedcdd_tensors.items():
        if k in loaded:
            worst = max(worst, float(np.max(np.abs(loaded[k] - arr))))
    check(f"{tag}: loaded LoRA weights equal the file's tensors", worst == 0.0, f"max |diff| {worst:.3e}")
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    finite = bool(torch.isfinite(logits).all())
    check(f"{tag}: forward pass gives finite logits", finite, f"shape {tuple(logits.shape)}")
    changed = float((logits - base_logits).abs().max())
    check(f"{tag}: the adapter changes the logits", changed > 0.0, f"max |diff| {changed:.3e}")
    cfg = PeftConfig.from_pretrained(str(out_dir))
    same = (
        cfg.peft_type == global_cfg.peft_type
        and cfg.r == global_cfg.r
        and cfg.lora_alpha == global_cfg.lora_alpha
        and set(cfg.target_modules) == set(global_cfg.target_modules)
        and cfg.task_type == global_cfg.task_type
    )
    check(f"{tag}: adapter_config.json round-trips through PeftConfig", same,
          f"r={cfg.r} alpha={cfg.lora_alpha} targets={sorted(cfg.target_modules)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fedcdd", required=True, help="path of the fedcdd binary")
    ap.add_argument("--work", required=True, help="empty work directory")
    a = ap.parse_args()
    fedcdd = a.fedcdd
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    # 1. global adapter
    model = get_peft_model(
        base_model(),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    model.eval()
    gen = torch.Generator().manual_seed(7)
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in lora_params.items():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    global_values = {n: p.detach().clone() for n, p in lora_params.items()}
    gdir = work / "global"
    model.save_pretrained(str(gdir))

    # 2. clients: shared + own perturbation; client 2 saved in float16
    shared = {n: torch.randn(v.shape, generator=gen) for n, v in global_values.items()}
    clients = []
    for i in range(3):
        with torch.no_grad():
            for n, p in lora_params.items():
                scale = 0.01 * float(global_values[n].std()) / 0.02 + 0.005
                own = torch.randn(p.shape, generator=gen)
                p.copy_(global_values[n] + scale * ((0.5 + 0.5 * i) * shared[n] + own))
        cdir = work / f"client{i}"
        if i == 2:
            for p in lora_params.values():
                p.data = p.data.half()
            model.save_pretrained(str(cdir))
            for p in lora_params.values():
                p.data = p.data.float()
        else:
            model.save_pretrained(str(cdir))
        clients.append(cdir)
    with torch.no_grad():
        for n, p in lora_params.items():
            p.copy_(global_values[n])

    G = read_tensors(gdir)
    C = [read_tensors(c) for c in clients]
    check("global adapter saved by PEFT", len(G) == 2 * 2 * len(TARGETS), f"{len(G)} tensors")
    dtypes = {dt for _, dt in C[2].values()}
    check("client 2 saved in float16", dtypes == {"float16"}, f"dtypes {sorted(dtypes)}")
    global_cfg = PeftConfig.from_pretrained(str(gdir))
    global_cfg_json = json.loads((gdir / "adapter_config.json").read_text())

    input_ids = (torch.arange(16) * 7 % 128).reshape(1, 16)
    with torch.no_grad():
        base_logits = base_model()(input_ids=input_ids).logits

    # 3a. FedAvg
    client_args = []
    for c, n in zip(clients, COUNTS):
        client_args += ["--client", f"{c}:{n}"]
    out_avg = work / "out_fedavg"
    run(fedcdd, "aggregate", "--algorithm", "fedavg", "--global", gdir, *client_args, "--out", out_avg)
    A = read_tensors(out_avg)
    p = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    worst = 0.0
    for k, (g, _) in G.items():
        want = sum(pi * c[k][0] for pi, c in zip(p, C))
        worst = max(worst, elementwise_rel(A[k][0], want))
    check("fedavg equals numpy sum_i p_i theta_i", worst <= 1e-5 and set(A) == set(G), f"max rel err {worst:.2e}")
    check("fedavg output dtypes are the global's",
          all(A[k][1] == G[k][1] for k in G), f"{sorted({v[1] for v in A.values()})}")

    # 3b. FedCDD
    out_cdd = work / "out_fedcdd"
    run(fedcdd, "aggregate", "--algorithm", "fedcdd", "--global", gdir, *client_args, "--out", out_cdd)
    D = read_tensors(out_cdd)
    worst, worst_name, gap = 0.0, "", np.inf
    for k, (g, _) in G.items():
        if g.ndim != 2:
            raise RuntimeError(f"unexpected tensor shape {k}: {g.shape}")
        deltas = [c[k][0] - g for c in C]
        want = ref_fedcdd(g, deltas, COUNTS)
        err = rel(D[k][0] - g, want - g)
        if err > worst:
            worst, worst_name = err, k
        avg = sum(pi * c[k][0] for pi, c in zip(p, C))
        gap = min(gap, rel(avg - g, want - g))
    check("fedcdd equals the numpy reference (per tensor, relative to the step)", worst <= 1e-4,
          f"max rel err {worst:.2e} at {worst_name}")
    check("fedcdd differs from fedavg on these clients", gap > 1e-3, f"min relative gap {gap:.2e}")

    # 4. PEFT loads the outputs
    for tag, out, tensors in (("fedavg", out_avg, A), ("fedcdd", out_cdd, D)):
        cfg_json = json.loads((out / "adapter_config.json").read_text())
        check(f"{tag}: adapter_config.json equals the global's", cfg_json == global_cfg_json)
        check_loads_in_peft(tag, out, global_cfg, tensors, input_ids, base_logits)

    # 5. encode --keep-ratio 1, decode
    up = work / "client0.fcdu"
    run(fedcdd, "encode", "--global", gdir, "--local", clients[0], "--out", up, "--keep-ratio", "1",
        "--samples", COUNTS[0])
    dec = work / "decoded0"
    run(fedcdd, "decode", up, "--global", gdir, "--out", dec)
    R = read_tensors(dec)
    worst = max(float(np.max(np.abs(R[k][0] - C[0][k][0]) / (np.abs(C[0][k][0]) + 1e-3))) for k in C[0])
    check("encode --keep-ratio 1 + decode reproduces client 0", worst <= 1e-6 and set(R) == set(C[0]),
          f"max rel err {worst:.2e}")
    model = PeftModel.from_pretrained(base_model(), str(dec))
    loaded = lora_state(model)
    worst = max(float(np.max(np.abs(loaded[k] - C[0][k][0]))) for k in C[0])
    check("decoded adapter loads in PEFT with client 0's weights", worst <= 1e-6, f"max |diff| {worst:.2e}")

    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed: {', '.join(FAILURES)}", flush=True)
        return 1
    print("all PEFT interop checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

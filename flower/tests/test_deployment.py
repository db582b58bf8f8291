"""The fedcdd Flower app on a real deployment (not the simulation engine): a SuperLink and one
SuperNode per client on 127.0.0.1, `flwr run`, and the results compared with `fedcdd run`
in one process.

Needs: flwr, numpy, the `fedcdd` package importable by the SuperNodes (PYTHONPATH) with
$FEDCDD_LIB pointing at libfedcdd, and $FEDCDD_BIN at the `fedcdd` CLI. The Rust test
`tests/tests/flower_deployment.rs` sets them up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Deployment  # noqa: E402

APP = Path(__file__).resolve().parents[1]
CLIENTS = 4
ROUNDS = 3
# `fedcdd run` config keys of the runs below (small: a debug build on 2 cores).
RUN = {
    "rounds": ROUNDS,
    "local_steps": 3,
    "eval_questions": 8,
    "builtin_train_items": 300,
    "threads": 1,
    "references": [],
}
# The same as Flower run config keys.
FLOWER = {
    "num-server-rounds": ROUNDS,
    "train.local-steps": 3,
    "fedcdd.eval-questions": 8,
    "fedcdd.builtin-train-items": 300,
    "fedcdd.threads": 1,
    "fedcdd.round-timeout": 600.0,
    "fedcdd.discovery-timeout": 120.0,
}


def fedcdd_bin() -> str:
    b = os.environ.get("FEDCDD_BIN") or shutil.which("fedcdd")
    if not b:
        pytest.skip("SKIPPED: no fedcdd binary ($FEDCDD_BIN)")
    return b


def toml(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def reference(out: Path, **extra: Any) -> Path:
    """`fedcdd run` in one process with RUN and `extra`; returns the run directory."""
    sets: list[str] = []
    for k, v in {**RUN, **extra}.items():
        sets += ["--set", f"{k}={toml(v)}"]
    subprocess.run([fedcdd_bin(), "run", "--quiet", "--out", str(out), *sets], check=True, timeout=1200, capture_output=True)
    return out


def adapter_bytes(run_dir: Path) -> bytes:
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def round_lines(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines if json.loads(l)["kind"] == "round"]


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + s : 8 + n + e], dtype=np.float32).reshape(info["shape"])
    return out


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("deploy")
    # The built-in base model is built once, by the first reference run, before any node
    # starts (otherwise every process would build it).
    refs = root / "refs"
    reference(refs / "fedcdd")
    with Deployment(root, [{"partition-id": k} for k in range(CLIENTS)], {}) as d:
        yield d, root, refs
    assert not d.leftovers(), "a process still listens"
    assert not d.procs, "a process was not stopped"


def test_fedcdd_on_flower_equals_fedcdd_run(healthy: Any) -> None:
    d, root, refs = healthy
    run_dir = root / "flower-fedcdd"
    t0 = time.monotonic()
    status, log = d.run(APP, {**FLOWER, "fedcdd.run-dir": str(run_dir)})
    seconds = time.monotonic() - t0
    assert status == "finished:completed", log
    assert adapter_bytes(run_dir) == adapter_bytes(refs / "fedcdd"), "the global adapters differ"
    ours, ref = round_lines(run_dir), round_lines(refs / "fedcdd")
    assert [l["upload_bytes"] for l in ours] == [l["upload_bytes"] for l in ref]
    assert [l["clients"] for l in ours] == [l["clients"] for l in ref]
    for f in ["summary.md", "metrics.csv", "rounds.csv", "accuracy.svg", "config.toml"]:
        assert (run_dir / f).is_file(), f
    print(f"PERF flower fedcdd: {ROUNDS} rounds in {seconds:.1f} s wall (incl. submission); "
          f"round seconds {[round(l['seconds'], 2) for l in ours]} vs in-process "
          f"{[round(l['seconds'], 2) for l in ref]}; upload bytes per round {[l['upload_bytes'] for l in ours]}")


def test_scaffold_with_server_state_equals_fedcdd_run(healthy: Any) -> None:
    d, root, refs = healthy
    run_dir = root / "flower-scaffold"
    status, log = d.run(APP, {**FLOWER, "fedcdd.algorithm": "scaffold", "fedcdd.run-dir": str(run_dir)})
    assert status == "finished:completed", log
    ref = reference(refs / "scaffold", algorithm="scaffold")
    assert adapter_bytes(run_dir) == adapter_bytes(ref)
    assert [l["upload_bytes"] for l in round_lines(run_dir)] == [l["upload_bytes"] for l in round_lines(ref)]


def test_stock_flower_fedavg_drives_dense_clients(healthy: Any) -> None:
    d, root, refs = healthy
    run_dir = root / "flower-stock"
    # One round: the difference is then the summation order alone (Flower sums Σ p_i θ_i as
    # replies arrive, fedcdd adds Σ p_i Δ_i to G); over more rounds local AdamW training
    # amplifies it (measured: 2.8e-6 absolute after 3 rounds, adapter entries ~0.05).
    cfg = {
        **FLOWER,
        "num-server-rounds": 1,
        "fedcdd.algorithm": "fedavg",
        "fedcdd.keep-ratio": 1.0,
        "fedcdd.server": "stock-fedavg",
        "fedcdd.upload": "dense",
        "fedcdd.run-dir": str(run_dir),
    }
    status, log = d.run(APP, cfg)
    assert status == "finished:completed", log
    final = dict(np.load(run_dir / "final_arrays.npz"))
    ref_dir = reference(refs / "fedavg-dense", algorithm="fedavg", keep_ratio=1.0, rounds=1)
    ref = read_safetensors(ref_dir / "adapter" / "adapter_model.safetensors")
    assert set(final) == set(ref)
    for name, want in ref.items():
        got = final[name]
        # A few f32 roundings of the tensor's largest entry.
        bound = 4 * np.finfo(np.float32).eps * float(np.abs(want).max())
        assert np.abs(got - want).max() <= bound, (name, float(np.abs(got - want).max()), bound)


def test_a_dead_node_and_a_corrupt_upload(tmp_path: Path) -> None:
    fedcdd_bin()
    nodes: list[dict[str, Any]] = [{"partition-id": k} for k in range(CLIENTS)]
    nodes[1]["fault"] = "nan-upload"
    run_dir = tmp_path / "flower-faults"
    with Deployment(tmp_path, nodes, {}) as d:
        cfg = {**FLOWER, "num-server-rounds": 2, "fedcdd.round-timeout": 20.0, "fedcdd.run-dir": str(run_dir)}
        run_id = d.submit(APP, cfg)
        state = run_dir / "checkpoint" / "state.json"

        def kill_after_round_one() -> None:
            if "node3" in d.procs and state.is_file():
                if json.loads(state.read_text()).get("rounds_done", 0) >= 1:
                    d.kill_node(3)

        status = d.wait(run_id, 600, on_poll=kill_after_round_one, interval=0.3)
        log = d.log(run_id)
    assert not d.leftovers() and not d.procs
    assert status == "finished:completed", log
    rounds = round_lines(run_dir)
    assert rounds[0]["clients"] == [0, 2, 3] and rounds[1]["clients"] == [0, 2]
    assert rounds[1]["missing_clients"] == [3]
    for r in rounds:
        assert any("client 1" in why and "non-finite" in why and "lora" in why for why in r["rejected"]), r
    summary = (run_dir / "summary.md").read_text()
    assert "round 2: client 3 sent no reply" in summary
    assert "rejected the reply of client 1" in summary
    g = read_safetensors(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(np.isfinite(v).all() for v in g.values())

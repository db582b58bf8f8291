#!/usr/bin/env python3
"""Peak RSS of a deployment's server (libfedcdd's `Server`, what the Flower ServerApp runs)
for one round of N clients of the same adapter, against the bytes it receives.

    python3 scripts/flower_server_rss.py 2 8 32

For each N: a first process trains the N clients of the built-in benchmark (N clients over its
four domains) and writes their uploads; a fresh second process opens the server, takes the N
uploads and runs the round (FedCDD's two streaming passes decode one upload at a time), and
reports its peak RSS (VmHWM) after opening and at the end. Needs the `fedcdd` package
(PYTHONPATH=python, FEDCDD_LIB=target/release/libfedcdd.so).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import fedcdd


def config(n: int) -> dict:
    return {
        "num_clients": n,
        "sample_clients": n,
        "rounds": 1,
        "local_steps": 2,
        "eval_questions": 8,
        "builtin_train_items": 400,
        "threads": 2,
        "references": [],
    }


def status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmHWM: peak RSS, VmRSS: RSS now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def clients(n: int, out: Path) -> None:
    cfg = config(n)
    g = fedcdd.Client(cfg, 0).initial_adapter()
    for k in range(n):
        res = fedcdd.Client(cfg, k).train_round(0, g)
        (out / f"upload-{k}.fcdu").write_bytes(res.upload)
        (out / f"loss-{k}").write_text(repr(res.loss))
    dense = sum(4 * v.size for v in g.values())
    (out / "dense").write_text(str(dense))


def server(n: int, out: Path) -> None:
    cfg = config(n)
    s = fedcdd.Server(cfg, out / "run")
    opened, rss_open = status("VmHWM"), status("VmRSS")
    s.begin_round(0)
    received = 0
    for k in range(n):
        data = (out / f"upload-{k}.fcdu").read_bytes()
        received += len(data)
        s.add_reply(k, data, None, float((out / f"loss-{k}").read_text()))
    rss_kept = status("VmRSS")
    s.finish_round()
    end = status("VmHWM")
    dense = int((out / "dense").read_text())
    print(
        json.dumps(
            {
                "clients": n,
                "upload_bytes": received,
                "dense_bytes": n * dense,
                "peak_rss_after_open": opened,
                "peak_rss_at_end": end,
                "rss_growth_holding_the_uploads": rss_kept - rss_open,
            }
        )
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("clients", "server"):
        n, out = int(sys.argv[2]), Path(sys.argv[3])
        (clients if sys.argv[1] == "clients" else server)(n, out)
        return
    for n in [int(a) for a in sys.argv[1:]] or [2, 8, 32]:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, __file__, "clients", str(n), d], check=True)
            subprocess.run([sys.executable, __file__, "server", str(n), d], check=True)


if __name__ == "__main__":
    np.seterr(all="raise")
    main()

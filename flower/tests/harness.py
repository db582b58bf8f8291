"""A real Flower deployment on 127.0.0.1 for the tests: one `flower-superlink` and one
`flower-supernode` per client, on free ports, with a temporary FLWR_HOME, telemetry and
update checks off, no runtime dependency installation. Every process is started in its own
session and stopped by its PID (its whole process group) when the deployment ends; every
step is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Deployment:
    """SuperLink + SuperNodes; use as a context manager."""

    def __init__(self, root: Path, node_configs: list[Mapping[str, Any]], env: Mapping[str, str]) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(env)
        self.env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
            }
        )
        self.node_configs = list(node_configs)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        # Every process ever started and every port handed out, to check afterwards that
        # nothing still listens.
        self.pids: list[int] = []
        self.ports: list[int] = [self.port]

    # -- processes ---------------------------------------------------------------------------

    def _start(self, name: str, cmd: list[str]) -> None:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self.pids.append(self.procs[name].pid)

    def _stop(self, name: str, timeout: float = 10.0) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=timeout)

    def _port(self) -> int:
        p = free_port()
        self.ports.append(p)
        return p

    def leftovers(self) -> list[str]:
        """Listening sockets still held by our processes or on our ports."""
        return listening(self.pids, self.ports)

    def kill_node(self, index: int) -> None:
        """Kills SuperNode `index` and its ClientApp processes at once (SIGKILL)."""
        p = self.procs.pop(f"node{index}")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def __enter__(self) -> "Deployment":
        try:
            self._start(
                "superlink",
                [
                    "flower-superlink",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            self._wait_healthy(60)
            for i, nc in enumerate(self.node_configs):
                conf = " ".join(f"{k}={toml_value(v)}" for k, v in nc.items())
                self._start(
                    f"node{i}",
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.port}",
                        "--port",
                        str(self._port()),
                        "--node-config",
                        conf,
                    ],
                )
            (self.home / "config.toml").write_text(
                '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            self._stop(name)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.procs["superlink"]
            if p.poll() is not None:
                raise RuntimeError(f"the SuperLink exited: {self.logs['superlink'].read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the SuperLink did not become healthy")

    # -- runs ------------------------------------------------------------------------------

    def flwr(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, app: Path, run_config: Mapping[str, Any]) -> str:
        conf = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        out = self.flwr(["run", str(app), "test", "--format", "json", "--run-config", conf], timeout=300)
        start = out.stdout.find("{")
        if out.returncode != 0 or start < 0:
            raise RuntimeError(f"flwr run failed: {out.stdout}\n{out.stderr}")
        reply = json.loads(out.stdout[start:])
        if not reply.get("success"):
            raise RuntimeError(f"flwr run was refused: {reply}")
        return str(reply["run-id"])

    def status(self, run_id: str) -> str:
        out = self.flwr(["ls", "test", "--run-id", run_id, "--format", "json"])
        start = out.stdout.find("{")
        if start < 0:
            return "unknown"
        runs = json.loads(out.stdout[start:]).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def wait(self, run_id: str, timeout: float, on_poll: Any = None, interval: float = 2.0) -> str:
        """Polls the run until it is finished (`finished:*`) or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            if on_poll is not None:
                on_poll()
            time.sleep(interval)
        raise TimeoutError(f"run {run_id} still {status} after {timeout:.0f} s")

    def log(self, run_id: str) -> str:
        out = self.flwr(["log", run_id, "test", "--show"], timeout=60)
        return out.stdout + out.stderr

    def run(self, app: Path, run_config: Mapping[str, Any], timeout: float = 900) -> tuple[str, str]:
        """Submits a run and waits for it; returns (status, the run's log)."""
        run_id = self.submit(app, run_config)
        status = self.wait(run_id, timeout)
        return status, self.log(run_id)


def listening(pids: list[int], ports: list[int]) -> list[str]:
    """Lines of `ss -ltnp` that belong to any of `pids` or listen on any of `ports`."""
    try:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [
        line
        for line in out.splitlines()
        if any(f"pid={p}," in line for p in pids) or any(f":{port} " in line for port in ports)
    ]

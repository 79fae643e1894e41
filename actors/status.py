"""The run as `hitl status` shows it: the coordinator keeps one small record up to date.

    board = StatusBoard(run_dir, run_id="3f2a91c0-", rounds=5)
    board.update(stage="ppo", round=2, ppo="3/8", kl=1.2)
    board.error("round 2: ActorDiedError: ...")

The record is written to `<run_dir>/status.json` (replaced atomically, so a reader never sees
half of it) and, when Ray is up, to Ray's internal key-value store under `hitl`/`status:<run
id>`, so `hitl status --address ADDR` finds a job's status on a cluster without its disk.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

KV_NAMESPACE = "hitl"
KV_PREFIX = "status:"


class StatusBoard:
    def __init__(self, run_dir: Path, run_id: str, rounds: int):
        self.path = Path(run_dir) / "status.json"
        self.record: dict[str, Any] = {"run_id": run_id, "run_dir": str(Path(run_dir).resolve()), "host": socket.gethostname(),
                                       "pid": os.getpid(), "started_at": time.time(), "rounds": rounds, "state": "running",
                                       "last_error": None, "metrics": {}}

    def update(self, **values: Any) -> None:
        """Progress fields (stage, round, policy_version, feedback, ...) and metrics (numbers)."""
        for key, value in values.items():
            if key in ("reward", "kl", "win_rate", "reward_accuracy", "feedback_to_policy_s"):
                self.record["metrics"][key] = _plain(value)
            else:
                self.record[key] = _plain(value)
        self._write()

    def error(self, message: str) -> None:
        self.record["last_error"] = {"message": message[:2000], "at": time.time()}
        self._write()

    def finish(self, state: str) -> None:
        """`finished`, `stopped early` or `failed`."""
        self.record["state"] = state
        self._write()

    def _write(self) -> None:
        self.record["updated_at"] = time.time()
        text = json.dumps(self.record, indent=2)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full or read-only disk must not stop the run; the KV copy may still do
        _put_kv(self.record["run_id"], text)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool, type(None), dict, list)) else str(value)


def _put_kv(run_id: str, text: str) -> None:
    try:
        import ray
        from ray.experimental import internal_kv

        if ray.is_initialized():
            internal_kv._internal_kv_put(f"{KV_PREFIX}{run_id}", text, overwrite=True, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - the file copy is the one that counts
        pass


def read_cluster_statuses() -> list[dict[str, Any]]:
    """Every run's status in the connected cluster's key-value store, newest first."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE)
    out = []
    for key in keys:
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            out.append(json.loads(raw))
    return sorted(out, key=lambda s: s.get("updated_at", 0), reverse=True)


def render(status: dict[str, Any], report: dict[str, Any] | None = None, now: float | None = None) -> str:
    """One screen: where the run is, its last figures, its last error."""
    now = time.time() if now is None else now
    m = status.get("metrics") or {}
    age = now - status.get("updated_at", now)
    lines = [
        f"run {status.get('run_id') or '-'}  ({status.get('run_dir')})  on {status.get('host')} pid {status.get('pid')}",
        f"state       {status.get('state')}" + (f": {status['stopped']}" if status.get("stopped") else "")
        + f"   (updated {age:.0f}s ago)",
        f"stage       {status.get('stage', '-')}   round {status.get('round', '-')}   ppo {status.get('ppo', '-')}",
        f"policy      v{status.get('policy_version', 0)}   watermark {status.get('watermark', 0)}   feedback {status.get('feedback', '-')}",
        "last        " + "   ".join(f"{k} {_fmt(m.get(k))}" for k in ("win_rate", "reward_accuracy", "reward", "kl", "feedback_to_policy_s")),
    ]
    if report and report.get("rounds"):
        lines.append("rounds      " + "  ".join(f"{r['round']}:{_fmt(r.get('win_rate'))}" for r in report["rounds"][-10:])
                     + "   (win-rate by round)")
    err = status.get("last_error")
    lines.append(f"last error  {err['message'].splitlines()[0][:160]}" if err else "last error  none")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)

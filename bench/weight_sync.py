"""Weight sync: a new policy version from the trainer to R generation engines, by the sync
group (the default), by the object store, and as a raw broadcast of the same bytes, in one run.

    python bench/weight_sync.py --quick        # tiny (LoRA, full), SmolLM2-135M LoRA; R = 1, 2
    python bench/weight_sync.py                # adds SmolLM2-135M full weights

The engines are the real `GenerationEngine` actors (services/generation/engines.py); this
process stands where trainer rank 0 stands.

group:    `SyncGroup.send` (rlhf/sync.py): the tensors packed into the layout's buckets, the
          header in the store, the buckets broadcast over gloo, every engine copies them into
          its model under its batch lock, then the all-reduce by which all confirm. The
          time until every engine serves the version.
objstore: `publish_weights` (services/generation/server.py): one packed buffer through
          ray.put and the broadcaster actor, each engine fetches and applies it, the call
          returns when all report the version.
raw:      the same buckets (the same bytes, the same cut) broadcast over a gloo group of this
          process and R plain actors, then one all-reduce so the sender knows all have them:
          what moving the bytes costs, with nothing packed, applied or announced.
Each repeat measures raw, group and objstore in turn (medians of the repeats after a first,
uncounted one), so a change in the machine's load falls on all three. The last line is one
JSON object: `group_push_vs_raw` is the worst group/raw of the SmolLM2 LoRA rows (target
<= 1.3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import time

import ray
import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo(host: str, port: int, rank: int, world: int, prefix: str):
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world, TIMEOUT), store


def _all_min(pg, value: int = 1) -> None:
    flag = torch.tensor([value], dtype=torch.int64)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    pg.allreduce([flag], opts).wait()


@ray.remote(num_cpus=0.25)
class RawReceiver:
    """A member of the raw group: receives the buckets, nothing else."""

    def join(self, host: str, port: int, rank: int, world: int, layout) -> None:
        self.pg, self._store = _gloo(host, port, rank, world, "raw")
        self.flats = layout.flat_buffers()

    def receive(self) -> None:
        _all_min(self.pg)  # ready (not timed)
        for flat in self.flats:
            self.pg.broadcast(flat, 0).wait()
        _all_min(self.pg)  # have them


class Case:
    """One model and R engines, with the three paths set up."""

    def __init__(self, model_cfg, lora, replicas: int, bucket_bytes: int):
        from rlhf.sync import SyncGroup
        from services.generation.config import GenerationConfig
        from services.generation.engines import EngineGroup

        self.replicas = replicas
        self.gen = GenerationConfig(replicas=replicas, num_cpus=0.25, weight_sync="group", sync_bucket_bytes=bucket_bytes)
        self.engines = EngineGroup.start(model_cfg, lora, self.gen, [{"num_cpus": 0.25}] * replicas)
        self.layout = ray.get(self.engines.engines[0].weight_layout.remote())
        self.adapters_only = lora is not None and lora.enabled
        self.tensors = {s.name: torch.randn(s.shape).to(s.torch_dtype) for s in self.layout.specs}
        world = 1 + replicas
        # the sync group (engines as ranks 1..R)
        port = _free_port()
        refs = self.engines.join_sync("127.0.0.1", port, "gloo")
        self.sync = SyncGroup.join("127.0.0.1", port, 0, world, self.layout, "gloo", 300.0)
        ray.get(refs)
        # the object-store path to the same engines
        self.engines.follow_broadcaster()
        # the raw group of plain actors
        port = _free_port()
        self.receivers = [RawReceiver.remote() for _ in range(replicas)]
        refs = [r.join.remote("127.0.0.1", port, i + 1, world, self.layout) for i, r in enumerate(self.receivers)]
        self.raw_pg, self._raw_store = _gloo("127.0.0.1", port, 0, world, "raw")
        ray.get(refs)
        self.raw_flats = self.layout.flat_buffers()
        self.layout.pack(self.tensors, self.raw_flats)
        self.version = 0

    def raw(self) -> float:
        refs = [r.receive.remote() for r in self.receivers]
        _all_min(self.raw_pg)
        started = time.perf_counter()
        for flat in self.raw_flats:
            self.raw_pg.broadcast(flat, 0).wait()
        _all_min(self.raw_pg)
        took = time.perf_counter() - started
        ray.get(refs)
        return took

    def group(self) -> float:
        self.version += 1
        started = time.perf_counter()
        self.sync.send(self.version, self.tensors)  # returns once every engine applied it
        return time.perf_counter() - started

    def objstore(self) -> float:
        from services.generation.server import publish_weights

        self.version += 1
        return publish_weights(self.version, self.tensors, self.adapters_only, self.replicas, timeout_s=600)

    def close(self) -> None:
        from services.generation.server import get_broadcaster

        self.engines.leave_sync()
        self.engines.shutdown()
        for r in self.receivers:
            ray.kill(r)
        ray.kill(get_broadcaster())  # the next case's versions start afresh


def measure(name: str, model_cfg, lora, replicas: int, repeats: int, bucket_bytes: int) -> dict:
    case = Case(model_cfg, lora, replicas, bucket_bytes)
    try:
        times: dict[str, list[float]] = {"raw": [], "group": [], "objstore": []}
        for _ in range(repeats + 1):
            for path in times:
                times[path].append(getattr(case, path)())
        served = case.engines.policy_versions()
        assert served == [case.version] * replicas, f"engines serve {served}, not {case.version}"
    finally:
        case.close()
    raw, group, objstore = (statistics.median(t[1:]) for t in times.values())
    return {"case": name, "replicas": replicas, "mbytes": case.layout.nbytes / 2**20, "buckets": len(case.layout.buckets),
            "raw_ms": raw * 1000, "group_ms": group * 1000, "objstore_ms": objstore * 1000,
            "group_vs_raw": group / raw, "objstore_vs_raw": objstore / raw}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--bucket-mb", type=float, default=256.0, help="generation.sync_bucket_bytes, in MiB")
    args = parser.parse_args()
    repeats = args.repeats or (9 if args.quick else 15)
    bucket_bytes = int(args.bucket_mb * 2**20)

    from rlhf.models import LoraConfig, ModelConfig

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    torch.set_num_threads(1)
    lora = LoraConfig(enabled=True)
    cases = [
        ("tiny LoRA", ModelConfig(source="tiny"), lora),
        ("tiny full", ModelConfig(source="tiny"), None),
        ("SmolLM2-135M LoRA", ModelConfig(source="smollm2"), lora),
    ]
    if not args.quick:
        cases.append(("SmolLM2-135M full", ModelConfig(source="smollm2"), None))
    rows = []
    for name, model_cfg, case_lora in cases:
        for replicas in (1, 2):
            row = measure(name, model_cfg, case_lora, replicas, repeats, bucket_bytes)
            rows.append(row)
            print(f"  {name:<20} R={replicas}: raw {row['raw_ms']:.2f} ms, group {row['group_ms']:.2f} ms, "
                  f"objstore {row['objstore_ms']:.2f} ms", flush=True)
    ray.shutdown()

    print()
    print(f"{'case':<20} {'R':>2} {'MiB':>8} {'raw ms':>9} {'group ms':>9} {'objstore ms':>12} {'group/raw':>10} {'objstore/raw':>13}")
    for r in rows:
        print(f"{r['case']:<20} {r['replicas']:>2} {r['mbytes']:>8.2f} {r['raw_ms']:>9.2f} {r['group_ms']:>9.2f} "
              f"{r['objstore_ms']:>12.2f} {r['group_vs_raw']:>10.2f} {r['objstore_vs_raw']:>13.2f}")
    smol_lora = [r for r in rows if r["case"] == "SmolLM2-135M LoRA"]
    full = [r for r in rows if "full" in r["case"]]
    headline = max(r["group_vs_raw"] for r in smol_lora)
    print(f"\ngroup push / raw broadcast, SmolLM2 LoRA (worst R): {headline:.2f} (target <= 1.3)")
    print(json.dumps({
        "group_push_vs_raw": round(headline, 3),
        "full_group_push_vs_raw": round(max(r["group_vs_raw"] for r in full), 3),
        "objstore_push_vs_raw": round(max(r["objstore_vs_raw"] for r in smol_lora), 3),
        "target_met": headline <= 1.3,
        "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }))


if __name__ == "__main__":
    main()

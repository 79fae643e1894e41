"""Weight sync: pushing new policy weights to R generation replicas, against the raw
cost of moving the same bytes through Ray's object store, in the same run.

    python bench/weight_sync.py --quick        # tiny model (LoRA and full), SmolLM2 LoRA; R = 1, 2
    python bench/weight_sync.py                # adds SmolLM2 full weights

push:  `publish_weights` — the tensors packed into one buffer, ray.put (or, when small,
       sent inside the broadcaster's call), the broadcaster wakes every replica, each
       replica fetches the buffer and copies the tensors in under its batch lock, its
       next poll reports the version.
raw:   ray.put of the same tensors (the dict as it is), then R plain actors `ray.get`
       them and touch every tensor (sum), i.e. the bytes moved through the object store
       and read once. Target: push within 1.5x raw.
raw1:  for reference, the same with the tensors packed as push packs them (one buffer
       plus an index; packing counted): what is left of push over raw1 is the cost of
       the extra hops (driver -> broadcaster -> replicas -> broadcaster -> driver).
Each repeat measures raw, raw1 and push one after another (medians of the repeats after
a first, uncounted one), so a change in the machine's load falls on all three.
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ray
import torch


@ray.remote(num_cpus=0.25)
class Receiver:
    def take(self, wrapped) -> float:
        tensors = ray.get(wrapped[0])
        return float(sum(t.float().sum() for t in tensors.values()))

    def take_packed(self, wrapped) -> float:
        from services.generation.packing import unpack_tensors

        tensors = unpack_tensors(ray.get(wrapped[0]))
        return float(sum(t.float().sum() for t in tensors.values()))


def raw_once(tensors: dict, receivers: list) -> float:
    started = time.perf_counter()
    ref = ray.put(tensors)
    ray.get([r.take.remote([ref]) for r in receivers])
    return time.perf_counter() - started


def raw_packed_once(tensors: dict, receivers: list) -> float:
    from services.generation.packing import pack_tensors

    started = time.perf_counter()
    ref = ray.put(pack_tensors(tensors))
    ray.get([r.take_packed.remote([ref]) for r in receivers])
    return time.perf_counter() - started


def costs(tensors: dict, adapters_only: bool, receivers: list, first_version: int, repeats: int) -> tuple[float, float, float]:
    """Medians of raw, raw1 and push, measured in turn in each repeat; the first repeat warms up."""
    from services.generation.server import publish_weights

    raw, raw1, push = [], [], []
    for i in range(repeats + 1):
        raw.append(raw_once(tensors, receivers))
        raw1.append(raw_packed_once(tensors, receivers))
        scaled = {k: v + (i + 1) * 1e-4 for k, v in tensors.items()}
        push.append(publish_weights(first_version + i, scaled, adapters_only, len(receivers), timeout_s=600))
    return tuple(statistics.median(times[1:]) for times in (raw, raw1, push))


def measure(name: str, model_cfg, lora, replicas: int, repeats: int, version: list[int]) -> dict:
    from ray import serve

    from services.generation.config import GenerationConfig
    from services.generation.engine import PolicyEngine
    from services.generation.server import start_generation_server

    start_generation_server(model_cfg, lora, GenerationConfig(replicas=replicas, num_cpus=0.25), http=False)
    engine = PolicyEngine(model_cfg, lora)
    tensors = engine.weights()
    del engine
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    receivers = [Receiver.remote() for _ in range(replicas)]
    raw, raw1, push = costs(tensors, lora is not None and lora.enabled, receivers, version[0], repeats)
    version[0] += repeats + 1
    for r in receivers:
        ray.kill(r)
    serve.delete("hitl-generation")
    return {"case": name, "replicas": replicas, "mbytes": nbytes / 2**20, "raw_ms": raw * 1000, "raw1_ms": raw1 * 1000,
            "push_ms": push * 1000, "ratio": push / raw, "ratio_raw1": push / raw1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (9 if args.quick else 15)

    from rlhf.models import LoraConfig, ModelConfig
    from services.generation.server import get_broadcaster

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
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
            version = [1]
            rows.append(measure(name, model_cfg, case_lora, replicas, repeats, version))
            ray.kill(get_broadcaster())  # each case starts at version 0
            row = rows[-1]
            print(f"  {row['case']:<20} R={replicas}: push {row['push_ms']:.1f} ms, raw {row['raw_ms']:.1f} ms, raw1 {row['raw1_ms']:.1f} ms", flush=True)

    print()
    print(f"{'case':<20} {'R':>2} {'MiB':>8} {'raw ms':>9} {'raw1 ms':>9} {'push ms':>9} {'push/raw':>9} {'push/raw1':>10}")
    for r in rows:
        print(f"{r['case']:<20} {r['replicas']:>2} {r['mbytes']:>8.2f} {r['raw_ms']:>9.1f} {r['raw1_ms']:>9.1f} {r['push_ms']:>9.1f}"
              f" {r['ratio']:>9.2f} {r['ratio_raw1']:>10.2f}")
    lora_rows = [r for r in rows if "LoRA" in r["case"]]
    full_rows = [r for r in rows if "full" in r["case"]]
    worst_lora = max(r["ratio"] for r in lora_rows)
    worst_full = max(r["ratio"] for r in full_rows)
    print(f"\nworst push/raw: LoRA {worst_lora:.2f}, full {worst_full:.2f} (target <= 1.5)")
    ray.shutdown()
    print(json.dumps({
        "lora_push_vs_raw": round(worst_lora, 3),
        "full_push_vs_raw": round(worst_full, 3),
        "target_met": worst_lora <= 1.5 and worst_full <= 1.5,
        "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }))


if __name__ == "__main__":
    main()

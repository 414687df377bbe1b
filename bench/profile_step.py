"""Where a training step's GPU time goes, at a given batch: kernels grouped into attention, layer norms, matmuls,
loss, optimizer, memory and the rest, from torch.profiler.

    python bench/profile_step.py [--name=NAME] --batch_size=4096 --accumulation_steps=1 [--field=value ...]
        -> bench/results/NAME.json (default profile_bBATCH_MEMORY)
    INDEX_ENTRIES=N: the synthetic retrieval index's size per context length (bases, with index_layout=suffix_array,
    whose searches are gathers and compares: its kernels count as elementwise, not as "retrieval lookup"; the
    lookups are also timed alone, per step: lookup_ms_per_step). INDEX_ENTRIES=4380000000 is the spec's 4.5 Gbp.
    INDEX_FILE=PATH: instead, a retrieval index that run.sh cached (e.g. of bench/scale.py's 4.5 Gbp set, whose
    suffix array takes minutes to build): the real genomes' index, searched with the same random windows.
Synthetic tokens (the data pipeline is measured separately, as data_wait in the throughput runs); the step is
plant_lm_train.train_step itself: compiled forward/backward over the accumulation micro-batches, clip, fused AdamW,
memory observations and update. It is timed twice, replaying its CUDA graph (Config.cuda_graphs) and run eagerly;
the kernels profiled are the eager step's (the same kernels). Figures are per optimizer step (batch_size x
accumulation_steps windows).
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, gpu_header, write_result  # noqa: E402

# A kernel counts in the first group one of whose substrings its name holds. Inductor names a fused kernel after
# every op in it: a LayerNorm fused with the dropout and residual around it counts as layer norm.
GROUPS = [("retrieval lookup", ("searchsorted",)),
          # Inductor's attention softmax is "fused__softmax"; the loss's is "fused__log_softmax". The attention's
          # batched matmuls are cuBLAS kernels like the others: they count as matmuls.
          ("local attention (softmax; its batched matmuls count as matmuls)",
           ("flash", "fmha", "flex", "attention", "sdpa", "fused__softmax")),
          ("layer norm (+ fused dropout, residual, casts)", ("layer_norm",)),
          ("optimizer, gradient clipping", ("adam", "multi_tensor", "foreach", "lpnorm", "normtwo")),
          ("GELU (+ fused)", ("gelu",)),
          ("loss (log-softmax, mixture)", ("cross_entropy", "log_softmax", "nll")),
          ("embedding backward, bucket memory update", ("index_add", "scatter", "bincount", "embedding")),
          ("matmul (projections, MLP, head)", ("gemm", "cutlass", "xmma", "sm90", "nvjet", "cublas", "mm_")),
          ("other elementwise/copies", ("",))]


def main():
    name = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--name=")), None)
    cfg = plm.Config(**plm.parse_overrides([a for a in sys.argv[1:] if not a.startswith("--name=")])).check()
    rt = plm.Runtime(0, 0, 1, torch.device("cuda"))
    learner = plm.build_learner(cfg, rt, 3)  # the trainer's model, compiled forward, fused AdamW, scaler, step graph
    model = learner.model
    entries = int(os.environ.get("INDEX_ENTRIES", 200_000_000))
    if cfg.retrieves and os.environ.get("INDEX_FILE"):
        cached = plm.load_retrieval_index(os.environ["INDEX_FILE"], rt.device)
        if cfg.global_memory == "neighbours" and not isinstance(cached, plm.SuffixIndex):
            raise SystemExit(f"error: {os.environ['INDEX_FILE']}: global_memory = neighbours reads a suffix array")
        learner.retrieval_index = plm.with_compiled_lookups(cached, cfg, rt.device)  # as start_run does
    elif cfg.retrieves and cfg.index_layout == "suffix_array":  # random bases: the same searches, few hits
        bases = [torch.randint(0, 4, (entries,), dtype=torch.uint8).numpy()]  # the build empties the list: one copy
        built = plm.build_suffix_index(bases, "synthetic", device=rt.device)  # sorted on the GPU: crop sizes too
        learner.retrieval_index = plm.with_compiled_lookups(built.to(rt.device), cfg, rt.device)  # as start_run does
    elif cfg.retrieves:  # an index of the bundled genomes' size: what a lookup searches
        learner.retrieval_index = synthetic_index(entries, rt.device)
    tokens = torch.randint(0, plm.VOCAB_SIZE,
                           (cfg.accumulation_steps, cfg.batch_size, cfg.prefix_tokens + cfg.context_size + 1))
    species = torch.randint(0, 3, (cfg.accumulation_steps, cfg.batch_size))
    repeat = torch.zeros(tokens.shape, dtype=torch.bool)  # the repeat flags only weigh the loss: no cost of their own
    chunks = torch.full(species.shape, -1)  # the windows are in no chunk of the index: neighbours leave nothing out

    def step(n):
        for _ in range(n):
            plm.train_step(learner, tokens, species, repeat, cfg.learning_rate, chunks)  # the trainer's own step

    def seconds_per_step():  # the warm-up compiles, and with a StepGraph runs its eager steps and its capture
        return mean_seconds(lambda: step(1), rt.device, warm_up=5, reps=20)

    graphed = seconds_per_step() if learner.graph is not None else None
    learner.graph = None  # from here on, the plain step
    eager = seconds_per_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(5)
        torch.cuda.synchronize()
    totals = {name: 0.0 for name, _ in GROUPS}
    kernels = []
    for event in prof.key_averages():
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if us <= 0:
            continue
        kernels.append((event.key, us / 5))
        lower = event.key.lower()
        group = next(name for name, keys in GROUPS if any(k in lower for k in keys))
        totals[group] += us / 5
    kernel_total = sum(totals.values())
    lookups = lookup_seconds(learner.retrieval_index, tokens[0].to(rt.device), cfg, chunks[0].to(rt.device)) \
        if cfg.retrieves else {}
    n_tokens = cfg.batch_size * cfg.accumulation_steps * cfg.context_size
    flops = model.flops_per_step(n_tokens, cfg.accumulation_steps)
    timed = {"eager": eager, **({"graphed": graphed} if graphed else {})}
    index = (os.environ.get("INDEX_FILE") or f"synthetic, {entries:,} entries") if cfg.retrieves else "none"
    result = {**gpu_header(), "index": index, "batch_size": cfg.batch_size, "global_memory": cfg.global_memory,
              "accumulation_steps": cfg.accumulation_steps, "dropout": cfg.dropout,
              "seconds_per_step_mean_of_20": timed,
              "tokens_per_s": {k: n_tokens / s for k, s in timed.items()},
              "mfu_989": {k: flops / s / 989e12 for k, s in timed.items()},
              "gpu_kernel_ms_per_step": kernel_total / 1000,
              "lookup_ms_per_step": {k: v * cfg.accumulation_steps * 1000 for k, v in lookups.items()},
              "share": {k: v / kernel_total for k, v in totals.items()},
              "top_kernels_ms": [(k, us / 1000) for k, us in sorted(kernels, key=lambda x: -x[1])[:25]]}
    name = name or f"profile_b{cfg.batch_size}_{cfg.global_memory}"
    write_result(os.path.join(RESULTS, f"{name}.json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels_ms"}, indent=1))
    for k, ms in result["top_kernels_ms"][:15]:
        print(f"{ms:8.3f} ms  {k[:110]}")
    for group, share in result["share"].items():
        print(f"{share * kernel_total / 1000:8.2f} ms {share:6.1%}  {group}")
    for lookup, ms in result["lookup_ms_per_step"].items():
        print(f"{ms:8.2f} ms  {lookup}, alone (step: {', '.join(f'{k} {s * 1000:.2f} ms' for k, s in timed.items())})")


def lookup_seconds(index, windows, cfg, chunks, reps=10):
    """Seconds of one micro-batch's lookups, each alone (mean of reps after one warm-up call): the counts, and with
    global_memory = neighbours the homolog search with its own seed search, and the two as the step runs them
    (counts_and_neighbours: one search). Also counts_and_neighbours replayed as a CUDA graph, as the captured step
    runs it: eager, a small batch's lookups are bound by their launches, which the step's graph does not pay."""
    calls = {"counts": lambda: index.counts(windows, cfg.prefix_tokens, exclude_self=True)}
    if cfg.global_memory == "neighbours":
        calls["neighbours"] = lambda: index.neighbours(windows, cfg.prefix_tokens, chunks)
        calls["counts_and_neighbours"] = lambda: index.counts_and_neighbours(windows, cfg.prefix_tokens, True, chunks)
    seconds = {name: mean_seconds(call, windows.device, warm_up=1, reps=reps) for name, call in calls.items()}
    as_the_step_runs = next(reversed(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # warmed up above, so compiled; the graph allocates from a pool of its own
        calls[as_the_step_runs]()
    seconds[f"{as_the_step_runs}_graphed"] = mean_seconds(graph.replay, windows.device, warm_up=1, reps=reps)
    return seconds


def mean_seconds(call, device, warm_up, reps):
    """Mean wall seconds of call() over reps calls after warm_up calls, the device's queued work included."""
    for _ in range(warm_up):
        call()
    plm.synchronize(device)
    started = time.time()
    for _ in range(reps):
        call()
    plm.synchronize(device)
    return (time.time() - started) / reps


def synthetic_index(entries, device):
    """A RetrievalIndex of `entries` random sorted keys per context length, each seen once."""
    g = torch.Generator(device=device).manual_seed(0)
    keys = [torch.randint(0, 2**(12 * (k + 1)), (entries,), device=device, generator=g).sort().values
            for k in plm.RETRIEVAL_CONTEXT_TOKENS]
    return plm.RetrievalIndex(keys, [torch.arange(entries + 1, device=device) for _ in keys], "synthetic")


if __name__ == "__main__":
    main()

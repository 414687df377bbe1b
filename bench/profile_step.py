"""Where a training step's GPU time goes, at a given batch: kernels grouped into attention, matmuls, loss,
optimizer, bucket-memory update and the rest, from torch.profiler.

    python bench/profile_step.py --batch_size=4096 --accumulation_steps=1 [--global_memory=retrieval|buckets|none ...]
        -> bench/results/profile_b4096_MEMORY.json   (INDEX_ENTRIES=N: the retrieval index's size per context length)
Synthetic tokens (the data pipeline is measured separately, as data_wait in the throughput runs); the step is
plant_lm_train.train_step itself: compiled forward/backward over the accumulation micro-batches, clip, fused AdamW,
memory observations and update. Figures are per optimizer step (batch_size x accumulation_steps windows).
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402

GROUPS = [("retrieval lookup", ("searchsorted",)),
          ("attention", ("flash", "fmha", "flex", "attention", "sdpa", "triton_tem_fused")),
          ("optimizer", ("adam", "multi_tensor", "foreach", "clip", "norm")),
          ("memory update", ("index_add", "scatter", "bincount")),
          ("loss", ("cross_entropy", "log_softmax", "nll")),
          ("matmul (projections, MLP, head)", ("gemm", "cutlass", "xmma", "sm90", "nvjet", "cublas", "mm_")),
          ("other elementwise/copies", ("",))]


def main():
    cfg = plm.Config(**plm.parse_overrides(sys.argv[1:])).validate()
    rt = plm.Runtime(0, 0, 1, torch.device("cuda"))
    learner = plm.build_learner(cfg, rt, 3)  # the trainer's model, compiled forward, fused AdamW and scaler
    model = learner.model
    if cfg.global_memory == "retrieval":  # an index of the bundled genomes' size: what a lookup searches
        learner.memory_index = synthetic_index(int(os.environ.get("INDEX_ENTRIES", 200_000_000)), rt.device)
    tokens = torch.randint(0, plm.VOCAB_SIZE, (cfg.accumulation_steps, cfg.batch_size, cfg.prefix_tokens + cfg.context_size + 1))
    species = torch.randint(0, 3, (cfg.accumulation_steps, cfg.batch_size))
    repeat = torch.zeros(tokens.shape, dtype=torch.bool)  # the repeat flags only weigh the loss: no cost of their own

    def step(n):
        for _ in range(n):
            plm.train_step(learner, tokens, species, repeat, cfg.learning_rate)  # the trainer's own step

    step(5)
    torch.cuda.synchronize()
    t0 = time.time()
    step(10)
    torch.cuda.synchronize()
    seconds_per_step = (time.time() - t0) / 10
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
    flops = model.flops_per_step(cfg.batch_size * cfg.accumulation_steps * cfg.context_size, cfg.accumulation_steps)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "batch_size": cfg.batch_size, "global_memory": cfg.global_memory,
              "seconds_per_step_mean_of_10": seconds_per_step,
              "accumulation_steps": cfg.accumulation_steps,
              "tokens_per_s": cfg.batch_size * cfg.accumulation_steps * cfg.context_size / seconds_per_step,
              "mfu_989": flops / seconds_per_step / 989e12,
              "gpu_kernel_ms_per_step": kernel_total / 1000,
              "share": {k: v / kernel_total for k, v in totals.items()},
              "top_kernels_ms": [(k, us / 1000) for k, us in sorted(kernels, key=lambda x: -x[1])[:25]]}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    name = f"profile_b{cfg.batch_size}_{cfg.global_memory}.json"
    with open(os.path.join(os.path.dirname(__file__), "results", name), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels_ms"}, indent=1))
    for k, ms in result["top_kernels_ms"][:15]:
        print(f"{ms:8.3f} ms  {k[:110]}")


def synthetic_index(entries, device):
    """A RetrievalIndex of `entries` random sorted keys per context length, each seen once."""
    g = torch.Generator(device=device).manual_seed(0)
    keys = [torch.randint(0, 2**(12 * (k + 1)), (entries,), device=device, generator=g).sort().values
            for k in plm.RETRIEVAL_CONTEXT_TOKENS]
    return plm.RetrievalIndex(keys, [torch.arange(entries + 1, device=device) for _ in keys], "synthetic")


if __name__ == "__main__":
    main()

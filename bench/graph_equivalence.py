"""Does a CUDA-graphed training step (Config.cuda_graphs) train exactly like the plain one? GPU only.

    python bench/graph_equivalence.py [--steps 20] [--field=value ...]   -> bench/results/graph_equivalence.json
    (with --index_layout=suffix_array: graph_equivalence_suffix_array.json, the suffix array's lookups captured;
    another --global_memory adds its name: graph_equivalence_neighbours_suffix_array.json)
Three learners from the same initial weights and the same RNG state, at the default Config in fp32 (compiled,
the default memory over a synthetic index, dropout 0.1) unless overridden, take the same --steps optimizer steps
on the same batches: two plain (cuda_graphs=false: how far two identical plain runs already differ, the floor)
and one graphed (two eager warm-up steps, then one captured graph replayed). Reports, over all parameters, the
largest ‖a − b‖ / ‖b‖ and how many tensors are bitwise equal, and the step losses of each.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, gpu_header, write_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args, overrides = parser.parse_known_args()
    # dropout on (the default is off), so that the replays' masks are checked against the eager steps' too
    cfg = plm.Config(**{"precision": "fp32", "dropout": 0.1, **plm.parse_overrides(overrides)}).check()
    rt = plm.Runtime(0, 0, 1, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    genome = torch.randint(0, 64, (1_000_000,), generator=g)  # 64 distinct 6-mers: contexts recur, lookups hit
    width = cfg.prefix_tokens + cfg.context_size + 1
    batches = []
    for _ in range(args.steps):
        starts = torch.randint(0, len(genome) - width, (cfg.accumulation_steps * cfg.batch_size,), generator=g)
        tokens = torch.stack([genome[s:s + width] for s in starts]).view(cfg.accumulation_steps, cfg.batch_size, width)
        species = torch.randint(0, 3, (cfg.accumulation_steps, cfg.batch_size), generator=g)
        batches.append((tokens.to(torch.int16), species, torch.zeros(tokens.shape, dtype=torch.bool)))
    retrieval_index = None
    if cfg.retrieves and cfg.index_layout == "suffix_array":
        retrieval_index = plm.build_suffix_index([plm.token_bases(genome.numpy())], "synthetic").to(rt.device)
    elif cfg.retrieves:
        bases = torch.from_numpy(plm.token_bases(genome.numpy())).to(rt.device)
        retrieval_index = plm.RetrievalIndex(*plm.key_tables(plm.longest_keys(bases, [len(bases)], plm.INDEX_KEY_BASES)),
                                          "synthetic").to(rt.device)
    no_chunk = torch.full((cfg.accumulation_steps, cfg.batch_size), -1)  # the windows are in no chunk of the index
    runs = {}
    for label, graphs in (("plain", False), ("plain_again", False), ("graphed", True)):
        torch.manual_seed(0)  # the same initial weights and the same dropout draws
        torch.cuda.manual_seed(0)
        learner = plm.build_learner(dataclasses.replace(cfg, cuda_graphs=graphs), rt, 3)
        learner.retrieval_index = retrieval_index
        t0 = time.time()
        losses = [plm.train_step(learner, *batch, plm.lr_at(step, cfg, args.steps), step_chunks=no_chunk).loss
                  for step, batch in enumerate(batches)]
        torch.cuda.synchronize()
        runs[label] = {"params": {k: v.detach().clone().float() for k, v in learner.model.state_dict().items()
                                  if v.is_floating_point()},  # parameters and buffers (the bucket memory)
                       "losses": [x.item() for x in losses], "seconds": time.time() - t0,
                       "captured": learner.graph is not None and learner.graph.graph is not None}

    def compare(a, b):
        rel = {k: ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b}
        return {"max_relative_difference": max(rel.values()), "worst_tensor": max(rel, key=rel.get),
                "bitwise_equal_tensors": sum(torch.equal(a[k], b[k]) for k in b), "tensors": len(b)}

    result = {**gpu_header(), "steps": args.steps, "config": dataclasses.asdict(cfg),
              "graphed_vs_plain": compare(runs["graphed"]["params"], runs["plain"]["params"]),
              "plain_vs_plain": compare(runs["plain_again"]["params"], runs["plain"]["params"]),
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "params"} for k, v in runs.items()}}
    suffix = "".join(f"_{v}" for v, default in ((cfg.global_memory, "retrieval"), (cfg.index_layout, "tables"))
                     if v != default)
    write_result(os.path.join(RESULTS, f"graph_equivalence{suffix}.json"), result)
    print(json.dumps({k: result[k] for k in ("graphed_vs_plain", "plain_vs_plain")}, indent=1))
    print("losses plain  ", " ".join(f"{x:.6f}" for x in runs["plain"]["losses"][-5:]))
    print("losses graphed", " ".join(f"{x:.6f}" for x in runs["graphed"]["losses"][-5:]))
    if not runs["graphed"]["captured"]:
        raise SystemExit("the graphed learner never captured its step")
    floor = max(result["plain_vs_plain"]["max_relative_difference"], 1e-7)
    if result["graphed_vs_plain"]["max_relative_difference"] > 10 * floor:
        raise SystemExit(f"the graphed step differs from the plain one by more than 10x the plain step's own "
                         f"run-to-run difference ({floor:.2g})")


if __name__ == "__main__":
    main()

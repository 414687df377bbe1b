"""Memory of the DataLoader workers over many epochs of the real data path, with no model: does it level off?

    python bench/loader_memory.py --epochs 20 [--field=value ...]  -> bench/results/loader_memory.json
The trainer's loader (GenomeStream, persistent workers, prefetch 4) at batch 4096 on the bundled genomes, as
fast as the workers can draw; RSS and private memory (Private_Clean + Private_Dirty) of the workers, summed,
sampled every --sample-s seconds.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402
from soak import child_pids, memory_mb  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument("--name", default="loader_memory")
    args, overrides = parser.parse_known_args()
    import torch
    from torch.utils.data import DataLoader
    cfg = plm.Config(**{"batch_size": 4096, "accumulation_steps": 1, **plm.parse_overrides(overrides)}).check()
    index = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    per_epoch = plm.steps_per_epoch(index, cfg, 1)
    loader = DataLoader(plm.GenomeStream(index, cfg, 0, 1, per_epoch), batch_size=None, num_workers=cfg.num_workers,
                        persistent_workers=True, prefetch_factor=4)
    samples, started, last = [], time.time(), 0.0
    for step, _ in enumerate(plm.loader_steps(iter(loader))):
        if time.time() - last >= args.sample_s or step >= per_epoch * args.epochs:
            last = time.time()
            workers = child_pids(os.getpid())
            memory = [memory_mb(pid) for pid in workers]
            samples.append({"minutes": (last - started) / 60, "step": step, "epoch": step / per_epoch,
                            "workers": len(workers), "workers_rss_mb": sum(m[0] for m in memory),
                            "workers_private_mb": sum(m[1] for m in memory)})
            print(json.dumps(samples[-1]), flush=True)
        if step >= per_epoch * args.epochs:
            break
    meta = {"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "statistic": f"one run, sampled every {args.sample_s:g} s"}
    write_result(os.path.join(RESULTS, f"{args.name}.json"), {"meta": meta, "samples": samples})
    first, last_sample = samples[0], samples[-1]
    print(f"workers' private memory: {first['workers_private_mb']:,.0f} MB at epoch {first['epoch']:.1f}, "
          f"{last_sample['workers_private_mb']:,.0f} MB at epoch {last_sample['epoch']:.1f}")


if __name__ == "__main__":
    main()

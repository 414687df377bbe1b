"""The trainer's loader rate against the number of shards, reading chunks from the token stores or from FASTA.

    python bench/loader_shards.py --shards 4 32 --seconds 30 [--field=value ...]  -> bench/results/loader_shards.json
The real GenomeStream through a DataLoader (persistent workers, prefetch 4) at batch 4096 x 1 on the bundled
genomes, rank 0 of shards / workers ranks, as fast as the workers draw. Each shard count runs twice in one
process: with the scan's token stores (chunks mapped from the data cache) and without (each worker streams and
tokenizes every FASTA file of a species and keeps its chunks), side by side. Windows/s are counted after each
worker's first items.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402


def windows_per_s(catalog, cfg, shards, workers, seconds):
    from torch.utils.data import DataLoader
    per_epoch = plm.steps_per_epoch(catalog, cfg, 1)
    stream = plm.GenomeStream(catalog, cfg, 0, shards // workers, per_epoch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=True, prefetch_factor=4)
    steps, started, counted = 0, None, 0
    for _ in plm.loader_steps(iter(loader)):
        steps += 1
        if steps == workers * plm.STEPS_PER_ITEM * 2:  # each worker's first two items are taken
            started, counted = time.time(), steps
        if started and time.time() - started > seconds:
            break
    rate = (steps - counted) * cfg.batch_size / (time.time() - started)
    del loader
    return rate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--name", default="loader_shards")
    args, overrides = parser.parse_known_args()
    import torch
    cfg = plm.Config(**{"batch_size": 4096, "accumulation_steps": 1, "global_memory": "none",
                        **plm.parse_overrides(overrides)}).check()
    quiet = lambda message: None  # noqa: E731
    with tempfile.TemporaryDirectory() as cache_dir:
        stored = plm.scan_genomes(cfg, warn=quiet, progress=False, cache_dir=cache_dir)
        fasta = dataclasses.replace(stored, stores={})
        rows = []
        for shards in args.shards:
            for source, catalog in (("token store", stored), ("FASTA", fasta)):
                rate = windows_per_s(catalog, cfg, shards, args.workers, args.seconds)
                rows.append({"shards": shards, "workers": args.workers, "source": source, "windows_per_s": rate})
                print(f"{shards:3d} shards, {source:11s}: {rate:,.0f} windows/s", flush=True)
    meta = {"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "statistic": f"one run per row, {args.seconds:g} s after warm-up"}
    write_result(os.path.join(RESULTS, f"{args.name}.json"), {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()

"""Gloo ranks for the sharded suffix-array checks of tests/test_retrieval.py; not a test module itself.

    WANDB_MODE=disabled OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=N \
        tests/shard_worker.py OUTDIR DATA_DIR

Every rank gets the suffix array of DATA_DIR's training chunks through load_or_build_retrieval_index (rank 0
builds it into OUTDIR/ckpt, every rank keeps its slice) and counts its own rows of all the chunks' windows,
as many on every rank: rank r every world-th window from window r. It writes counts_rank{r}.pt: its rows, its
counts kept and left out, and its slice's number of rows.
"""

import os
import sys

import torch
import torch.distributed as dist

from _helpers import all_windows, tiny_config
import plant_lm_train as plm  # _helpers puts the repository on sys.path


def main(outdir, data_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config(data_dir=data_dir, global_memory="retrieval", index_layout="suffix_array",
                      checkpoint_dir=os.path.join(outdir, "ckpt"))
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    index = plm.load_or_build_retrieval_index(catalog, cfg, plm.Runtime(rank, rank, world, torch.device("cpu")),
                                              warn=lambda m: None)
    windows = all_windows(catalog, cfg, catalog.train_chunks + catalog.val_chunks)
    rows = torch.arange(rank, len(windows), world)[:len(windows) // world]
    mine = windows[rows]
    torch.save({"rows": rows, "slice_rows": index.n,
                "kept": index.counts(mine, cfg.prefix_tokens, exclude_self=False, target_bases=range(7)),
                "left_out": index.counts(mine, cfg.prefix_tokens, exclude_self=True)},
               os.path.join(outdir, f"counts_rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

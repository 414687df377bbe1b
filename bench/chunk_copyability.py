"""How much of each chunk the index already holds elsewhere: why training reads lower bits/base than validation.

    python bench/chunk_copyability.py [--train-chunks 12] [--windows 40] [--name chunk_copyability_cpu]
For every validation chunk and --train-chunks training chunks of each species (seeded), --windows windows evenly
spread over the chunk: the share of targets whose 24-base context occurs in the index's training chunks (both
strands; a training window's own occurrence left out, as training leaves it out), and, per species over those
windows, the share with a homolog slot (global_memory = neighbours, a training window's own chunk left out) and with
a slot whose 6 bases after the context are exactly the target. And between validation chunks, the share of one
chunk's 24-base strings (every 7th) found in another on either strand: two held-out homologs leave each other's
closest relative out of the index. Default Config, on the CPU (the suffix array is built, about 20 s for the
bundled genomes). Writes bench/results/NAME.json.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402


def spread_windows(chunk, cfg, n):
    starts = plm.window_starts(chunk.n_tokens, cfg.context_size, cfg.window_stride)
    starts = starts[np.unique(np.linspace(0, len(starts) - 1, n).round().astype(int))]
    return torch.from_numpy(plm.window_tokens(chunk.tokens, starts, cfg).astype(np.int64))


def copyable(index, cfg, windows, chunk):
    """(share of targets with their 24-base context in the index, with a homolog slot, with a slot that holds the
    target exactly); chunk: the windows' chunk number in the index's text (None: a validation chunk, in no index)."""
    prefix = cfg.prefix_tokens
    counts = index.counts(windows, prefix, exclude_self=chunk is not None)
    seen = (counts[:, :, -1, 0] > 0).float().mean().item()
    numbers = None if chunk is None else torch.full((len(windows),), chunk)
    bases, age = index.neighbours(windows, prefix, numbers)
    target = (windows[:, prefix + 1:].clamp_min(0)[..., None] >> plm.token_base_shifts(windows.device)) & 3
    exact = (bases[..., 6:] == target[:, :, None]).all(-1).any(-1).float().mean().item()
    return seen, (age >= 0).any(-1).float().mean().item(), exact


def strings_24(codes):
    """Every 24-base string of base codes, packed 2 bits a base."""
    n = len(codes) - 23
    packed = np.zeros(n, np.int64)
    for i in range(24):
        packed = packed << 2 | codes[i:i + n]
    return packed


def shared_strings(val_chunks):
    """[(chunk a, chunk b, share of a's 24-base strings, every 7th, that occur in b on either strand)]."""
    codes = {c.key: plm.token_bases(c.tokens).astype(np.int64) for c in val_chunks}
    held = {key: set(strings_24(b).tolist()) | set(strings_24((3 - b)[::-1]).tolist()) for key, b in codes.items()}
    return [(a, b, float(np.mean([x in held[b] for x in strings_24(codes[a])[::7].tolist()])))
            for a in codes for b in codes if a != b]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-chunks", type=int, default=12, help="training chunks per species")
    parser.add_argument("--windows", type=int, default=40, help="windows per chunk")
    parser.add_argument("--name", default="chunk_copyability_cpu")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = plm.Config(checkpoint_dir=os.path.join("/tmp", args.name))
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    started = time.time()
    index = plm.build_retrieval_index(catalog, cfg, torch.device("cpu"), args.name)
    print(f"suffix array built in {time.time() - started:.0f} s", flush=True)
    numbers = plm.text_chunk_numbers(catalog)
    rng = np.random.default_rng(0)
    picked = []
    for name in catalog.species:
        mine = [c for c in catalog.train_chunks if c.key[0] == name]
        picked += [mine[i] for i in rng.choice(len(mine), min(args.train_chunks, len(mine)), replace=False)]
    rows = []
    for role, chunks in (("validation", catalog.val_chunks), ("training", picked)):
        for chunk in plm.tokenized_chunks(catalog, cfg, chunks):
            seen, slot, exact = copyable(index, cfg, spread_windows(chunk, cfg, args.windows),
                                         None if role == "validation" else numbers[chunk.key])
            rows.append({"role": role, "species": chunk.key[0], "record": chunk.key[2],
                         "start_base": plm.chunk_start(chunk.key, cfg), "context_24_seen": seen,
                         "homolog_slot": slot, "exact_slot": exact})
            print(f"{role:10s} {chunk.key[0]:12s} record {chunk.key[2]} base {rows[-1]['start_base']:>11,}  "
                  f"24-base context seen {seen:.3f}  homolog slot {slot:.3f}  exact slot {exact:.3f}", flush=True)
    pairs = []
    for a, b, share in shared_strings(list(plm.tokenized_chunks(catalog, cfg, catalog.val_chunks))):
        pairs.append({"chunk": [a[0], a[2], plm.chunk_start(a, cfg)], "in": [b[0], b[2], plm.chunk_start(b, cfg)],
                      "shared_24_base_strings": share})
        print(f"validation {a[0]} record {a[2]} base {plm.chunk_start(a, cfg):,} in {b[0]} record {b[2]} base "
              f"{plm.chunk_start(b, cfg):,}: {share:.3f} of its 24-base strings", flush=True)
    summary = {}
    for role in ("validation", "training"):
        for name in catalog.species:
            mine = [r for r in rows if r["role"] == role and r["species"] == name]
            if mine:
                summary[f"{role} {name}"] = {key: float(np.mean([r[key] for r in mine]))
                                             for key in ("context_24_seen", "homolog_slot", "exact_slot")}
    for label, figures in summary.items():
        print(f"{label:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    meta = {"device": "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "statistic": "one run; means over the chunks' windows"}
    write_result(os.path.join(RESULTS, f"{args.name}.json"), {"meta": meta, "summary": summary, "chunks": rows,
                                                            "validation_pairs": pairs},
                 announce=True)


if __name__ == "__main__":
    main()

"""Do longer, finer contexts help the retrieval counts? The trainer's suffix array asked for every context length.

    python bench/longest_match.py [--windows=4096] [--checkpoint_dir=DIR] -> bench/results/longest_match.json

The default Config's validation windows (the trainer's 4,096), and its suffix array of the training chunks (loaded
from checkpoint_dir, or built and cached there as run.sh does). For each target 6-mer, the bases before it in its
window (the prefix tokens too, as the counts memory reads them) give contexts of L = 0..24 bases; the index counts
each context and context + target on both strands with its own search (SuffixIndex.rows_of), 24 bases being the
most a 30-base suffix sort holds with a 6-base target. A count predictor, the Dirichlet back-off chain
p_L = (c(context_L + target) + alpha p) / (c(context_L) + alpha) over ascending lengths from p = 1/4096, is scored
with five choices of lengths for each target: the counts memory's (0, then 12/18/24, what the model is given); those
and the target's longest match (the longest context that occurs, at any of 0..24 bases); the longest match alone
(over 0); the longest of 12/18/24 that occurs alone (over 0: what the memory's gate reads, PlantLM.mixed_log_probs);
and every length 0..24. A length with no occurrence of its context leaves p as it is. alpha is the best of a grid
for each choice (a single parameter fitted on the scored targets themselves). Also: how long the longest
match is, and how often it reaches 24 bases, where a longer sort could look further.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402
from train_variant import LONGEST_CONTEXT_BASES, context_and_target, context_target_strings  # noqa: E402

MEMORY_LENGTHS = (0,) + plm.COUNT_CONTEXT_BASES  # the 6-mer frequencies and the counts memory's 12/18/24
LEVELS = {"memory_lengths": lambda L, longest: fixed(L, longest, MEMORY_LENGTHS),  # each target's chain, by L
          "memory_lengths_and_longest_match": lambda L, longest: fixed(L, longest, MEMORY_LENGTHS) | (longest == L),
          "longest_match_alone": lambda L, longest: fixed(L, longest, (0,)) | (longest == L),
          "longest_memory_length_alone": lambda L, longest: fixed(L, longest, (0,)) | (longest_memory(longest) == L),
          "every_length": lambda L, longest: fixed(L, longest, range(LONGEST_CONTEXT_BASES + 1))}
ALPHAS = tuple(2.0 ** e for e in range(-1, 15))  # 0.5 .. 16384


def context_strings(index, windows, prefix):
    """For each target of windows [B, prefix + T + 1]: (strings, lengths) [B, T, 25, 2 (context, context + target),
    2 (strands)] for L = 0..24 bases of context, left-aligned as suffix_ranges reads them, and how many bases of
    context lie in the chunk [B, T]."""
    forward, reverse, inside = context_and_target(index, windows, prefix)
    with_target = (0, plm.BASES_PER_TOKEN)
    strings = torch.stack([torch.stack([context_target_strings(forward, reverse, L, j) for j in with_target], -2)
                           for L in range(LONGEST_CONTEXT_BASES + 1)], 2)
    lengths = torch.arange(LONGEST_CONTEXT_BASES + 1)[:, None] + torch.tensor(with_target)  # [25, 2]
    return strings, lengths[..., None].expand(strings.shape), inside


def fixed(L, longest, lengths):
    """Whether length L is among `lengths`, for every target (shaped as longest [N])."""
    return torch.full_like(longest, L in lengths, dtype=torch.bool)


def longest_memory(longest):
    """The longest of the counts memory's lengths (12/18/24) whose context occurs, 0 if none: what its gate reads."""
    lengths = torch.tensor(plm.COUNT_CONTEXT_BASES)
    return torch.where(lengths <= longest[:, None], lengths, 0).amax(1)


def chain_bits(context_counts, whole_counts, levels, alpha):
    """Bits per base of the Dirichlet chain over each target's levels [N, 25] (bool), counts [N, 25], L ascending."""
    p = torch.full(context_counts.shape[:1], 1.0 / plm.VOCAB_SIZE, dtype=torch.float64)
    for L in range(context_counts.shape[1]):
        p = torch.where(levels[:, L], (whole_counts[:, L] + alpha * p) / (context_counts[:, L] + alpha), p)
    return -torch.log2(p) / plm.BASES_PER_TOKEN


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=4096, help="validation windows scored (the first N)")
    parser.add_argument("--batch", type=int, default=128, help="windows searched at a time")
    parser.add_argument("--checkpoint_dir", default="dna_model", help="where the index is cached (as run.sh)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "longest_match.json"))
    args = parser.parse_args()
    started = time.time()
    cfg = plm.Config(checkpoint_dir=args.checkpoint_dir).check()
    cache = os.path.join(cfg.checkpoint_dir, "data_cache")
    catalog = plm.scan_genomes(cfg, progress=False, cache_dir=cache)
    windows, species, _ = plm.cached_validation(catalog, cfg, cache)
    windows, species = windows[:args.windows], species[:args.windows]
    rt = plm.Runtime(0, 0, 1, torch.device("cpu"))
    index = plm.load_or_build_retrieval_index(catalog, cfg, rt)
    print(f"[{time.time() - started:5.0f} s] {len(windows)} windows; index of {index.n:,} positions", flush=True)

    context_counts, whole_counts, usable = [], [], []
    for start in range(0, len(windows), args.batch):
        strings, lengths, in_chunk = context_strings(index, windows[start:start + args.batch], cfg.prefix_tokens)
        first, end = index.rows_of(strings, lengths)
        found = (end - first).sum(-1)  # both strands: [B, T, 25, 2]
        memory = index.counts(windows[start:start + args.batch], cfg.prefix_tokens, exclude_self=False)
        known = torch.tensor(plm.COUNT_CONTEXT_BASES) <= in_chunk[..., None]  # the memory's zeros elsewhere
        if not torch.equal(memory, (found[:, :, plm.COUNT_CONTEXT_BASES] * known[..., None]).float()):
            raise SystemExit("the searches' counts at 12/18/24 bases differ from the trainer's counts()")
        found = found.flatten(0, 1)
        context_counts.append(found[..., 0].double())
        whole_counts.append(found[..., 1].double())
        usable.append((torch.arange(LONGEST_CONTEXT_BASES + 1) <= in_chunk.flatten()[:, None]).double())
        print(f"[{time.time() - started:5.0f} s] searched {start + len(strings)} windows", flush=True)
    context_counts, whole_counts, usable = (torch.cat(x) for x in (context_counts, whole_counts, usable))
    target_species = species.repeat_interleave(cfg.context_size)

    seen = (context_counts > 0) & (usable > 0)
    longest = torch.where(seen, torch.arange(LONGEST_CONTEXT_BASES + 1), 0).amax(1)  # the longest that occurs
    sets = {}
    for name, takes in LEVELS.items():
        levels = torch.stack([takes(L, longest) for L in range(LONGEST_CONTEXT_BASES + 1)], 1) & (usable > 0)
        by_alpha = {a: chain_bits(context_counts, whole_counts, levels, a).mean().item() for a in ALPHAS}
        alpha = min(by_alpha, key=by_alpha.get)
        bits = chain_bits(context_counts, whole_counts, levels, alpha)
        sets[name] = {"alpha": alpha, "bits_per_base": by_alpha[alpha], "by_alpha": by_alpha,
                      "by_species": {s: bits[target_species == i].mean().item() for i, s in enumerate(catalog.species)}}
    full = usable[:, LONGEST_CONTEXT_BASES] > 0  # targets with 24 bases of context in their chunk
    matches = {"mean": longest.double().mean().item(),
               "histogram": torch.bincount(longest, minlength=LONGEST_CONTEXT_BASES + 1).tolist(),
               "share_at_24_of_targets_with_24_bases_of_context":
                   (longest[full] == LONGEST_CONTEXT_BASES).double().mean().item(),
               "share_whole_target_seen_after_24":
                   (whole_counts[full, LONGEST_CONTEXT_BASES] > 0).double().mean().item()}
    result = {"command": " ".join(sys.argv), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "device": "cpu", "cpus": os.cpu_count(), "statistic": "one run", "windows": len(windows),
              "targets": len(longest), "index_positions": index.n, "predictors": sets,
              "longest_match_bases": matches, "seconds": round(time.time() - started, 1)}
    write_result(args.out, result, announce=True)
    for name, s in sets.items():
        print(f"{name:34s} alpha {s['alpha']:5g}  {s['bits_per_base']:.4f} bits/base  "
              + "  ".join(f"{k} {v:.4f}" for k, v in s["by_species"].items()))
    print(f"longest match: mean {matches['mean']:.1f} bases; at 24 bases for "
          f"{matches['share_at_24_of_targets_with_24_bases_of_context']:.1%} of targets with 24 bases of context")


if __name__ == "__main__":
    main()

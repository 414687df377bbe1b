"""Train Plant LM or the HF GPT-2 baseline through plant_lm_train.train, for side-by-side benchmarks.

    python bench/train_variant.py --model=plant|gpt2|plant_neighbour_tokens|plant_neighbour_bases|plant_longest_match
        [--field=value ...]
Metrics land in the run's log_dir as metrics_*.jsonl, read by the other bench scripts.
The two plant_neighbour_* models (global_memory = neighbours) ask in which units the homologs should enter the
model's input: Plant LM gives each slot both as bases (one-hot, in slot_features) and as the token embedding of its
6-mer at the target (neighbour_input). plant_neighbour_tokens keeps the 6-mer only (the slot's one-hot bases
zeroed; their agreement with the input token and the age stay), plant_neighbour_bases the bases only. The copying
experts in the output read bases in all three.
plant_longest_match asks whether the counts memory gains from each target's longest match: a fourth context after
12/18/24 bases, the longest context of 0..24 bases before the target that occurs in the training chunks (leave-one-out
in training, as the others), found by a binary search over lengths with the suffix array's own searches
(index_layout = suffix_array, one process, retrieval_mixing = gate: its gate is retrieval_head's fourth value).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plant_lm_train as plm  # noqa: E402
import torch  # noqa: E402


def main(argv):
    model = next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), "plant")
    rest = [a for a in argv if not a.startswith("--model=")]
    cfg = plm.Config(**plm.parse_overrides(rest)).check()
    if model == "gpt2":
        from gpt2_baseline import GPT2Baseline
        plm.train(cfg, build_model=GPT2Baseline)
    elif model == "plant":
        plm.train(cfg)
    elif model in NEIGHBOUR_UNITS:
        plm.train(cfg, build_model=NEIGHBOUR_UNITS[model])
    elif model == "plant_longest_match":
        if cfg.index_layout != "suffix_array" or cfg.retrieval_mixing != "gate" or not cfg.retrieves:
            raise SystemExit("error: plant_longest_match needs a retrieval memory over a suffix array, mixed by gate")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("error: plant_longest_match counts over the whole array: run it as one process")
        counted_ranges = plm.SuffixIndex.counted_ranges

        def with_longest_match(index, windows, prefix, exclude_self, target_bases):
            counts, first, end = counted_ranges(index, windows, prefix, exclude_self, target_bases)
            longest = longest_match_counts(index, windows, prefix, exclude_self, target_bases)
            return torch.cat([counts, longest], 2), first, end

        plm.SuffixIndex.counted_ranges = with_longest_match
        plm.train(cfg, build_model=LongestMatchLM)
    else:
        raise SystemExit(f"error: --model must be plant, gpt2, plant_longest_match or one of "
                         f"{sorted(NEIGHBOUR_UNITS)}, got {model!r}")


class NeighbourTokens(plm.PlantLM):
    def neighbour_input(self, bases, features):
        one_hot = 12 * 5  # slot_features' first columns: the slot's 12 bases one-hot
        return super().neighbour_input(bases, torch.cat([torch.zeros_like(features[..., :one_hot]),
                                                         features[..., one_hot:]], -1))


class NeighbourBases(plm.PlantLM):
    def neighbour_input(self, bases, features):
        return self.neighbour_features(features.to(self.neighbour_features.weight.dtype)).sum(2)


class LongestMatchLM(plm.PlantLM):
    """PlantLM with a fourth gate value for the fourth context, the longest match. PlantLM.mixed_log_probs takes as
    many context lengths as retrieval_head has values and gates the longest that occurs: here always the fourth,
    since a context of 0 bases always occurs, so the longest match replaces 12/18/24 in the mixture."""

    def __init__(self, cfg, n_species):
        super().__init__(cfg, n_species)
        self.retrieval_head = torch.nn.Linear(cfg.d_model, len(plm.RETRIEVAL_CONTEXT_TOKENS) + 1)
        torch.nn.init.zeros_(self.retrieval_head.weight)
        torch.nn.init.constant_(self.retrieval_head.bias, -2.0)  # as PlantLM's gates: g = 0.12 at the start


LONGEST_CONTEXT_BASES = plm.SUFFIX_KEY_BASES - plm.BASES_PER_TOKEN  # 24: the sort's 30 bases less a target


def longest_match_counts(index, windows, prefix, exclude_self, target_bases):
    """[B, T, 1, J] float counts, on both strands, of each target's longest match followed by the target's first j
    bases (j in target_bases): the longest L of 0..24 bases before the target, inside its chunk, whose context
    occurs, found by a binary search over L. In training each string's own occurrence is left out, twice for a
    string that is its own reverse complement; a count then need not fall with L near a palindrome, and the
    search can stop short of the longest there."""
    forward, reverse, inside = context_and_target(index, windows, prefix)

    def found(L, j):  # occurrences of the last L context bases and the target's first j, on both strands
        strings = context_target_strings(forward, reverse, L, j)
        first, end = index.rows_of(strings, (L + j)[..., None].expand_as(strings))
        hits = (end - first).sum(-1)
        if exclude_self:
            hits = (hits - 1 - (strings[..., 0] == strings[..., 1]).long()).clamp_min(0)
        return hits

    low, high = torch.zeros_like(inside), inside  # L = 0 always occurs: the longest is in [low, high]
    for _ in range(LONGEST_CONTEXT_BASES.bit_length()):
        middle = (low + high + 1) >> 1
        occurs = found(middle, torch.zeros_like(middle)) > 0
        low, high = torch.where(occurs, middle, low), torch.where(occurs, high, middle - 1)
    return torch.stack([found(low, torch.full_like(low, j)) for j in target_bases], -1)[:, :, None].float()


def context_and_target(index, windows, prefix):
    """For each target of windows [B, prefix + T + 1]: the 24 bases before it and its own 6 as one 30-base string
    (int64, first base highest), that string's reverse complement, and how many of the 24 lie in its chunk [B, T]."""
    k = LONGEST_CONTEXT_BASES // plm.BASES_PER_TOKEN
    grams, _ = plm.context_grams(windows, prefix, k)  # [B, T, 5]: 4 context tokens and the target (-1 read as 0)
    T = grams.shape[1]
    before = windows.unfold(1, k, 1)[:, prefix + 1 - k:prefix + 1 - k + T]
    inside = (before >= 0).flip(-1).long().cumprod(-1).sum(-1) * plm.BASES_PER_TOKEN  # from the target back
    return plm.packed_tokens(grams), plm.packed_tokens(index.reverse_complement[grams.flip(-1)]), inside


def context_target_strings(forward, reverse, L, j):
    """The last L context bases and the target's first j, and that string's reverse complement, [..., 2] as
    suffix_ranges reads them (left-aligned; L and j ints or tensors shaped as forward)."""
    n = L + j
    return torch.stack([((forward << 2 * (LONGEST_CONTEXT_BASES - L)) & plm.KEY_MASK) & plm.top_bases_mask(n),
                        ((reverse << 2 * (plm.BASES_PER_TOKEN - j)) & plm.KEY_MASK) & plm.top_bases_mask(n)], -1)


NEIGHBOUR_UNITS = {"plant_neighbour_tokens": NeighbourTokens, "plant_neighbour_bases": NeighbourBases}


if __name__ == "__main__":
    main(sys.argv[1:])

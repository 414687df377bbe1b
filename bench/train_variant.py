"""Train Plant LM or the HF GPT-2 baseline through plant_lm_train.train, for side-by-side benchmarks.

    python bench/train_variant.py --model=plant|gpt2|plant_neighbour_tokens|plant_neighbour_bases [--field=value ...]
Metrics land in the run's log_dir as metrics_*.jsonl, read by the other bench scripts.
The two plant_neighbour_* models (global_memory = neighbours) ask in which units the homologs should enter the
model's input: Plant LM gives each slot both as bases (one-hot, in slot_features) and as the token embedding of its
6-mer at the target (neighbour_input). plant_neighbour_tokens keeps the 6-mer only (the slot's one-hot bases
zeroed; their agreement with the input token and the age stay), plant_neighbour_bases the bases only. The copying
experts in the output read bases in all three.
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
    else:
        raise SystemExit(f"error: --model must be plant or gpt2, got {model!r}")


class NeighbourTokens(plm.PlantLM):
    def neighbour_input(self, bases, features):
        one_hot = 12 * 5  # slot_features' first columns: the slot's 12 bases one-hot
        return super().neighbour_input(bases, torch.cat([torch.zeros_like(features[..., :one_hot]),
                                                         features[..., one_hot:]], -1))


class NeighbourBases(plm.PlantLM):
    def neighbour_input(self, bases, features):
        return self.neighbour_features(features.to(self.neighbour_features.weight.dtype)).sum(2)


NEIGHBOUR_UNITS = {"plant_neighbour_tokens": NeighbourTokens, "plant_neighbour_bases": NeighbourBases}


if __name__ == "__main__":
    main(sys.argv[1:])

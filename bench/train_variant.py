"""Train Plant LM or the HF GPT-2 baseline through plant_lm_train.train, for side-by-side benchmarks.

    python bench/train_variant.py --model=plant|gpt2 [--field=value ...]
Metrics land in the run's log_dir as metrics_*.jsonl, read by the other bench scripts.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plant_lm_train as plm  # noqa: E402


def main(argv):
    model = next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), "plant")
    rest = [a for a in argv if not a.startswith("--model=")]
    cfg = plm.Config(**plm.parse_overrides(rest)).check()
    if model == "gpt2":
        from gpt2_baseline import GPT2Baseline
        plm.train(cfg, build_model=GPT2Baseline)
    elif model == "plant":
        plm.train(cfg)
    else:
        raise SystemExit(f"error: --model must be plant or gpt2, got {model!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

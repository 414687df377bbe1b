"""One training run's validation curve, across all its invocations (a run resumed after max_minutes, say).

    python bench/run_curve.py --name NAME LOG_DIR [LOG_DIR ...]
Reads every metrics_*.jsonl under the log folders, in step order, and writes bench/results/NAME.json (each
validation's step, epoch, bits/base, repeat/other and per-species figures; each invocation's wall-time split; the
best and the last validation) and NAME.png (validation and training bits/base against epochs), where matplotlib is
installed.
"""

import argparse
import glob
import json
import os

from _results import RESULTS, write_result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("log_dirs", nargs="+")
    args = parser.parse_args()
    paths = sorted(path for folder in args.log_dirs for path in glob.glob(os.path.join(folder, "metrics_*.jsonl")))
    records = [json.loads(line) for path in paths for line in open(path)]
    validations = sorted((r for r in records if "val_bits_per_base" in r), key=lambda r: r["step"])
    if not validations:
        raise SystemExit(f"no validation records in {' '.join(paths) or ' '.join(args.log_dirs)}")
    curve = [{"step": r["step"], "epoch": r["epoch"], "val_bits_per_base": r["val_bits_per_base"],
              "repeat": r["val_bits_per_base_repeat"], "other": r["val_bits_per_base_nonrepeat"],
              "by_species": r["val_bits_per_base_by_species"]} for r in validations]
    training = sorted(((r["step"], r["bits_per_base"]) for r in records if "tokens_per_s" in r))
    best = min(curve, key=lambda point: point["val_bits_per_base"])
    last = curve[-1]
    result = {"metrics_files": [os.path.basename(path) for path in paths],
              "invocations": [{key: r[key] for key in ("step", "wall_s", "time_split_s", "tokens_per_wall_s")}
                              for r in records if "time_split_s" in r],
              "best": best, "last": last, "last_minus_best": last["val_bits_per_base"] - best["val_bits_per_base"],
              "curve": curve, "training_bits_per_base": training}
    write_result(os.path.join(RESULTS, f"{args.name}.json"), result, announce=True)
    print(f"best {best['val_bits_per_base']:.4f} at step {best['step']} (epoch {best['epoch']:.2f}); last "
          f"{last['val_bits_per_base']:.4f} at step {last['step']} (epoch {last['epoch']:.2f}); "
          f"last - best = {result['last_minus_best']:+.4f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    per_epoch = last["step"] / last["epoch"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([s / per_epoch for s, _ in training], [b for _, b in training], lw=0.6, alpha=0.5,
            label="training (log windows)")
    ax.plot([p["epoch"] for p in curve], [p["val_bits_per_base"] for p in curve], "o-", label="validation")
    ax.axhline(best["val_bits_per_base"], color="gray", ls=":", label=f"best {best['val_bits_per_base']:.4f}")
    low = min(min(b for _, b in training), best["val_bits_per_base"])
    ax.set_ylim(low - 0.02, max(p["val_bits_per_base"] for p in curve) + 0.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits per base")
    ax.set_title(args.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{args.name}.png"), dpi=110)


if __name__ == "__main__":
    main()

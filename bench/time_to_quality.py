"""Validation bits/base against training wall-clock or optimizer steps, several variants side by side.

    python bench/time_to_quality.py --name NAME --minutes 5 [--steps N] [--concurrent K] \
        --variant "LABEL:--model=plant ..." [--variant ...]
With several GPUs, variants run at the same time, one per GPU (CUDA_VISIBLE_DEVICES); otherwise one after another.
--concurrent K runs K variants at once whatever the GPUs, sharing them: use it for curves at equal steps only
(--steps), since a shared GPU slows each variant by what the others do.
The x axis is the records' train_s: wall seconds in optimizer steps (the first, compiling, step included;
start-up, validation and saves left out). --minutes is Config.max_minutes, which counts the whole invocation.
Writes bench/results/NAME.json and NAME.png (with the Markov floor from markov_baseline.json if there).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from _results import RESULTS, write_result

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=0, help="also stop each variant after this many steps")
    parser.add_argument("--concurrent", type=int, default=0, help="variants at once (default: one per GPU)")
    parser.add_argument("--variant", action="append", required=True, help="LABEL:--arg=v --arg=v")
    args = parser.parse_args()
    import torch
    n_gpus = torch.cuda.device_count()
    runs = []
    for i, spec in enumerate(args.variant):
        label, _, arglist = spec.partition(":")
        logs = tempfile.mkdtemp(prefix=f"ttq_{label}_")
        command = [sys.executable, os.path.join(HERE, "train_variant.py"), *arglist.split(),
                   f"--max_minutes={args.minutes}", f"--max_steps={args.steps}", f"--log_dir={logs}",
                   f"--checkpoint_dir={logs}/ckpt", "--resume=none"]
        env = dict(os.environ, WANDB_MODE="disabled")
        if n_gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpus)
        runs.append({"label": label, "args": arglist.split(), "logs": logs, "command": command, "env": env})
    at_once = args.concurrent or max(1, n_gpus)
    batches = [runs[i:i + at_once] for i in range(0, len(runs), at_once)]
    for batch in batches:
        procs = [subprocess.Popen(r["command"], env=r["env"], stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(r["logs"], "stderr.txt"), "w")) for r in batch]
        for r, p in zip(batch, procs):
            r["returncode"] = p.wait()
    results = []
    for r in runs:
        records = [json.loads(line) for path in glob.glob(f"{r['logs']}/metrics_*.jsonl") for line in open(path)]
        val = [(rec["train_s"], rec["val_bits_per_base"], rec["step"]) for rec in records if "val_bits_per_base" in rec]
        by_species = [(rec["step"], rec["val_bits_per_base_by_species"]) for rec in records
                      if "val_bits_per_base_by_species" in rec]
        # validation bits/base on repeat (soft-masked) targets and on the others, where the trainer logs them
        by_repeat = [(rec["step"], rec["val_bits_per_base_repeat"], rec["val_bits_per_base_nonrepeat"])
                     for rec in records if "val_bits_per_base_repeat" in rec]
        train = [rec for rec in records if "tokens_per_s" in rec]
        results.append({"label": r["label"], "args": r["args"], "returncode": r["returncode"], "curve": val,
                        "curve_by_species": by_species, "curve_by_repeat": by_repeat,
                        "final_val_bits_per_base": val[-1][1] if val else None,
                        "best_val_bits_per_base": min(v for _, v, _ in val) if val else None,
                        "steps": train[-1]["step"] if train else 0,
                        "tokens_per_s_median": sorted(t["tokens_per_s"] for t in train[2:] or train)[
                            len(train[2:] or train) // 2] if train else None,
                        "stderr_tail": open(os.path.join(r["logs"], "stderr.txt")).read()[-1500:]
                        if r["returncode"] else ""})
    markov_path = os.path.join(HERE, "results", "markov_baseline.json")
    markov = json.load(open(markov_path))["validation"]["bits_per_base"] if os.path.exists(markov_path) else None
    meta = {"device": torch.cuda.get_device_name(0) if n_gpus else "cpu", "gpus_used": n_gpus,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "statistic": f"one run per variant; {at_once} at a time on {max(n_gpus, 1)} device(s)"}
    write_result(os.path.join(RESULTS, f"{args.name}.json"), {"meta": meta, "markov_bits_per_base": markov,
                                                             "results": results})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            if r["curve"]:
                ax.plot([t / 60 for t, _, _ in r["curve"]], [v for _, v, _ in r["curve"]], "o-", ms=3, label=r["label"])
        if markov:
            ax.axhline(markov, color="gray", ls="--", label=f"Markov baseline ({markov:.3f})")
        ax.set_xlabel("training wall-clock (min, compilation and validation excluded)")
        ax.set_ylabel("validation bits per base")
        ax.set_title(f"{meta['device']}, torch {meta['torch']}, {meta['date']}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "results", f"{args.name}.png"), dpi=110)
    except ImportError:
        pass
    print(f"{'variant':28s} {'steps':>6s} {'tokens/s':>11s} {'final val b/b':>13s} {'best':>7s} {'repeat':>7s} "
          f"{'other':>7s} rc")
    for r in results:
        repeat, other = r["curve_by_repeat"][-1][1:] if r["curve_by_repeat"] else (float("nan"),) * 2
        print(f"{r['label']:28s} {r['steps']:6d} {r['tokens_per_s_median'] or 0:11,.0f} "
              f"{r['final_val_bits_per_base'] or float('nan'):13.4f} {r['best_val_bits_per_base'] or float('nan'):7.4f} "
              f"{repeat:7.4f} {other:7.4f} {r['returncode']}")
        if r["returncode"]:
            print(r["stderr_tail"])


if __name__ == "__main__":
    main()

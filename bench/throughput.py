"""Tokens/s, MFU and peak memory of training variants, each a fresh process, run one after another.

    python bench/throughput.py --name NAME --variant "LABEL:--model=plant --compile=true ..." [--variant ...]
A variant with --nproc=N runs as N ranks under torchrun (DDP scaling: "--nproc=1 ..." against "--nproc=2 ...").
Each variant trains through plant_lm_train.train (data pipeline, loop and all) for --steps optimizer steps;
the figure is the median over log windows after the first two (warm-up and compilation left out), leaving out
windows that hold an epoch end (validation and checkpoint). The variants share one checkpoint_dir, so that the
retrieval index is built once (every variant starts fresh: resume=none).
Writes bench/results/NAME.json.
"""

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _results import RESULTS, write_result

HERE = os.path.dirname(os.path.abspath(__file__))


def run_variant(label, args, steps, log_every, extra_env, checkpoint_dir):
    logs = tempfile.mkdtemp(prefix=f"bench_{label}_")
    nproc = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--nproc=")), None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    command = [*launcher, os.path.join(HERE, "train_variant.py"), *[a for a in args if not a.startswith("--nproc=")],
               f"--max_steps={steps}",
               f"--log_every={log_every}", f"--eval_every={10**9}", "--checkpoint_every=0", f"--log_dir={logs}",
               f"--checkpoint_dir={checkpoint_dir}", "--resume=none"]
    env = dict(os.environ, WANDB_MODE="disabled", TORCH_LOGS="recompiles", **extra_env)
    started = time.time()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - started
    lines = proc.stderr.splitlines()
    recompiles = ["\n".join(lines[i:i + 4]) for i, line in enumerate(lines) if "Recompiling function" in line]
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return {"label": label, "args": args, "error": proc.stderr[-2000:], "returncode": proc.returncode}
    records = [json.loads(line) for path in glob.glob(f"{logs}/metrics_*.jsonl") for line in open(path)]
    train = [r for r in records if "tokens_per_s" in r]
    val = [r for r in records if "val_bits_per_base" in r]
    # Validation and the checkpoint run after an epoch's last step; a log window holding them is not a step rate.
    steady = [b for a, b in zip(train[1:], train[2:]) if not math.ceil(a["epoch"] - 1e-9) < b["epoch"] - 1e-9]
    steady = steady or train[2:] or train
    result = {"label": label, "args": args, "steps": steps, "ranks": nproc or 1, "windows_used": len(steady),
              "wall_s": wall,
              "recompile_messages": len(recompiles), "recompile_reasons": recompiles,  # the failed guard follows
              "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
              "tokens_per_s_windows": [r["tokens_per_s"] for r in train],
              "data_wait_frac_median": statistics.median(r["data_wait_frac"] for r in steady),
              "final_train_bits_per_base": train[-1]["bits_per_base"],
              "final_val_bits_per_base": val[-1]["val_bits_per_base"] if val else None}
    for key in ("mfu", "gpu_mem_peak_gb", "host_rss_mb"):
        if key in steady[-1]:
            result[key + ("_median" if key == "mfu" else "")] = (
                statistics.median(r[key] for r in steady) if key == "mfu" else steady[-1][key])
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--variant", action="append", required=True, help="LABEL:--arg=v --arg=v (space-separated)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    import torch
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "statistic": "median over log windows after the first two, leaving out windows that hold an epoch end "
                         "(validation, checkpoint); one run per variant"}
    results, checkpoint_dir = [], tempfile.mkdtemp(prefix="bench_checkpoints_")
    for spec in args.variant:
        label, _, arglist = spec.partition(":")
        result = run_variant(label, arglist.split(), args.steps, args.log_every, {}, checkpoint_dir)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "tokens_per_s_windows"}), flush=True)
        # after each: a cut run keeps some
        write_result(os.path.join(RESULTS, f"{args.name}.json"), {"meta": meta, "results": results})
    print(f"\n{'variant':28s} {'tokens/s':>12s} {'MFU':>7s} {'peak GB':>8s} {'data wait':>9s} {'recompiles':>10s}")
    for r in results:
        if "error" in r:
            print(f"{r['label']:28s} FAILED rc={r['returncode']}")
            continue
        print(f"{r['label']:28s} {r['tokens_per_s_median']:12,.0f} {r.get('mfu_median', float('nan')):7.1%} "
              f"{r.get('gpu_mem_peak_gb', float('nan')):8.2f} {r['data_wait_frac_median']:9.2%} "
              f"{r['recompile_messages']:10d}")


if __name__ == "__main__":
    main()

"""A long training run watched for leaks: host RSS of the trainer and of its DataLoader workers, GPU memory,
recompiles after warm-up and worker deaths, sampled every --sample-s seconds from outside the trainer. The
children are the DataLoader workers and, on a GPU, one more (most likely torch.compile's compile-worker pool).

    python bench/soak.py --name soak_h100 --minutes 20 [--field=value ...]
Runs bench/train_variant.py (Plant LM, batch 4096, epoch checkpoints and validation as in a real run) with
TORCH_LOGS=recompiles. Warm-up ends when the first validation record appears: by then the training and the
evaluation graphs have both been compiled. Writes bench/results/NAME.json and NAME.png.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from _results import RESULTS, write_result

HERE = os.path.dirname(os.path.abspath(__file__))


def memory_mb(pid):
    """RSS, and the private part of it: RSS counts the pages a forked worker still shares with its parent."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
    except (OSError, ValueError):  # the process ended between listing and reading
        return 0.0, 0.0
    return kb.get("Rss", 0) / 1024, (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024


def child_pids(pid):
    children = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            children += [int(c) for c in open(task).read().split()]
        except OSError:
            pass
    return sorted(set(children))


def gpu_used_mb(pid):
    """What the driver reports for the trainer: the caching allocator's reserve, CUDA context and kernels included."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
    return sum(float(mb) for p, mb in rows if int(p) == pid) if rows else None


def pick(samples):
    """First, middle and last sample after warm-up."""
    return {"first": samples[0], "middle": samples[len(samples) // 2], "last": samples[-1]} if samples else {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    args, overrides = parser.parse_known_args()
    logs = tempfile.mkdtemp(prefix="soak_")
    command = [sys.executable, os.path.join(HERE, "train_variant.py"), "--model=plant", "--batch_size=4096",
               "--accumulation_steps=1", "--n_epochs=100", "--log_every=50", "--eval_every=500", *overrides,
               f"--max_minutes={args.minutes}", f"--log_dir={logs}", f"--checkpoint_dir={logs}/ckpt", "--resume=none"]
    env = dict(os.environ, WANDB_MODE="disabled", TORCH_LOGS="recompiles", PYTHONUNBUFFERED="1")
    started = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_lines = []  # (seconds since start, line); a reader thread keeps the pipe from filling

    def read_stderr():
        for line in proc.stderr:
            stderr_lines.append((time.time() - started, line.rstrip("\n")))
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()

    samples, warm_at = [], None
    while proc.poll() is None:
        time.sleep(args.sample_s)
        if proc.poll() is not None:
            break
        now = time.time() - started
        if warm_at is None and any("val_bits_per_base" in line for path in glob.glob(f"{logs}/metrics_*.jsonl")
                                   for line in open(path)):
            warm_at = now
        workers = child_pids(proc.pid)
        trainer, children = memory_mb(proc.pid), [memory_mb(w) for w in workers]
        sample = {"t_s": now, "trainer_rss_mb": trainer[0], "trainer_private_mb": trainer[1], "worker_pids": workers,
                  "workers_rss_mb": sum(m[0] for m in children), "workers_private_mb": sum(m[1] for m in children),
                  "gpu_used_mb": gpu_used_mb(proc.pid),
                  "after_warmup": warm_at is not None}
        samples.append(sample)
        print(json.dumps({k: v for k, v in sample.items() if k != "worker_pids"}), flush=True)
    reader.join(timeout=30)

    records = [json.loads(line) for path in glob.glob(f"{logs}/metrics_*.jsonl") for line in open(path)]
    train = [r for r in records if "tokens_per_s" in r]
    val = [r for r in records if "val_bits_per_base" in r]
    recompiles = [{"t_s": t, "after_warmup": warm_at is not None and t > warm_at,
                   "message": "\n".join(line for _, line in stderr_lines[i:i + 4])}  # the failed guard follows
                  for i, (t, line) in enumerate(stderr_lines) if "Recompiling function" in line]
    warm_samples = [s for s in samples if s["after_warmup"]]
    worker_sets = []
    for s in warm_samples:
        if s["worker_pids"] and s["worker_pids"] not in worker_sets:
            worker_sets.append(s["worker_pids"])
    import torch
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "statistic": f"one run, sampled every {args.sample_s:g} s"}
    summary = {"returncode": proc.returncode, "wall_s": time.time() - started, "warmup_ended_s": warm_at,
               "steps": train[-1]["step"] if train else 0, "epochs": train[-1]["epoch"] if train else 0,
               "train_minutes": train[-1]["train_s"] / 60 if train else 0,
               "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train)[len(train) // 2] if train else None,
               "final_val_bits_per_base": val[-1]["val_bits_per_base"] if val else None,
               "recompiles_total": len(recompiles),
               "recompiles_after_warmup": sum(e["after_warmup"] for e in recompiles),
               "worker_pid_sets_after_warmup": worker_sets,
               "worker_errors_in_stderr": [line for _, line in stderr_lines
                                           if "DataLoader worker" in line or "killed by signal" in line],
               **{key: {when: s[key] for when, s in pick(warm_samples).items()}
                  for key in ("trainer_rss_mb", "workers_rss_mb", "trainer_private_mb", "workers_private_mb",
                              "gpu_used_mb")},
               **{key: {when: r.get(key) for when, r in pick(train[2:]).items()}
                  for key in ("gpu_mem_alloc_gb", "gpu_mem_peak_gb")}}
    write_result(os.path.join(RESULTS, f"{args.name}.json"),
                 {"meta": meta, "summary": summary, "recompiles": recompiles, "samples": samples,
                  "train_records": train, "stderr_tail": [line for _, line in stderr_lines[-40:]]})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        minutes = [s["t_s"] / 60 for s in samples]
        ax.plot(minutes, [s["trainer_rss_mb"] for s in samples], label="trainer host RSS (MB)")
        ax.plot(minutes, [s["workers_rss_mb"] for s in samples], label="child processes host RSS, sum (MB)")
        ax.plot(minutes, [s["workers_private_mb"] for s in samples], label="child processes private memory, sum (MB)")
        if any(s["gpu_used_mb"] for s in samples):
            ax.plot(minutes, [s["gpu_used_mb"] or 0 for s in samples], label="GPU memory used, nvidia-smi (MB)")
        if warm_at:
            ax.axvline(warm_at / 60, color="gray", ls="--", label="first validation (end of warm-up)")
        ax.set_xlabel("wall-clock (min)")
        ax.set_ylabel("MB")
        ax.set_title(f"soak: {meta['device']}, torch {meta['torch']}, {meta['date']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "results", f"{args.name}.png"), dpi=110)
    except ImportError:
        pass
    print(json.dumps(summary, indent=1))
    if proc.returncode:
        print("\n".join(line for _, line in stderr_lines[-30:]))


if __name__ == "__main__":
    main()

"""Shared helpers of test_training.py and test_reliability.py: tiny configs, training subprocesses, small genomes.

Every training run is a subprocess (plain python, or torchrun with gloo), on the CPU, with wandb disabled and one
OpenMP thread per process, so that the suite fits a 2-core CI machine.
"""

import glob
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "plant_lm_train.py")
TESTS = os.path.join(REPO, "tests")

# The tiny model and data shape of the brief (n_buckets stays 4096).
TINY = ["--d_model=32", "--n_layers=1", "--n_heads=2", "--context_size=16", "--local_attn_window=4",
        "--batch_size=4", "--accumulation_steps=2", "--chunk_size=600", "--eval_windows=16", "--num_workers=0",
        "--log_every=1", "--eval_every=2"]

# Variables that would change what a training subprocess does if the caller's shell happened to set them.
_SCRUB = ("RESUME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TORCHELASTIC_RUN_ID", "GROUP_RANK", "WANDB_API_KEY", "DATA_DIR", "MAX_RESTARTS", "NNODES")


def train_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               WANDB_SILENT="true")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(args, cwd, nproc=1, env=None, timeout=240, script=SCRIPT, script_args=()):
    """Run the trainer (or a tests/_*.py wrapper of it) as `nproc` processes; returns the CompletedProcess."""
    if nproc == 1:
        cmd = [sys.executable, script, *script_args, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, *script_args, *args]
    return subprocess.run(cmd, cwd=str(cwd), env=env or train_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_sh(args, cwd, timeout=240, **env):
    """Run the launcher, bash run.sh, with this interpreter; environment variables (WORLD_SIZE, ...) as keywords."""
    return subprocess.run(["bash", os.path.join(REPO, "run.sh"), *args], cwd=str(cwd),
                          env=train_env(PYTHON=sys.executable, **env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def describe(proc):
    """The tail of a finished process's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-5000:]}"


# ----------------------------------------------------------------------------- genomes

def write_fasta_gz(path, records, width=60):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    lines = []
    for header, seq in records:
        lines.append(f">{header}")
        lines.extend(seq[i:i + width] for i in range(0, len(seq), width))
    with gzip.open(str(path), "wt") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def motif_genome(n_bases, seed=0, period=97, mutation_rate=0.01):
    """A learnable genome: one random `period`-base motif repeated, with a few point mutations (seeded)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    motif = letters[rng.integers(0, 4, size=period)]
    seq = np.tile(motif, n_bases // period + 1)[:n_bases].copy()
    mutated = rng.random(n_bases) < mutation_rate
    seq[mutated] = letters[rng.integers(0, 4, size=int(mutated.sum()))]
    return seq.tobytes().decode()


def random_genome(n_bases, seed=0):
    rng = np.random.default_rng(seed)
    return np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=n_bases)].tobytes().decode()


def real_slice(src, dest, n_bases):
    """The first n_bases of the first record of a (gzipped) real genome, streamed, written as gzipped FASTA."""
    header, seq, have = None, [], 0
    with gzip.open(src, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    break
                header = line[1:]
                continue
            seq.append(line[:n_bases - have])
            have += len(seq[-1])
            if have >= n_bases:
                break
    assert header is not None and have == n_bases, f"{src}: could not read {n_bases} bases"
    return write_fasta_gz(dest, [(header, "".join(seq))])


# ----------------------------------------------------------------------------- outputs

def read_jsonl(log_dir):
    paths = sorted(glob.glob(os.path.join(str(log_dir), "metrics_*.jsonl")))
    assert paths, f"no metrics_*.jsonl in {log_dir}"
    return [json.loads(line) for path in paths for line in open(path) if line.strip()]


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


def state_differences(a, b, prefix=""):
    """Names of the tensors (nested dicts/lists walked) that are not bitwise equal between a and b."""
    diffs = []
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{prefix}: keys {sorted(map(str, set(a) ^ set(b)))} differ"]
        for k in a:
            diffs += state_differences(a[k], b[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{prefix}: lengths {len(a)} vs {len(b)}"]
        for i, (x, y) in enumerate(zip(a, b)):
            diffs += state_differences(x, y, f"{prefix}[{i}]")
    elif isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            err = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
            diffs.append(f"{prefix}: max abs difference {err:.3g}")
    elif a != b and not (isinstance(a, float) and a != a and b != b):
        diffs.append(f"{prefix}: {a!r} vs {b!r}")
    return diffs

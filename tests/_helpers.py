"""Plain helpers shared by the test modules (conftest.py holds the fixtures, built on these): the one tiny Config,
random DNA, the FASTA writer, training subprocesses and their outputs. Each exists once; import it from here.

Every training run is a subprocess (plain python, or torchrun with gloo), on the CPU, with wandb disabled and one
OpenMP thread per process, so that the suite fits a 2-core CI machine.
"""

import dataclasses
import glob
import gzip
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "plant_lm_train.py")
INFER_SCRIPT = os.path.join(REPO, "plant_lm_infer.py")
TESTS = os.path.join(REPO, "tests")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import plant_lm_train as plm  # noqa: E402

# ----------------------------------------------------------------------------- the tiny config

# The tiny model and run shape every test starts from: d_model 32, one layer, 16-token context, 600-base chunks
# (n_buckets stays 4096, one row per 6-mer).
# global_memory = buckets: most tests check the bucket memory, or windows without the retrieval memory's prefix
# tokens; tests/test_retrieval.py covers retrieval and neighbours (the default) end to end. No augmentation: most
# tests compare training windows with a chunk's frame-0 forward tokens; the augmentation tests (test_data.py) turn
# it on.
TINY = dict(d_model=32, n_layers=1, n_heads=2, context_size=16, local_attn_window=4, chunk_size=600, batch_size=4,
            accumulation_steps=2, eval_windows=16, num_workers=0, log_every=1, eval_every=2, global_memory="buckets",
            frame_shift=False, reverse_complement=0.0)
# TINY as trainer arguments, for training subprocesses (which also give their own --species_distribution).
TINY_ARGS = [f"--{key}={value}" for key, value in TINY.items()]

# Overrides of TINY for the data tests: an 8-token context, so windows are 9 tokens = 54 bases and a 600-base chunk
# holds 100 tokens; 16-window batches of 4 micro-batches, a 10% validation split scored whole (eval_windows 0).
DATA_SHAPE = dict(context_size=8, local_attn_window=8, val_fraction=0.1, eval_windows=0, batch_size=16,
                  accumulation_steps=4, seed=1234)
# Overrides of TINY for the model tests: two layers, so that the receptive field spans more than one attention
# window, and no dropout, so that a forward in training mode is deterministic.
TWO_LAYERS = dict(n_layers=2, dropout=0.0)


def tiny_config(**overrides):
    """The validated Config of TINY and overrides, with no species weights unless given (every species found gets
    default_species_weight)."""
    values = {**TINY, "species_distribution": {}, **overrides}
    if "data_dir" in values:
        values["data_dir"] = str(values["data_dir"])
    return plm.Config(**values).check()


# ----------------------------------------------------------------------------- synthetic genomes

def random_dna(n, seed, alphabet="ACGT", p=None):
    """n characters drawn from alphabet (with probabilities p); seed is an int or a numpy Generator to draw from."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(alphabet.encode(), dtype=np.uint8)
    return letters[rng.choice(len(letters), size=n, p=p)].tobytes().decode()


def motif_genome(n_bases, seed=0, period=97, mutation_rate=0.01):
    """A learnable genome: one random `period`-base motif repeated, with a few random point mutations (seeded)."""
    rng = np.random.default_rng(seed)
    motif = random_dna(period, rng)
    seq = np.frombuffer((motif * (n_bases // period + 1))[:n_bases].encode(), dtype=np.uint8).copy()
    mutated = rng.random(n_bases) < mutation_rate
    seq[mutated] = np.frombuffer(random_dna(int(mutated.sum()), rng).encode(), dtype=np.uint8)
    return seq.tobytes().decode()


_COMPLEMENT = str.maketrans("ACGTacgt", "TGCAtgca")


def detokenize(tokens):
    """6-mer ids -> the bases they spell, as a str: the tokenizer's inverse, for reading windows in tests."""
    tokens = np.asarray(tokens, dtype=np.int64)
    digits = (tokens[:, None] >> (2 * np.arange(plm.BASES_PER_TOKEN - 1, -1, -1))) & 3
    return np.frombuffer(b"ACGT", dtype=np.uint8)[digits].tobytes().decode()


def repeat_flags(chunk):
    """bool per token of a scanned chunk: at least 3 of its 6 bases soft-masked (what training reads as a repeat)."""
    return None if chunk.soft_mask is None else plm.IS_REPEAT[chunk.soft_mask]


def reverse_complement(seq):
    """The other strand, read 5' to 3'; a soft-masked (lowercase) base stays soft-masked."""
    return seq.translate(_COMPLEMENT)[::-1]


def write_fasta(path, records, line_width=60, newline="\n", blank_lines=False):
    """Write [(header, sequence), ...] as FASTA, creating the directory; gzip-compressed when the name ends in .gz.

    line_width=None puts each sequence on one line; blank_lines adds an empty line after each sequence line.
    Returns the path as a str.
    """
    parts = []
    for header, seq in records:
        parts.append(f">{header}{newline}")
        width = line_width or max(len(seq), 1)
        for i in range(0, len(seq), width):
            parts.append(seq[i:i + width] + newline)
            if blank_lines:
                parts.append(newline)
    data = "".join(parts).encode()
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return str(path)


def real_slice(src, dest, n_bases):
    """The first n_bases of the first record of a (gzipped) real genome, streamed, written as FASTA to dest."""
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
    return write_fasta(dest, [(header, "".join(seq))])


def parse_with_biopython(path):
    """[(record id, sequence str)] of a (gzipped) FASTA file, parsed by Biopython: the reference reader."""
    from Bio import SeqIO
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as handle:
        return [(r.id, str(r.seq)) for r in SeqIO.parse(handle, "fasta")]


# ----------------------------------------------------------------------------- training subprocesses

# Variables that would change what a training subprocess does if the caller's shell happened to set them.
_SCRUB = ("RESUME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TORCHELASTIC_RUN_ID", "GROUP_RANK", "WANDB_API_KEY", "DATA_DIR", "MAX_RESTARTS", "NNODES", "PLANT_LM_START")


def train_env(**extra):
    """The caller's environment without _SCRUB, with wandb disabled, one OpenMP thread and CUDA hidden; then extra."""
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


def all_windows(catalog, cfg, chunks):
    """Every window (with its prefix) of the given chunks of a scan, as one int64 tensor."""
    rows = [plm.window_tokens(chunk.tokens, plm.window_starts(chunk.n_tokens, cfg.context_size, cfg.window_stride), cfg)
            for chunk in plm.tokenized_chunks(catalog, cfg, chunks)]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


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


# ----------------------------------------------------------------------------- checkpoints

def tiny_payload(cfg, species=("s",), step=5):
    """A complete checkpoint payload of a fresh model, as train() writes it."""
    model = plm.PlantLM(cfg, len(species))
    optimizer = plm.build_optimizer(model, cfg, torch.device("cpu"))
    return {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "scaler_state_dict": {}, "epoch": 0, "step": step, "config": dataclasses.asdict(cfg),
            "species": list(species), "steps_per_epoch": 100, "world_size": 1,
            "best_val_loss": float("inf"), "rng_states": [plm.rng_states(torch.device("cpu"))]}


class _RunsCode:
    """Unpickling this calls os.system(command): what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def armed_checkpoint(path, marker):
    cfg = tiny_config()
    payload = tiny_payload(cfg, step=10**6)  # the highest step: find_latest_checkpoint would prefer it
    payload["extra"] = _RunsCode(f"touch {shlex.quote(str(marker))}")
    torch.save(payload, str(path))
    return str(path)


def assert_armed(path, marker):
    """The crafted file does run code when loaded without weights_only (in a separate process)."""
    assert not os.path.exists(marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   capture_output=True, timeout=60)
    assert os.path.exists(marker), "test setup: the crafted checkpoint is not armed"


def loader_batches(stream, num_workers, n):
    """The first n steps' (tokens, species, repeat flags, chunk numbers) that the trainer reads from a GenomeStream
    through a DataLoader(batch_size=None)."""
    from torch.utils.data import DataLoader
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    it = plm.loader_steps(iter(loader))
    out = [tuple(t.clone() for t in next(it)) for _ in range(n)]
    del it
    return out

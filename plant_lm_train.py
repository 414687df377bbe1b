"""Plant LM training: a causal 6-mer language model over the genomes of many plant species.

Launch with `bash run.sh` (torchrun, every GPU of the machine) or `python plant_lm_train.py [--field=value ...]`;
plant_lm_infer.py uses the checkpoints it writes (eval, variants, embed). The module reads top-down:

  Config            the dataclass users edit, and --field=value overrides
  data              FASTA streaming, tokenizing, chunks, the train/validation split, the data cache, the loader
  retrieval memory  the index of the training chunks (a suffix array, or count tables): counts and homologs
  model             local attention, the bucket memory, PlantLM and its mixture with the counts and homologs
  training          train() and its loop, then what the loop calls: the optimizer step (and its CUDA graph), log
                    lines, validation and saves, the wall clock, set-up, checkpoint files, logs and RNG states
  entry point       main()
"""

import contextlib
import dataclasses
import datetime
import functools
import gzip
import hashlib
import inspect
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

PROCESS_START = time.time()  # before the heavy imports: max_minutes counts from here (or from run.sh's start)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# ----------------------------------------------------------------------------- Config

VOCAB_SIZE = 4**6  # one token per 6-mer (the tokenizer's bit layout fixes the 6; see BASES_PER_TOKEN)
GLOBAL_MEMORIES = ("retrieval", "neighbours", "buckets", "none")  # see PlantLM, RetrievalIndex and SuffixIndex
INDEX_LAYOUTS = ("tables", "suffix_array")  # RetrievalIndex, SuffixIndex
# The retrieval memory looks up the 2, 3 and 4 tokens (12, 18, 24 bases) before each target, and, because a lookup
# may reach before the window, every sample then carries that many tokens of the chunk in front of it.
RETRIEVAL_CONTEXT_TOKENS = (2, 3, 4)
INDEX_KEY_BASES = [6 * (k + 1) for k in RETRIEVAL_CONTEXT_TOKENS]  # context + next 6-mer: 18, 24, 30 bases
RETRIEVAL_INDEX_FORMAT = 1  # raise when the index's layout changes: cached indexes of another format are rebuilt
# What the index costs per base of training sequence (one strand counted), from the bundled genomes' 8.0 GB over
# 117 Mbp and a 2 Gbp crop-like set (68 to 86 B/base): resident on the device and on disk, and what its build holds
# at its peak on the device (bases, both strands' keys, the sort's values and indices, the tables it makes)
INDEX_BYTES_PER_BASE = 86
INDEX_BUILD_BYTES_PER_BASE = 96 + INDEX_BYTES_PER_BASE
# The same for index_layout = suffix_array (SuffixIndex): 5 B of position per base, 0.25 B of 2-bit text and the chunk
# ends, held on the device (5.26 on the bundled genomes); built on the host a group of positions at a time (the
# chunks' bases, the text, each position's group, the array, one group's keys and order: 1.82 GB at the peak for the
# bundled 117 Mbp, the process's own memory included)
SUFFIX_INDEX_BYTES_PER_BASE = 5.3
SUFFIX_INDEX_BUILD_BYTES_PER_BASE = 16
SUFFIX_KEY_BASES = 30  # a suffix is sorted by its first 30 bases (60 bits): the longest string a lookup asks for
# global_memory = neighbours (SuffixIndex.neighbours): before each target, the last NEIGHBOUR_SEED_BASES bases are
# looked up on both strands, NEIGHBOUR_HITS occurrences a strand (the window's own chunk left out in training). Each
# hit of the last NEIGHBOUR_LOOKBACK lookups is followed on to the target, through the substitutions that stop the
# lookups after it, and the NEIGHBOUR_SLOTS homologs found most recently give the model their 6 bases aligned to the
# input token and the 6 aligned to the target. 18 bases: at 93 % identity an exact 24-mer starts at 18 % of the bases
# and an 18-mer at 27 %, while 4.5 Gbp on two strands hold a random 18-mer 0.13 times.
NEIGHBOUR_SEED_BASES = 18
NEIGHBOUR_HITS = 4
NEIGHBOUR_LOOKBACK = 16
NEIGHBOUR_SLOTS = 4
NEIGHBOUR_AGES = 8  # the model reads a slot's age as none, 0, 1, ... 5, or 6 and more tokens
NEIGHBOUR_FEATURES = 12 * 5 + 6 + NEIGHBOUR_AGES  # per slot: 12 bases one-hot, 6 agreements, age (neighbour_input)
FASTA_SUFFIXES = (".fa", ".fna", ".fasta")
# The default sampling weights: five crop genomes (soybean, Arabidopsis, rice, maize, grapevine, about 4.5 Gbp in
# all). A species found in data_dir but not named here gets default_species_weight.
CROP_SPECIES_WEIGHTS = {"glycine_max": 1.0, "arabidopsis": 0.8, "oryza_sativa": 0.7, "zea_mays": 0.6,
                        "vitis_vinifera": 0.5}

# What a Config field decides, as its dataclass metadata; a resumed run compares the saved Config by these kinds.
ARCHITECTURE = {"kind": "architecture"}  # the shapes of the weights: a checkpoint loads only into the same values
SPLIT = {"kind": "split"}  # which sequence is held out for validation: changing it would leak trained-on sequence
RUNTIME = {"kind": "runtime"}  # how a run is watched, paced and saved, not what it learns: free to change on resume


class ConfigError(ValueError):
    """A setting that cannot work; the message names the Config field, argument or checkpoint."""


@dataclass
class Config:
    # data
    data_dir: str = field(default="data", metadata=RUNTIME)
    species_distribution: dict = field(default_factory=lambda: dict(CROP_SPECIES_WEIGHTS))
    default_species_weight: float = 1.0  # for a species found in data_dir but missing above
    chunk_size: int = field(default=1_200_000, metadata=SPLIT)  # bases; windows never cross a chunk boundary
    context_size: int = field(default=64, metadata=ARCHITECTURE)  # tokens a sample reads; it predicts 64 next tokens
    overlap_ratio: float = 0.5  # consecutive windows share this fraction of their tokens
    val_fraction: float = field(default=0.02, metadata=SPLIT)  # fraction of chunks held out, by hash of the chunk
    eval_windows: int = 4096  # fixed validation windows scored at each evaluation (0 = all)
    open_chunks_per_species: int = 16  # chunks each loader worker interleaves, per species
    # augmentation of the training windows; validation and eval always read frame 0 of the forward strand, unweighted.
    # Shifts and strands give each epoch windows the model has not seen token for token: over many epochs of a few
    # genomes they held validation at its low where unaugmented runs over-fit (BENCHMARKS.md, Quality)
    frame_shift: bool = True  # each window starts 0 to 5 bases (at random) after a 6-mer boundary: every frame trains
    reverse_complement: float = 0.5  # probability that a window is read from the reverse strand
    repeat_loss_weight: float = 1.0  # loss weight of soft-masked (repeat) targets, the others 1; 1 = unweighted
    num_workers: int = field(default=4, metadata=RUNTIME)  # DataLoader workers per rank
    # model
    d_model: int = field(default=512, metadata=ARCHITECTURE)
    n_layers: int = field(default=6, metadata=ARCHITECTURE)
    n_heads: int = field(default=8, metadata=ARCHITECTURE)
    dropout: float = 0.0  # 0.1 cost 10 % of a batch-4096 step and gained nothing at equal steps (BENCHMARKS.md)
    local_attn_window: int = field(default=32, metadata=ARCHITECTURE)  # keys per query, its own position included
    n_buckets: int = field(default=VOCAB_SIZE, metadata=ARCHITECTURE)  # rows of the bucket memory, one per 6-mer
    global_context: int = 200_000  # tokens after which an observation's weight in the memory falls to 1/e
    # neighbours (the counts, and the homologs' aligned bases) | retrieval (the counts) | buckets | none. On an H200
    # neighbours reached 1.04 bits/base where retrieval reached 1.39, at equal steps and at equal wall time
    global_memory: str = field(default="neighbours", metadata=ARCHITECTURE)
    retrieval_mixing: str = field(default="gate", metadata=ARCHITECTURE)  # gate | dirichlet (retrieval only)
    # how the index is stored: suffix_array (SuffixIndex: 5.3 B/base, positions, any string length; neighbours needs
    # it) or tables (RetrievalIndex: 68-86 B/base, counts of 12/18/24-base contexts only; the fastest retrieval)
    index_layout: str = "suffix_array"
    # optimization
    batch_size: int = 16  # windows per micro-batch per rank
    accumulation_steps: int = 4
    n_epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = run all epochs)
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 10  # consecutive non-finite steps before training stops
    # Early stopping: past its best a small model only memorizes the training genomes, and model_best.pt already
    # holds the best weights. Stop when this many validations in a row found no new best (0 = never), or when the last
    # validation lies more than early_stop_rise bits/base above the best (0 = never): over-fitting, not noise
    early_stop_evals: int = field(default=5, metadata=RUNTIME)
    early_stop_rise: float = field(default=0.003, metadata=RUNTIME)
    seed: int = 1337
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    # runtime
    # Wall-clock minutes of the whole invocation, from run.sh's start (start-up, validation and saves included); the
    # run stops early enough that its last validation and model_latest.pt fit inside (0 = no limit)
    max_minutes: float = field(default=0.0, metadata=RUNTIME)
    compile: bool = field(default=True, metadata=RUNTIME)  # torch.compile on CUDA: the model, the searches' halving
    compile_mode: str = field(default="default", metadata=RUNTIME)  # default | max-autotune | max-autotune-no-cudagraphs
    # replay each optimizer step as one CUDA graph (StepGraph) on a single CUDA process; DDP and the CPU run eagerly
    cuda_graphs: bool = field(default=True, metadata=RUNTIME)
    # Validation and model_latest.pt follow the wall clock, so that they cost the same share of a run on any machine:
    # every eval_every_minutes (and at the run's end) and checkpoint_every_minutes, each
    # stretched to keep its own share of wall time under MAX_PAUSE_SHARE. A step count > 0 overrides the minutes.
    eval_every_minutes: float = field(default=1.0, metadata=RUNTIME)
    eval_every: int = field(default=0, metadata=RUNTIME)  # optimizer steps between validations (0 = by minutes)
    eval_batch_size: int = field(default=256, metadata=RUNTIME)  # validation windows per forward pass
    checkpoint_every_minutes: float = field(default=10.0, metadata=RUNTIME)  # 0 = only at epoch ends and the end
    checkpoint_every: int = field(default=0, metadata=RUNTIME)  # steps between model_latest.pt saves (0 = by minutes)
    log_every: int = field(default=50, metadata=RUNTIME)
    keep_epoch_checkpoints: int = field(default=0, metadata=RUNTIME)  # newest model_epoch_N.pt files kept (0 = all)
    checkpoint_dir: str = field(default="dna_model", metadata=RUNTIME)
    log_dir: str = field(default="logs", metadata=RUNTIME)
    resume: str = field(default="auto", metadata=RUNTIME)  # auto = latest complete checkpoint if any, none, or a path
    resume_with_new_settings: bool = field(default=False, metadata=RUNTIME)  # continue a run whose settings changed
    wandb_project: str = field(default="plant-lm", metadata=RUNTIME)

    @property
    def window_stride(self):
        return max(1, round(self.context_size * (1 - self.overlap_ratio)))

    @property
    def prefix_tokens(self):
        """Tokens of the chunk each sample carries in front of its window: what the retrieval lookups need."""
        return max(RETRIEVAL_CONTEXT_TOKENS) if self.retrieves else 0

    @property
    def retrieves(self):
        """Whether the model reads the retrieval index: its counts (retrieval), and its homologs (neighbours)."""
        return self.global_memory in ("retrieval", "neighbours")

    @property
    def window_bases(self):
        return (self.context_size + 1) * BASES_PER_TOKEN

    def check(self):
        """Fail before any heavy work, naming the field."""
        checks = [
            (self.chunk_size % BASES_PER_TOKEN == 0, "chunk_size", f"must be a multiple of {BASES_PER_TOKEN}"),
            (self.chunk_size >= self.window_bases, "chunk_size", f"must hold one window ({self.window_bases} bases)"),
            (self.context_size >= 2, "context_size", "must be >= 2"),
            (0 <= self.overlap_ratio < 1, "overlap_ratio", "must be in [0, 1)"),
            (1 <= self.local_attn_window <= self.context_size, "local_attn_window", "must be in [1, context_size]"),
            (self.n_buckets == VOCAB_SIZE, "n_buckets", f"must be 4^6 = {VOCAB_SIZE}, one bucket per 6-mer"),
            (self.n_heads >= 1, "n_heads", "must be >= 1"),
            (self.n_layers >= 1, "n_layers", "must be >= 1"),
            (self.d_model >= 1, "d_model", "must be >= 1"),
            (self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1"),
            (self.early_stop_evals >= 0, "early_stop_evals", "must be >= 0 (0 = never stop early)"),
            (0 <= self.early_stop_rise < math.inf, "early_stop_rise", "must be finite and >= 0 (0 = never stop early)"),
            (self.n_heads >= 1 and self.d_model % self.n_heads == 0, "d_model", "must be divisible by n_heads"),
            ((self.d_model // max(self.n_heads, 1)) % 2 == 0, "d_model", "d_model / n_heads must be even (rotary)"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.accumulation_steps >= 1, "accumulation_steps", "must be >= 1"),
            (self.n_epochs >= 1, "n_epochs", "must be >= 1"),
            (self.max_steps >= 0, "max_steps", "must be >= 0"),
            (self.max_minutes >= 0, "max_minutes", "must be >= 0"),
            (self.global_context >= 1, "global_context", "must be >= 1"),
            (0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)"),
            (self.eval_windows >= 0, "eval_windows", "must be >= 0"),
            (self.open_chunks_per_species >= 1, "open_chunks_per_species", "must be >= 1"),
            (0 <= self.reverse_complement <= 1, "reverse_complement", "must be a probability in [0, 1]"),
            (0 < self.repeat_loss_weight < math.inf, "repeat_loss_weight", "must be finite and > 0 (1 = unweighted)"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
            (self.keep_epoch_checkpoints >= 0, "keep_epoch_checkpoints", "must be >= 0 (0 keeps all)"),
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
            (self.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "must be auto, bf16, fp16 or fp32"),
            (self.global_memory in GLOBAL_MEMORIES, "global_memory", "must be retrieval, neighbours, buckets or none"),
            (self.global_memory != "neighbours" or self.index_layout == "suffix_array", "global_memory",
             "neighbours reads the homologs' positions, which only index_layout = suffix_array holds: set "
             "--index_layout=suffix_array"),
            (self.retrieval_mixing in ("dirichlet", "gate"), "retrieval_mixing", "must be dirichlet or gate"),
            (self.index_layout in INDEX_LAYOUTS, "index_layout", "must be tables or suffix_array"),
            (self.compile_mode in ("default", "max-autotune", "max-autotune-no-cudagraphs"), "compile_mode",
             "must be default, max-autotune or max-autotune-no-cudagraphs (cuda_graphs captures the whole step)"),
            (not (self.cuda_graphs and self.compile_mode == "max-autotune"), "compile_mode",
             "max-autotune captures CUDA graphs of its own, which cannot nest in cuda_graphs' capture of the whole "
             "step: use max-autotune-no-cudagraphs, or --cuda_graphs=false"),
            (self.default_species_weight >= 0, "default_species_weight", "must be >= 0"),
            (isinstance(self.species_distribution, dict), "species_distribution", "must map species name -> weight"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0 (0 = every eval_every_minutes)"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = every checkpoint_every_minutes)"),
            (self.eval_every_minutes > 0, "eval_every_minutes", "must be > 0 (or set eval_every, in steps)"),
            (self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", "must be >= 0 (0 = epoch ends only)"),
            (self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"Config.{name} = {getattr(self, name.split('/')[0])!r}: {why}")
        for name, weight in self.species_distribution.items():
            if not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
                raise ConfigError(f"Config.species_distribution[{name!r}] = {weight!r}: weights must be finite and >= 0")
        return self


def fields_of_kind(kind):
    """Names of the Config fields whose metadata says `kind` ('architecture', 'split', 'runtime'; None = training)."""
    return [f.name for f in dataclasses.fields(Config) if f.metadata.get("kind") == kind]


def parse_overrides(args):
    """Turn ['--key=value', ...] into Config field values, typed after the field."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown Config field {key!r}; known fields: {', '.join(fields)}")
        default = getattr(Config(), key)
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1", "yes")
            elif isinstance(default, int):
                value = int(text.replace("_", ""))
            elif isinstance(default, float):
                value = float(text)
            elif isinstance(default, dict):
                value = json.loads(text) if text.lstrip().startswith("{") else {
                    k.strip(): float(v) for k, v in (item.split(":") for item in text.split(",") if item.strip())}
            else:
                value = text
        except ValueError as e:
            raise ConfigError(f"--{key}={text!r} is not a valid {type(default).__name__}: {e}") from None
        overrides[key] = value
    return overrides


# ----------------------------------------------------------------------------- data

class DataError(Exception):
    """Bad input data; the message names the file or directory."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite steps, non-finite weights); the message says where and what is kept."""


def _byte_table():
    # A C G T -> 0..3, a c g t -> 4..7 (soft-masked repeat), anything else -> 8 (splits the sequence)
    table = np.full(256, 8, dtype=np.uint8)
    for i, base in enumerate(b"ACGT"):
        table[base] = i
        table[base + 32] = i + 4
    return table


BYTE_CODES = _byte_table()
BASES_PER_TOKEN = 6  # not a setting: tokenize() packs exactly six 2-bit bases into each 12-bit token id


def tokenize(codes):
    """Base codes (0..3 = A C G T) -> non-overlapping 6-mer ids, index = sum b_i * 4^(5-i); trailing bases dropped."""
    n = len(codes) // BASES_PER_TOKEN
    kmers = (np.asarray(codes[: n * BASES_PER_TOKEN], dtype=np.uint16) & 3).reshape(n, BASES_PER_TOKEN)
    tokens = kmers[:, 0] << 10
    for i in range(1, BASES_PER_TOKEN):
        tokens |= kmers[:, i] << (2 * (BASES_PER_TOKEN - 1 - i))
    return tokens


def soft_mask_bits(codes):
    """Base codes -> per 6-mer, which of its bases are soft-masked (lowercase): 6 bits in the token's own layout at
    one bit a base (first base highest), so that shift_tokens(..., bits=1) moves them to another frame exactly."""
    n = len(codes) // BASES_PER_TOKEN
    masked = ((np.asarray(codes[: n * BASES_PER_TOKEN], dtype=np.uint8) >> 2) & 1).reshape(n, BASES_PER_TOKEN)
    return (masked << np.arange(BASES_PER_TOKEN - 1, -1, -1, dtype=np.uint8)).sum(1, dtype=np.uint8)


# soft_mask_bits -> is the 6-mer a repeat: at least 3 of its 6 bases soft-masked
IS_REPEAT = np.array([bin(bits).count("1") >= 3 for bits in range(2**BASES_PER_TOKEN)])


def _reverse_complement_table():
    """6-mer id -> the id of its reverse complement: base i (from the left) becomes base 5 - i, and 3 - code
    complements a base (A<->T, C<->G)."""
    ids = np.arange(VOCAB_SIZE, dtype=np.int64)
    table = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for i in range(BASES_PER_TOKEN):
        table |= (3 - ((ids >> (2 * (BASES_PER_TOKEN - 1 - i))) & 3)) << (2 * i)
    return table


REVERSE_COMPLEMENT = _reverse_complement_table()


def shift_tokens(tokens, shift, bits=2):
    """Frame `shift` of consecutive 6-mers, [..., n + 1] -> [..., n]: token i becomes the 6 bases that start `shift`
    bases into it (its last 6 - shift bases, then the first `shift` of token i + 1), so no FASTA is re-read for
    another frame. shift: 0..5, an int or an array broadcast over the last axis ([rows, 1]: one per row).
    bits: per base, 2 for 6-mer ids, 1 for soft_mask_bits."""
    width = BASES_PER_TOKEN * bits
    tokens = np.asarray(tokens, dtype=np.int64)
    return ((tokens[..., :-1] << (bits * shift)) | (tokens[..., 1:] >> (width - bits * shift))) & ((1 << width) - 1)


def reverse_complement_tokens(windows):
    """Windows of 6-mer ids [..., n] as the reverse strand reads them: the order reversed and every 6-mer reverse-
    complemented; -1 (no token) stays -1."""
    flipped = np.asarray(windows, dtype=np.int64)[..., ::-1]
    return np.where(flipped >= 0, REVERSE_COMPLEMENT[np.maximum(flipped, 0)], -1)


def acgt_segments(codes):
    """(start, end) of each maximal run of A/C/G/T (any case) in a code array: the sequence is split, never spliced."""
    valid = codes < 8
    if valid.all():  # the common case: a piece of clean sequence
        return np.array([[0, len(codes)]], dtype=np.int64) if len(codes) else np.zeros((0, 2), dtype=np.int64)
    edges = np.flatnonzero(np.diff(valid.astype(np.int8), prepend=0, append=0))
    return edges.reshape(-1, 2)


def window_starts(n_tokens, context_size, stride):
    """Token offsets of the windows in a chunk; a window spans context_size + 1 tokens and never crosses the chunk."""
    span = context_size + 1
    if n_tokens < span:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_tokens - span + 1, stride, dtype=np.int64)


def window_reads(starts, n_tokens, cfg, shifts, reverse):
    """Where a chunk's windows read, for window_tokens and window_repeats: (frame-0 token positions [n, prefix +
    context + 2] in forward order, one more than a window holds since a shifted 6-mer ends in the next token; which
    of the window's prefix + context + 1 tokens lie in the chunk; shifts [n, 1]; reverse [n, 1]). On the reverse
    strand the tokens in front of a window are those after it on the forward strand."""
    starts = np.asarray(starts, dtype=np.int64)
    starts, shifts, reverse = (np.broadcast_to(a, starts.shape)[:, None] for a in (starts, shifts, reverse))
    at = np.where(reverse, starts, starts - cfg.prefix_tokens) + np.arange(cfg.prefix_tokens + cfg.context_size + 2)
    end = n_tokens - (shifts > 0)  # a shifted frame holds one 6-mer fewer: the chunk's last 6 - shift bases make none
    inside = (at[:, :-1] >= 0) & (at[:, :-1] < end)
    return np.clip(at, 0, n_tokens - 1), inside, shifts, reverse


def window_tokens(tokens, starts, cfg, shifts=0, reverse=False):
    """A chunk's windows at token `starts`, int16 [n, prefix + context + 1]: each carries the cfg.prefix_tokens tokens
    in front of it, -1 where the chunk has none. Training augments them: `shifts` (0..5, per window) starts a window
    that many bases after its token, `reverse` (per window) reads it from the reverse strand."""
    at, inside, shifts, reverse = window_reads(starts, len(tokens), cfg, shifts, reverse)
    # the shift and the strand only where a window has them: validation, eval and unaugmented training skip both
    read = shift_tokens(tokens[at], shifts) if shifts.any() else tokens[at[:, :-1]].astype(np.int64)
    windows = np.where(inside, read, -1)
    if reverse.any():
        windows = np.where(reverse, reverse_complement_tokens(windows), windows)
    return windows.astype(np.int16)  # 6-mer ids < 4096


def window_repeats(soft_mask, starts, cfg, shifts=0, reverse=False):
    """The repeat flag of each token of the same windows' window_tokens (False where there is none), from the chunk's
    soft_mask_bits: at least 3 of the token's 6 bases soft-masked, in its own frame."""
    at, inside, shifts, reverse = window_reads(starts, len(soft_mask), cfg, shifts, reverse)
    flags = IS_REPEAT[shift_tokens(soft_mask[at], shifts, bits=1)] & inside
    return np.where(reverse, flags[:, ::-1], flags)


def windows_per_chunk(n_tokens, context_size, stride):
    span = context_size + 1
    return 0 if n_tokens < span else (n_tokens - span) // stride + 1


def unit_hash(*parts):
    """A stable float in [0, 1) from the parts, independent of Python's hash seed."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_fasta_name(name):
    lower = name.lower()
    if lower.endswith(".gz"):
        lower = lower[:-3]
    return lower.endswith(FASTA_SUFFIXES)


def open_genome(path):
    """Open a FASTA file as bytes, gunzipping by magic number rather than trusting the name."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if path.lower().endswith(".gz"):
        raise DataError(f"{path}: named .gz but is not gzip-compressed")
    return open(path, "rb")


def read_fasta(path, block_size=1 << 22):
    """Stream a FASTA file as (record_index, record_id, piece) with newlines removed.

    A record's sequence arrives in several pieces, so no record is ever held whole; even a chromosome on one
    line streams in block_size pieces. Blank lines and ';' comment lines are skipped; CRLF is accepted, and spaces
    and tabs inside sequence lines are layout, removed like newlines (as Biopython does), not gaps.
    """
    record_index, record_id = -1, None
    carry = b""
    mid_line = False  # does the data start inside a line? Then a '>' or ';' there is sequence, not a header
    try:
        with open_genome(path) as f:
            first = True
            while True:
                block = f.read(block_size)
                data = carry + block
                if not data:
                    break
                if first:
                    if b"\x00" in data[:4096]:
                        raise DataError(f"{path}: binary content (NUL bytes); expected FASTA text")
                    head = data.lstrip()
                    if head and not head.startswith((b">", b";")):
                        raise DataError(f"{path}: not FASTA: the first line does not start with '>'")
                    first = False
                if block:
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:  # one long line
                        if data.startswith((b">", b";")) and not mid_line:
                            if len(data) > 1 << 20:
                                raise DataError(f"{path}: a header line is longer than 1 MiB")
                            carry = data
                            continue
                        cut = len(data)
                    data, carry = data[:cut], data[cut:]
                else:
                    carry = b""
                pos = 0
                while pos < len(data):
                    if data[pos] in b">;" and not (pos == 0 and mid_line):
                        end = data.find(b"\n", pos)
                        end = len(data) if end < 0 else end
                        if data[pos] == ord(">"):
                            header = data[pos + 1:end].decode("utf-8", "replace").strip()
                            record_index += 1
                            record_id = header.split()[0] if header else ""
                        pos = end + 1
                        continue
                    nxt = data.find(b"\n>", pos)
                    nxt_comment = data.find(b"\n;", pos)
                    if nxt < 0 or (0 <= nxt_comment < nxt):
                        nxt = nxt_comment
                    end = len(data) if nxt < 0 else nxt + 1
                    if record_id is None:
                        if data[pos:end].strip():
                            raise DataError(f"{path}: sequence before the first '>' header")
                    else:
                        piece = data[pos:end].translate(None, b"\r\n \t")
                        if piece:
                            yield record_index, record_id, piece
                    pos = end
                mid_line = not data.endswith(b"\n")
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


@dataclass
class Chunk:
    key: tuple  # (species, file, record_index, segment_start, chunk_index): the chunk's stable identity
    n_tokens: int
    record_id: str = ""
    tokens: np.ndarray = None  # uint16 6-mer ids
    soft_mask: np.ndarray = None  # uint8 soft_mask_bits per token: which of its bases are lowercase
    tail: np.ndarray = None  # the < 6 bases (codes 0..3) after the last token, which inference scores base by base


def chunk_start(key, cfg):
    """A chunk's first base in its record (0-based), from its key: its A/C/G/T segment's start plus the chunks
    before it in that segment."""
    return key[3] + key[4] * cfg.chunk_size


@dataclass
class FileStats:
    bases: int = 0  # every sequence character read
    acgt_bases: int = 0
    used_bases: int = 0  # bases that ended up in chunks (tokenized)
    non_acgt: int = 0  # N, IUPAC codes and other characters removed by splitting
    dropped_short: int = 0  # A/C/G/T bases in segment tails shorter than one window, or < 6 trailing bases
    records: int = 0
    chunks: int = 0
    other_letters: int = 0  # letters that are neither ACGT nor N: many of them means protein, not DNA
    duplicate_ids: int = 0  # records whose id an earlier record of the file already had


def chunk_file(path, species, file_label, cfg, wanted=None, stats=None, min_bases=None):
    """Stream one FASTA file into Chunks: split at every non-ACGT character, cut segments into chunk_size pieces.

    With `wanted` (a set of chunk keys) only those chunks carry tokens; the others are still yielded as bare keys,
    so every reader of a file sees the same chunk boundaries. Pieces shorter than min_bases (default: one training
    window) are dropped. Memory is one chunk plus one read block.
    """
    min_bases = cfg.window_bases if min_bases is None else min_bases
    stats = stats if stats is not None else FileStats()
    buffer = np.empty(cfg.chunk_size, dtype=np.uint8)
    fill = 0
    record_index = segment_start = chunk_index = 0
    record_id = ""
    in_segment = False  # does the last base read continue an A/C/G/T run?

    def emit():
        nonlocal fill, chunk_index
        usable = fill - fill % BASES_PER_TOKEN
        if fill < min_bases:
            stats.dropped_short += fill
            fill = 0
            return None
        stats.dropped_short += fill - usable
        stats.used_bases += usable
        stats.chunks += 1
        key = (species, file_label, record_index, segment_start, chunk_index)
        chunk_index += 1
        chunk = Chunk(key=key, n_tokens=usable // BASES_PER_TOKEN, record_id=record_id)
        if wanted is None or key in wanted:
            codes = buffer[:usable]
            chunk.tokens = tokenize(codes)
            chunk.soft_mask = soft_mask_bits(codes)
            chunk.tail = buffer[usable:fill] & 3
        fill = 0
        return chunk

    position = 0  # offset of the current piece within its record
    current_record = -1
    seen_ids = set()
    for rec_index, rec_id, piece in read_fasta(path):
        if rec_index != current_record:
            if in_segment and (chunk := emit()):
                yield chunk
            in_segment = False
            current_record, record_index, record_id, position = rec_index, rec_index, rec_id, 0
            stats.records += 1
            stats.duplicate_ids += rec_id in seen_ids
            seen_ids.add(rec_id)
        codes = BYTE_CODES[np.frombuffer(piece, dtype=np.uint8)]
        segments = acgt_segments(codes)
        n_valid = int((segments[:, 1] - segments[:, 0]).sum()) if len(segments) else 0
        stats.bases += len(codes)
        stats.acgt_bases += n_valid
        if n_valid < len(codes):
            stats.non_acgt += len(codes) - n_valid
            stats.other_letters += other_letters(piece, codes)
        if len(segments) == 0 or segments[0, 0] > 0:
            if in_segment and (chunk := emit()):
                yield chunk
            in_segment = False
        for start, end in segments.tolist():
            if not in_segment:
                segment_start, chunk_index = position + start, 0
            cursor = start
            while cursor < end:
                take = min(end - cursor, cfg.chunk_size - fill)
                buffer[fill:fill + take] = codes[cursor:cursor + take]
                fill += take
                cursor += take
                if fill == cfg.chunk_size and (chunk := emit()):
                    yield chunk
            in_segment = end == len(codes)
            if not in_segment and (chunk := emit()):
                yield chunk
        position += len(codes)
    if in_segment and (chunk := emit()):
        yield chunk


def other_letters(text, codes):
    """How many characters of FASTA sequence text (with its BYTE_CODES) are letters other than A/C/G/T and N."""
    letters = np.frombuffer(text, dtype=np.uint8) & 0xDF  # upper case
    return int(((letters >= 65) & (letters <= 90) & (codes == 8) & (letters != 78)).sum())


def check_looks_like_dna(path, stats):
    """After a file is streamed: fail, naming it, when it looks like protein or holds no record."""
    if stats.bases and stats.other_letters > 0.1 * stats.bases:
        raise DataError(f"{path}: {stats.other_letters / stats.bases:.0%} of the letters are neither A/C/G/T nor N: "
                        f"this looks like protein, not DNA")
    if stats.records == 0:
        raise DataError(f"{path}: no FASTA records")


def discover_genomes(cfg, warn=print):
    """Find DATA_DIR/<species>/<genome>.fa[.gz] files and the species weights; fail early, naming the path."""
    root = cfg.data_dir
    layout = f"expected {root}/<species>/<genome>.fa|.fna|.fasta[.gz]"
    if not os.path.isdir(root):
        raise DataError(f"{root}: data directory not found; {layout} (bash setup_env.sh fetches the bundled genomes)")
    entries = sorted(os.listdir(root))
    loose = [e for e in entries if is_fasta_name(e) and os.path.isfile(os.path.join(root, e))]
    if loose:
        raise DataError(f"{root}: FASTA files directly in the data directory ({', '.join(loose[:3])}); {layout}: "
                        f"move each into a directory named after its species")
    species_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    if not species_dirs:
        raise DataError(f"{root}: no species directories; {layout}")
    genomes, weights = {}, {}
    for species in species_dirs:
        folder = os.path.join(root, species)
        names = sorted(n for n in os.listdir(folder) if is_fasta_name(n))
        broken = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        for name in broken:
            warn(f"warning: {os.path.join(folder, name)}: broken link or not a file; skipped")
        files = [os.path.join(folder, n) for n in names if n not in broken]
        if not files:
            warn(f"warning: {folder}: species directory has no FASTA file (.fa/.fna/.fasta, optionally .gz); skipped")
            continue
        weight = cfg.species_distribution.get(species, cfg.default_species_weight)
        if weight == 0:
            warn(f"note: species {species!r} has weight 0 and is excluded")
            continue
        genomes[species], weights[species] = files, float(weight)
    absent = [s for s, w in cfg.species_distribution.items() if w > 0 and s not in genomes]
    if absent:  # one line: the default weights name five crops that most users do not train on
        warn(f"note: configured species with no FASTA under {root}/: {', '.join(absent)}")
    if not genomes:
        raise DataError(f"{root}: no usable genomes; {layout}, with at least one species of weight > 0")
    return genomes, weights


@dataclass
class GenomeCatalog:
    """What one scan of the data found: the chunks of each split and what was counted on the way."""
    species: list  # sorted names; the position is the species id
    weights: list  # sampling weight of each species
    files: dict  # species -> [(path, label)]
    train_chunks: list  # Chunk (no tokens) per training chunk
    val_chunks: list
    stats: dict  # species -> FileStats
    skipped: list  # (path, reason)
    stores: dict = field(default_factory=dict, compare=False)  # label -> its token store in the data cache, if any

    def windows(self, chunks, cfg):
        return sum(windows_per_chunk(c.n_tokens, cfg.context_size, cfg.window_stride) for c in chunks)


def split_chunks(chunks, val_fraction):
    """Deterministic split by a hash of each chunk's identity; a species with >= 2 chunks gets >= 1 of each."""
    train_chunks, val_chunks = [], []
    by_species = {}
    for chunk in chunks:
        by_species.setdefault(chunk.key[0], []).append(chunk)
    for species_chunks in by_species.values():
        scored = sorted(species_chunks, key=lambda c: unit_hash(*c.key))
        n_val = sum(unit_hash(*c.key) < val_fraction for c in scored)
        if len(scored) >= 2:
            n_val = min(max(n_val, 1), len(scored) - 1)
        held = set(id(c) for c in scored[:n_val])
        for chunk in species_chunks:
            (val_chunks if id(chunk) in held else train_chunks).append(chunk)
    return train_chunks, val_chunks


# The data cache. A scan streams every genome once (minutes at crop scale), and so does reading the validation
# windows, so both are kept: one small torch file per genome (its bare chunks, FileStats, or why it is skipped) and
# one of the validation windows, in a `data_cache` folder of checkpoint_dir. There, not next to the genomes: the data
# directory may be read-only or shared by users whose runs chunk differently, while checkpoint_dir is writable by
# every run, already holds the retrieval index built from the same scan, and is reused when run.sh restarts or
# resumes. An entry is used only when all of its key still holds: the file (real path, species, label, size,
# mtime_ns: an assembly polished in place keeps its size, not its mtime), the Config fields the code reads
# (SCAN_FIELDS, VALIDATION_FIELDS) and this module's source (CODE_DIGEST). Anything else recomputes
# and rewrites the entry, so an entry can be wrong only if a file changes and keeps its size and mtime_ns.
SCAN_FIELDS = ("chunk_size", "context_size")  # every Config field chunk_file reads (window_bases is context_size's)


def source_digest(path=__file__):
    """A hash of this module's source, its Config class's fields left out: an edit to any function, class or
    constant whose output a cache entry holds invalidates every entry, with no hand-kept list of them to go stale.
    Config is left out because users edit its defaults, and the fields an entry depends on are in its key by value
    (SCAN_FIELDS, VALIDATION_FIELDS); its derived properties (window_stride, ...) stay in. Without the source (a
    build that ships bytecode only) a random value stands in: such a build never reuses an entry, the safe side."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        derived = [inspect.getsource(v.fget) for v in vars(Config).values() if isinstance(v, property)]
        source = source.replace(inspect.getsource(Config), "".join(derived))
    except (OSError, TypeError):
        return os.urandom(8).hex()
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


CODE_DIGEST = source_digest()  # what the data cache's entries are keyed on besides the file and the fields


def cached(path, key, compute, warn, keep=lambda value: True):
    """compute()'s value (plain containers and tensors), kept in the file at path: read back from there while the
    key saved with it equals `key`, else computed and saved again, if keep(value). A damaged or unwritable cache is
    a note."""
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                return saved["value"]
        except Exception as e:  # a cache is never worth a crash
            warn(f"note: {path}: unreadable cache entry ({type(e).__name__}: {str(e)[:200]}); made again")
    value = compute()
    if not keep(value):
        return value
    try:
        write_atomically(path, {"key": key, "value": value})
    except OSError as e:
        warn(f"note: {path} is not cached ({e.__cause__ or e})")
    return value


def scan_file(path, species, label, cfg, store_path=None):
    """One genome file's (bare chunks, FileStats, None, False, its TokenStore or None), or ([], FileStats, why it is
    skipped, whether that may pass: an I/O error such as EIO or EACCES, not the file's content, None). With
    store_path, every chunk's tokens are written to a TokenStore there on the way, streamed: one chunk in memory."""
    stats = FileStats()
    try:
        if store_path is None:
            found = list(chunk_file(path, species, label, cfg, wanted=set(), stats=stats))
            store = None
        else:
            found, store = write_token_store(chunk_file(path, species, label, cfg, stats=stats), store_path)
        check_looks_like_dna(path, stats)
    except DataError as e:
        transient = isinstance(e.__cause__, OSError) and e.__cause__.errno is not None
        return [], stats, str(e), transient, None
    return found, stats, None, False, store


# A token store: one genome file's chunks, tokenized, in two flat files of the data cache (6-mer ids as uint16, soft
# mask bits as uint8, the chunks back to back in file order), so that loader workers map the chunks they own
# instead of streaming and tokenizing the whole FASTA file on every pass: with many shards most of a file is
# someone else's. What locates a chunk in them (a plain dict, cheap to hand to workers):
#   {"tokens": path, "soft_mask": path, "n_tokens": tokens in all,
#    "chunks": {key: (offset in tokens, n_tokens, record_id, tail bases)}}
# (plain ints and tuples: the data cache is read with torch.load(weights_only=True))

def write_token_store(chunks, store_path):
    """Write the tokenized `chunks` (in file order) to store_path + .tokens / .soft_mask, atomically; returns (the
    bare chunks, the store's dict)."""
    found, located, offset = [], {}, 0
    paths = {"tokens": store_path + ".tokens", "soft_mask": store_path + ".soft_mask"}
    temporary = {name: f"{path}.tmp{os.getpid()}" for name, path in paths.items()}
    try:
        with open(temporary["tokens"], "wb") as tokens, open(temporary["soft_mask"], "wb") as soft_mask:
            for chunk in chunks:
                tokens.write(chunk.tokens.astype(np.uint16).tobytes())
                soft_mask.write(chunk.soft_mask.astype(np.uint8).tobytes())
                located[chunk.key] = (offset, chunk.n_tokens, chunk.record_id, tuple(chunk.tail.tolist()))
                offset += chunk.n_tokens
                found.append(Chunk(key=chunk.key, n_tokens=chunk.n_tokens, record_id=chunk.record_id))
            for f in (tokens, soft_mask):
                f.flush()
                os.fsync(f.fileno())
        for name in paths:
            os.replace(temporary[name], paths[name])
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
    return found, {**paths, "n_tokens": offset, "chunks": located}


def token_store_holds(store):
    """Are the store's files there, each of the size its chunks say (a cleaned or half-copied cache is not)?"""
    n_tokens = store["n_tokens"]
    try:
        return os.path.getsize(store["tokens"]) == 2 * n_tokens and os.path.getsize(store["soft_mask"]) == n_tokens
    except OSError:
        return False


def stored_chunks(store, owned):
    """The owned chunks of a token store, in file order, their tokens and soft masks mapped from its files."""
    tokens = np.memmap(store["tokens"], dtype=np.uint16, mode="r", shape=(store["n_tokens"],))
    soft_mask = np.memmap(store["soft_mask"], dtype=np.uint8, mode="r", shape=(store["n_tokens"],))
    for key, (offset, n, record_id, tail) in store["chunks"].items():
        if key in owned:
            yield Chunk(key=key, n_tokens=n, record_id=record_id, tokens=tokens[offset:offset + n],
                        soft_mask=soft_mask[offset:offset + n], tail=np.array(tail, dtype=np.uint8))


def file_cache_key(path, species, label, cfg, fields, code):
    """Everything a cached result of the file depends on: the file as it is now (a copy that keeps the size and
    mtime, as rsync -a and cp -p make, still has a new inode and ctime), the Config fields and the code."""
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "species": species, "label": label, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "ctime_ns": stat.st_ctime_ns,
            "settings": {name: getattr(cfg, name) for name in fields}, "code": code}


def cached_scan_file(path, species, label, cfg, cache_dir, warn):
    """scan_file, answered from the file's entry in cache_dir while its key holds and its token store is whole:
    (bare chunks, FileStats, error or None, TokenStore or None)."""
    # the entry's name: the label made flat, and a hash of it, since "a__b/g.fa" and "a/b__g.fa" flatten alike
    name = f"{label.replace(os.sep, '__')}.{hashlib.blake2b(label.encode(), digest_size=4).hexdigest()}"
    entry_path = os.path.join(cache_dir, name + ".pt")

    def scanned():
        try:
            os.makedirs(cache_dir, exist_ok=True)
            found, stats, error, transient, store = scan_file(path, species, label, cfg,
                                                              os.path.join(os.path.abspath(cache_dir), name))
        except OSError:  # the cache cannot be written (its entry says so below): the loader reads the FASTA file
            found, stats, error, transient, store = scan_file(path, species, label, cfg)
        return {"chunks": [{f.name: getattr(c, f.name) for f in dataclasses.fields(Chunk)} for c in found],
                "stats": dataclasses.asdict(stats), "error": error, "transient": transient, "store": store}
    key = file_cache_key(path, species, label, cfg, SCAN_FIELDS, CODE_DIGEST)
    entry = cached(entry_path, key, scanned, warn, keep=lambda entry: not entry["transient"])  # I/O errors: again
    if entry["store"] is not None and not token_store_holds(entry["store"]):  # the entry outlived its store
        warn(f"note: {entry_path}: its token store is missing or cut short; scanned again")
        with contextlib.suppress(OSError):  # another rank removed it already, or the cache is read-only
            os.remove(entry_path)
        entry = cached(entry_path, key, scanned, warn, keep=lambda entry: not entry["transient"])
    store = entry["store"] if entry["store"] is not None and token_store_holds(entry["store"]) else None
    return [Chunk(**fields) for fields in entry["chunks"]], FileStats(**entry["stats"]), entry["error"], store


def scan_genomes(cfg, warn=print, progress=True, cache_dir=None):
    """Stream every genome once to find its chunks and count bases, before any model is built.

    With cache_dir, each file's result is kept there, and a file whose entry still matches is not read again (see
    the data cache above); the warnings are the same either way, since they are made from the (cached) result.
    """
    from tqdm import tqdm
    genomes, weights = discover_genomes(cfg, warn)
    species = sorted(genomes)
    chunks, stats, files, skipped, stores = [], {}, {}, [], {}
    total_bytes = sum(os.path.getsize(p) for paths in genomes.values() for p in paths)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="scanning genomes", disable=not progress)
    for name in species:
        stats[name] = FileStats()
        for path in genomes[name]:
            label = os.path.relpath(path, cfg.data_dir)
            if cache_dir is None:
                found, file_stats, error, _, _ = scan_file(path, name, label, cfg)
            else:
                found, file_stats, error, store = cached_scan_file(path, name, label, cfg, cache_dir, warn)
                if store is not None:
                    stores[label] = store
            bar.update(os.path.getsize(path))
            if error:
                warn(f"warning: {error}; file skipped")
                skipped.append((path, error))
                continue
            if not found:
                warn(f"warning: {path}: no A/C/G/T run of at least {cfg.window_bases} bases; nothing to train on")
            if file_stats.duplicate_ids:
                warn(f"warning: {path}: {file_stats.duplicate_ids} record(s) repeat an earlier record id; "
                     f"all are used, told apart by their position in the file")
            chunks.extend(found)
            files.setdefault(name, []).append((path, label))
            for f in dataclasses.fields(FileStats):
                setattr(stats[name], f.name, getattr(stats[name], f.name) + getattr(file_stats, f.name))
    bar.close()
    present = [s for s in species if any(c.key[0] == s for c in chunks)]
    for name in set(species) - set(present):
        warn(f"warning: species {name!r} has no usable sequence and is dropped")
    if not present:
        raise DataError(f"{cfg.data_dir}: no usable sequence in any genome (see the warnings above)")
    train_chunks, val_chunks = split_chunks(chunks, cfg.val_fraction)
    return GenomeCatalog(species=present, weights=[weights[s] for s in present], files=files,
                         train_chunks=train_chunks, val_chunks=val_chunks, stats={s: stats[s] for s in present},
                         skipped=skipped, stores=stores)


def assign_chunks(n_chunks, shard, n_shards, epoch, seed, species_id):
    """Indices of one species' chunks that a (rank, worker) shard reads this epoch.

    The permutation is shared by all shards (same seed), so with at least n_shards chunks every chunk goes to
    exactly one shard; with fewer, shards share chunks round-robin so that every shard can draw every species.
    """
    order = np.random.default_rng([seed, epoch, species_id]).permutation(n_chunks)
    if n_chunks >= n_shards:
        return sorted(order[shard::n_shards].tolist())
    return [int(order[shard % n_chunks])]


def owned_chunks(files, owned, cfg, stores):
    """The owned chunks of one species' files, tokenized, in file order: mapped from a file's token store where the
    scan made one (stores: label -> TokenStore), else read from the FASTA file again.

    A plain function, not a method: a generator that held its stream would make a reference cycle, and every
    finished epoch's open chunks and gzip readers would then wait for the cycle collector (in the DataLoader
    workers that meant gigabytes of garbage over tens of epochs).
    """
    name = next(iter(owned))[0]
    for path, label in files:
        if not any(key[1] == label for key in owned):  # no owned chunk in this file: not read at all
            continue
        if label in stores:
            yield from stored_chunks(stores[label], owned)
            continue
        for chunk in chunk_file(path, name, label, cfg, wanted=owned):
            if chunk.tokens is not None:
                yield chunk


def tokenized_chunks(catalog, cfg, chunks):
    """The given chunks of a scan, read again with their tokens, in file order."""
    for name in catalog.species:
        wanted = {c.key for c in chunks if c.key[0] == name}
        if wanted:
            yield from owned_chunks(catalog.files.get(name, []), wanted, cfg, catalog.stores)


@dataclass
class OpenChunk:
    """A chunk a SpeciesStream is drawing from: its windows in a random order (token starts, frame shifts, strands),
    the first `drawn` used."""
    chunk: Chunk
    starts: np.ndarray
    shifts: np.ndarray
    reverse: np.ndarray
    drawn: int = 0

    @property
    def left(self):
        return len(self.starts) - self.drawn


class SpeciesStream:
    """The windows of one species' owned chunks, drawn without replacement within each pass over them.

    `open_chunks_per_species` chunks are open at once, each read in a random window order, so that a batch mixes
    many chunks and consecutive samples are not near-duplicates. A pass ends when every owned window was drawn once.
    """

    def __init__(self, chunks, files, cfg, rng, stores):
        self.cfg, self.rng = cfg, rng
        self.owned = {c.key for c in chunks}
        labels = {c.key[1] for c in chunks}
        self.files = [(p, label) for p, label in files if label in labels]
        self.stores = {label: store for label, store in stores.items() if label in labels}
        self.open, self.source = [], None

    def _next_open_chunk(self):
        """The next chunk of this pass, opened; None when the pass has no chunk left."""
        for chunk in self.source:
            starts = self.rng.permutation(window_starts(chunk.n_tokens, self.cfg.context_size, self.cfg.window_stride))
            return OpenChunk(chunk, *draw_augmentations(starts, chunk.n_tokens, self.cfg, self.rng))
        return None

    def _new_pass(self):
        self.source = owned_chunks(self.files, self.owned, self.cfg, self.stores)
        self.open = []
        while len(self.open) < self.cfg.open_chunks_per_species and (opened := self._next_open_chunk()):
            self.open.append(opened)

    def draw(self, count):
        """`count` windows as (tokens [count, prefix + context + 1] int16, chunk keys, the tokens' repeat flags)."""
        windows, keys, repeats = [], [], []
        while count:
            if not self.open:
                self._new_pass()
            # chunks are picked in proportion to the windows they have left, so a draw is uniform over the open
            # windows: short chunks (often repeat arrays between assembly gaps) are not over-sampled
            left = np.array([o.left for o in self.open], dtype=np.float64)
            picks = self.rng.multinomial(count, left / left.sum())
            for i in np.flatnonzero(picks)[::-1]:
                current = self.open[i]
                take = min(int(picks[i]), current.left)
                drawn = slice(current.drawn, current.drawn + take)
                how = (current.starts[drawn], self.cfg, current.shifts[drawn], current.reverse[drawn])
                windows.append(window_tokens(current.chunk.tokens, *how))
                repeats.append(window_repeats(current.chunk.soft_mask, *how))
                keys.extend([current.chunk.key] * take)
                current.drawn += take
                count -= take
                if not current.left:
                    if (opened := self._next_open_chunk()):
                        self.open[i] = opened
                    else:
                        del self.open[i]
        return np.concatenate(windows), keys, np.concatenate(repeats)


def draw_augmentations(starts, n_tokens, cfg, rng):
    """(starts, frame shifts, reverse-strand flags) of a chunk's training windows, the shifts and strands drawn from
    the stream's seeded rng (a resumed run replays them), and only when Config turns them on, so that without
    augmentation the rng's sequence, and so the data order, is what it always was."""
    shifts, reverse = np.zeros(len(starts), dtype=np.int64), np.zeros(len(starts), dtype=bool)
    if cfg.frame_shift:
        # a shifted window that would run past the chunk's end (only the last of a chunk can) is the last that fits
        last = (n_tokens - cfg.context_size - 1) * BASES_PER_TOKEN
        offsets = np.minimum(starts * BASES_PER_TOKEN + rng.integers(0, BASES_PER_TOKEN, len(starts)), last)
        starts, shifts = np.divmod(offsets, BASES_PER_TOKEN)
    if cfg.reverse_complement:
        reverse = rng.random(len(starts)) < cfg.reverse_complement
    return starts, shifts, reverse


class EpochSampler:
    """One shard's species-weighted stream of batches for one epoch."""

    def __init__(self, catalog, cfg, epoch, shard, n_shards):
        self.epoch, self.cfg = epoch, cfg
        self.rng = np.random.default_rng([cfg.seed, epoch, shard, 1])
        weights = np.asarray(catalog.weights, dtype=np.float64)
        self.probs = weights / weights.sum()
        self.streams = []
        for species_id, name in enumerate(catalog.species):
            chunks = [c for c in catalog.train_chunks if c.key[0] == name]
            if not chunks:
                self.probs[species_id] = 0
                self.streams.append(None)
                continue
            mine = assign_chunks(len(chunks), shard, n_shards, epoch, cfg.seed, species_id)
            self.streams.append(SpeciesStream([chunks[i] for i in mine], catalog.files[name], cfg,
                                              np.random.default_rng([cfg.seed, epoch, shard, 2, species_id]),
                                              catalog.stores))
        if self.probs.sum() == 0:
            raise DataError(f"{cfg.data_dir}: no training chunks (every chunk went to validation)")
        self.probs /= self.probs.sum()

    def next_batch(self, batch_size):
        """(tokens [B, prefix + context + 1] int16, species ids [B] int64, chunk keys, the tokens' repeat flags
        [B, prefix + context + 1] bool) with rows in random order."""
        species = self.rng.choice(len(self.probs), size=batch_size, p=self.probs)
        parts, ids, keys, repeats = [], [], [], []
        for species_id, count in enumerate(np.bincount(species, minlength=len(self.probs))):
            if count:
                windows, chunk_keys, flags = self.streams[species_id].draw(int(count))
                parts.append(windows)
                ids.append(np.full(count, species_id))
                keys.extend(chunk_keys)
                repeats.append(flags)
        order = self.rng.permutation(batch_size)
        tokens, ids = np.concatenate(parts)[order], np.concatenate(ids)[order]
        return tokens, ids, [keys[i] for i in order], np.concatenate(repeats)[order]


STEPS_PER_ITEM = 8  # optimizer steps a loader worker hands over at once: the hand-over's cost is paid once per 8


class GenomeStream(IterableDataset):
    """The training stream of one rank, epoch after epoch, without end: one item per STEPS_PER_ITEM optimizer steps.

    An item holds whole steps (tokens [S, A, B, prefix + context + 1] int16, species [S, A, B], the tokens' repeat
    flags [S, A, B, prefix + context + 1] bool, each window's chunk [S, A, B] as its number in the retrieval index's
    text, text_chunk_numbers; S steps of A = accumulation_steps micro-batches), so the main
    process pays one hand-over and one host-to-device copy setup per S steps (loader_steps splits them again). Steps
    are grouped by absolute step number, group g = steps [g S, (g + 1) S), and group g comes from shard
    g mod n_workers of this rank: a DataLoader polls its workers round-robin from worker 0, so worker w serves the
    groups of the start step's group + w, + w + n_workers, ...; the first group is cut at the start step. The shard
    follows the steps it serves, which makes the stream the same whatever step it starts at.
    """

    def __init__(self, catalog, cfg, rank, world_size, steps_per_epoch, start_step=0):
        self.catalog, self.cfg, self.rank, self.world_size = catalog, cfg, rank, world_size
        self.per_epoch, self.start = steps_per_epoch, start_step
        self.chunk_numbers = text_chunk_numbers(catalog)

    def __iter__(self):
        worker = get_worker_info()
        wid, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        group = self.start // STEPS_PER_ITEM + wid
        role = group % n_workers  # the residue class of step groups this worker serves
        shard, n_shards = self.rank * n_workers + role, self.world_size * n_workers
        micro, batch_size, sampler = self.cfg.accumulation_steps, self.cfg.batch_size, None
        while True:
            steps = []
            for step in range(max(group * STEPS_PER_ITEM, self.start), (group + 1) * STEPS_PER_ITEM):
                epoch = step // self.per_epoch
                if sampler is None or sampler.epoch != epoch:
                    sampler = EpochSampler(self.catalog, self.cfg, epoch, shard, n_shards)
                    # fast-forward past the steps this shard served earlier in the epoch (a resume mid-epoch)
                    for _ in range(shard_steps_before(step, epoch * self.per_epoch, role, n_workers)):
                        sampler.next_batch(micro * batch_size)
                tokens, species, keys, repeat = sampler.next_batch(micro * batch_size)
                chunks = np.array([self.chunk_numbers[key] for key in keys])
                steps.append((tokens.reshape(micro, batch_size, -1), species.reshape(micro, batch_size),
                              repeat.reshape(micro, batch_size, -1), chunks.reshape(micro, batch_size)))
            yield tuple(torch.from_numpy(np.stack(part)) for part in zip(*steps))
            group += n_workers


def shard_steps_before(step, epoch_start, role, n_workers):
    """How many steps of [epoch_start, step) fall in the step groups of `role` (group g: g mod n_workers)."""
    count, group = 0, epoch_start // STEPS_PER_ITEM
    while group * STEPS_PER_ITEM < step:
        if group % n_workers == role:
            count += min(step, (group + 1) * STEPS_PER_ITEM) - max(epoch_start, group * STEPS_PER_ITEM)
        group += 1
    return count


def loader_steps(batches):
    """An iterator over GenomeStream items (from a DataLoader), one optimizer step at a time: (tokens, species,
    repeat flags, chunk numbers) views of the item, in pinned memory when the item is."""
    for item in batches:
        yield from zip(*item)


def load_validation(catalog, cfg):
    """The fixed validation windows: evenly spaced over the validation chunks, in file order, never shuffled, in frame
    0 of the forward strand whatever the training augmentation. (tokens [N, prefix + context + 1] int64, species ids
    [N], the tokens' repeat flags [N, prefix + context + 1] bool)."""
    stride = cfg.window_stride
    counts = [windows_per_chunk(c.n_tokens, cfg.context_size, stride) for c in catalog.val_chunks]
    total = sum(counts)
    picks = np.arange(total) if not cfg.eval_windows or total <= cfg.eval_windows else \
        np.unique(np.linspace(0, total - 1, cfg.eval_windows).round().astype(np.int64))
    bounds = np.cumsum([0] + counts)
    wanted = {}
    for i, chunk in enumerate(catalog.val_chunks):
        mine = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
        if len(mine):
            wanted[chunk.key] = mine * stride
    windows, species, repeats = {}, {}, {}
    for chunk in tokenized_chunks(catalog, cfg, [c for c in catalog.val_chunks if c.key in wanted]):
        windows[chunk.key] = window_tokens(chunk.tokens, wanted[chunk.key], cfg)
        repeats[chunk.key] = window_repeats(chunk.soft_mask, wanted[chunk.key], cfg)
        species[chunk.key] = catalog.species.index(chunk.key[0])
    keys = [c.key for c in catalog.val_chunks if c.key in windows]
    width = cfg.prefix_tokens + cfg.context_size + 1
    if not keys:
        return (torch.zeros(0, width, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                torch.zeros(0, width, dtype=torch.bool))
    tokens = torch.from_numpy(np.concatenate([windows[k] for k in keys]).astype(np.int64))
    ids = torch.from_numpy(np.concatenate([np.full(len(windows[k]), species[k]) for k in keys]))
    return tokens, ids, torch.from_numpy(np.concatenate([repeats[k] for k in keys]))


VALIDATION_FIELDS = SCAN_FIELDS + ("overlap_ratio", "eval_windows", "global_memory")  # what load_validation reads


def cached_validation(catalog, cfg, cache_dir, warn=print):
    """load_validation, answered from cache_dir while the validation chunks, every genome file (see the data cache)
    and the settings are the same: else it streams every file that holds a validation chunk, as long as a scan."""
    key = {"chunks": [(c.key, c.n_tokens) for c in catalog.val_chunks], "files": [
        file_cache_key(path, name, label, cfg, VALIDATION_FIELDS, CODE_DIGEST)
        for name in catalog.species for path, label in catalog.files[name]]}
    return cached(os.path.join(cache_dir, "validation.pt"), key, lambda: load_validation(catalog, cfg), warn)


# ----------------------------------------------------------------------------- retrieval memory

class RetrievalIndex:
    """What the training genomes say comes next: counts of every (context, next 6-mer) in the training chunks.

    The memory of `global_memory = retrieval`. For each context length in RETRIEVAL_CONTEXT_TOKENS (12, 18, 24 bases)
    it holds every (context + next 6 bases) string of the training chunks, on both strands and at every base offset
    (a homolog's 6-mer frame is arbitrary after any indel), packed 2 bits a base into one int64 key (at most 30
    bases), sorted and unique, with cumulative counts. A context's count is then a range sum and a (context, target)
    count an exact hit, each one binary search (torch.searchsorted) on the device that trains. Validation chunks are
    never in it.
    """

    def __init__(self, keys, cumulative, digest):
        self.keys, self.cumulative, self.digest = keys, cumulative, digest  # one tensor each per context length
        self.reverse_complement = torch.from_numpy(REVERSE_COMPLEMENT.astype(np.int64)).to(keys[0].device)

    def to(self, device):
        return RetrievalIndex([k.to(device) for k in self.keys], [c.to(device) for c in self.cumulative], self.digest)

    def summary(self):
        return (f"{sum(len(k) for k in self.keys):,} (context, next 6-mer) entries over {len(self.keys)} context "
                f"lengths")

    @torch.no_grad()
    def counts(self, windows, prefix, exclude_self, target_bases=(0, BASES_PER_TOKEN)):
        """windows [B, prefix + T + 1] (-1 before a chunk's start) -> [B, T, O, len(target_bases)] float32: for each
        of the T targets and each of the O context lengths, the occurrences of the context followed by the target's
        first j bases, for each j in target_bases: j = 0 counts the context, j = 6 the context and the whole target.
        Scoring base by base asks for every j (the smoothing of each prefix of the 6-mer, PlantLM.mixed_log_probs).

        Keys sort first base highest, so the keys that continue a context with j given bases are one range, and
        each count is a difference of two cumulative counts.

        exclude_self (training): a training window is in the index, so its own occurrence is taken out of every
        count (leave-one-out), twice where context and target together are their own reverse complement and so
        also sit on the other strand at the same place (as then do the context and each prefix of the target: the
        same occurrences leave every count). A context that alone is its own reverse complement keeps its reading
        on the other strand: one more in its count, never in a count with the target. Overlapping windows hold
        the same occurrence, so they drop out with it.
        """
        B, T = windows.shape[0], windows.shape[1] - prefix - 1
        per_length = []
        for k, keys, cumulative in zip(RETRIEVAL_CONTEXT_TOKENS, self.keys, self.cumulative):
            grams, known = context_grams(windows, prefix, k)
            key = packed_tokens(grams)
            bounds = []  # per j, the range of keys that begin with the context and the target's first j bases
            for j in target_bases:
                free = 2 * (BASES_PER_TOKEN - j)  # the bits of the target's bases past the first j
                low = (key >> free) << free
                bounds += [low, low + (1 << free)]
            at = cumulative[torch.searchsorted(keys, torch.stack(bounds, -1))]  # one search for every bound
            found = at[..., 1::2] - at[..., 0::2]
            if exclude_self:  # a palindrome: its tokens are their own reverse-complemented tokens, reversed
                own = 1 + (self.reverse_complement[grams.flip(-1)] == grams).all(-1).long()
                found = (found - own[..., None]).clamp_min(0)
            per_length.append(found * known[..., None])
        return torch.stack(per_length, 2).float()


def packed_tokens(tokens):
    """Tokens [..., m] (int64, m <= 5) -> their 6m bases as one int64, 2 bits a base, the first base highest."""
    packed = torch.zeros_like(tokens[..., 0])
    for i in range(tokens.shape[-1]):
        packed = (packed << 12) | tokens[..., i]
    return packed


def context_grams(windows, prefix, k):
    """windows [B, prefix + T + 1] -> the k context tokens and the target of each of the T targets [B, T, k + 1]
    (int64, -1 read as 0), and whether the context lies within the chunk [B, T]."""
    T = windows.shape[1] - prefix - 1
    grams = windows.unfold(1, k + 1, 1)[:, prefix + 1 - k:prefix + 1 - k + T]
    return grams.long().clamp_min(0), (grams >= 0).all(-1)


class SuffixIndex:
    """The retrieval memory's counts from a suffix array: the same counts() as RetrievalIndex in 5.3 bytes a base.

    The training chunks, one strand, concatenated into a 2-bit text (int64 words of 32 bases, first base highest),
    and every position of it (5 bytes: low 32 bits, high 8) sorted by the up to 30 bases that follow it inside its
    chunk, a suffix that reaches its chunk's end sorting before every longer one that shares its bases (the end
    reads as a letter below A). So the positions where a string of up to 30 bases occurs inside a chunk are one
    range of the array, found by two binary searches that read each probe's bases from the text; the other strand
    needs no entries, since a string's count there is the forward count of its reverse complement.

    A string's count is its occurrences lying wholly inside a training chunk, on either strand. RetrievalIndex
    counts a context only where its next 6 bases fit in the chunk too, so the two differ for occurrences of a
    context within 6 bases of a chunk's edge, and nowhere else (tested).

    With several ranks each holds a slice of the array, 1/ranks of its rows (and all of the text, 0.25 B/base):
    every rank counts every rank's strings in its slice, and the slices' counts add up (one all_gather and one
    all_reduce per counts(), and no host sync), so every rank must call counts() as often as the others, with
    windows of the same shape.
    """

    def __init__(self, text, sa_low, sa_high, block_ends, block_bits, digest, ranks=1):
        self.text, self.sa_low, self.sa_high, self.block_ends = text, sa_low, sa_high, block_ends
        self.block_bits, self.digest, self.ranks = block_bits, digest, ranks
        self.n = len(sa_low)  # rows of this rank's slice
        self.reverse_complement = torch.from_numpy(REVERSE_COMPLEMENT.astype(np.int64)).to(text.device)
        # every chunk's end: a block holds at most one, and it is the first end past its start (build_suffix_index)
        self.chunk_ends = torch.unique(block_ends)
        self.halving = halve_ranges  # compile_lookups swaps in its compiled form

    def compile_lookups(self):
        """Compile a halving of the binary searches (on CUDA): a dozen elementwise kernels become one, 27 times
        in each search, where eagerly they are most of a step's launches. Compiling the whole search instead
        would take minutes (inductor's time grows with the unrolled loop)."""
        self.halving = torch.compile(halve_ranges, dynamic=True)

    def to(self, device):
        return SuffixIndex(self.text.to(device), self.sa_low.to(device), self.sa_high.to(device),
                           self.block_ends.to(device), self.block_bits, self.digest, self.ranks)

    def slice_for(self, rank, ranks):
        """This index's slice for `rank` of `ranks` (rows rank * n // ranks up to the next rank's first)."""
        first, last = rank * self.n // ranks, (rank + 1) * self.n // ranks
        return SuffixIndex(self.text, self.sa_low[first:last], self.sa_high[first:last], self.block_ends,
                           self.block_bits, self.digest, ranks)

    def summary(self):
        return f"a suffix array of {self.n:,} positions (index_layout = suffix_array)"

    @torch.no_grad()
    def counts(self, windows, prefix, exclude_self, target_bases=(0, BASES_PER_TOKEN)):
        """As RetrievalIndex.counts: [B, T, O, len(target_bases)] float32 counts of each context followed by the
        target's first j bases, on both strands, leave-one-out in training (exclude_self)."""
        return self.counted_ranges(windows, prefix, exclude_self, target_bases)[0]

    @torch.no_grad()
    def counts_and_neighbours(self, windows, prefix, exclude_self, chunks=None, target_bases=(0, BASES_PER_TOKEN)):
        """(counts(), neighbours()) from one set of searches: neighbours' seeds, the NEIGHBOUR_SEED_BASES bases
        before each target on both strands, are the counts' contexts of that length, whose ranges the counts
        have already found (2 of the 14 searches a target asks for in training)."""
        counts, first, end = self.counted_ranges(windows, prefix, exclude_self, target_bases)
        seed = COUNT_CONTEXT_BASES.index(NEIGHBOUR_SEED_BASES), list(target_bases).index(0)  # the bare contexts
        return counts, self.neighbours(windows, prefix, chunks, (first[:, :, seed[0], seed[1]],
                                                                 end[:, :, seed[0], seed[1]]))

    def counted_ranges(self, windows, prefix, exclude_self, target_bases):
        """counts(), and with one rank the rows of the array where each of its strings begins (first, end
        [B, T, O, J, 2]: both strands; None with several ranks, whose slices' rows are not the array's)."""
        B, T = windows.shape[0], windows.shape[1] - prefix - 1
        strings, lengths, known, owns = [], [], [], []
        for k in RETRIEVAL_CONTEXT_TOKENS:
            grams, in_chunk = context_grams(windows, prefix, k)
            known.append(in_chunk)
            flipped = self.reverse_complement[grams.flip(-1)]  # the reverse strand's tokens, in its order
            forward, reverse = packed_tokens(grams), packed_tokens(flipped)
            whole = 6 * (k + 1)  # bases of context and target; left-align both strings in SUFFIX_KEY_BASES
            forward, reverse = forward << 2 * (SUFFIX_KEY_BASES - whole), reverse << 2 * (SUFFIX_KEY_BASES - whole)
            for j in target_bases:  # the context and the target's first j bases, and its reverse complement:
                n = whole - BASES_PER_TOKEN + j  # the last n bases of the reverse string
                strings += [forward & top_bases_mask(n), (reverse << 2 * (whole - n)) & KEY_MASK]
                lengths += [torch.full_like(forward, n)] * 2  # made on the device: a captured step copies nothing
            owns.append(1 + (flipped == grams).all(-1).long())  # a palindrome also sits on the other strand
        strings, lengths = torch.stack(strings, -1), torch.stack(lengths, -1)  # [B, T, 2 * O * J]
        shape = B, T, len(known), len(target_bases), 2
        if self.ranks == 1:
            first, end = (x.view(shape) for x in self.rows_of(strings, lengths))
            found = end - first
        else:
            first = end = None
            found = self.occurrences(strings.flatten(), lengths.flatten()).view(shape)
        found = found.sum(-1)
        if exclude_self:
            found = (found - torch.stack(owns, 2)[..., None]).clamp_min(0)
        return (found * torch.stack(known, 2)[..., None]).float(), first, end

    @torch.no_grad()
    def neighbours(self, windows, prefix, chunks=None, seed_ranges=None):
        """global_memory = neighbours: for each of the T targets of windows [B, prefix + T + 1] (-1 where there is
        no token), NEIGHBOUR_SLOTS homologs from the training chunks, as (bases [B, T, S, 12] int64: each slot's 6
        bases aligned to the input token, then the 6 aligned to the target, in the window's strand, 4 where the slot
        has no homolog or its homolog's chunk has ended; age [B, T, S] int64: tokens since the lookup that last
        found it, -1 for none).

        Before each target the last NEIGHBOUR_SEED_BASES bases are looked up on both strands, and of each strand's
        range of the array NEIGHBOUR_HITS + 1 rows spread evenly over it are read (the first rows of a range would
        all continue with the smallest bases). Every hit of the last NEIGHBOUR_LOOKBACK lookups is followed on, 6 bases
        a token, to where it aligns with this target: a homolog found once is read on through the substitutions
        that stop the next lookups, and found again 18 bases after an indel. Hits that align to the same place are
        one homolog; the slots take the most recently found ones. chunks [B] (training): each window's chunk as its
        number in the text (-1: none); hits there are left out, so that training sees what validation sees.
        seed_ranges: the seeds' rows when a search has found them already (counts_and_neighbours). Every rank needs
        the whole array (no collectives)."""
        if self.ranks != 1:
            raise ValueError("SuffixIndex.neighbours reads positions from the whole array, not a rank's slice")
        B, T = windows.shape[0], windows.shape[1] - prefix - 1
        if not self.n:
            return (windows.new_full((B, T, NEIGHBOUR_SLOTS, 2 * BASES_PER_TOKEN), 4, dtype=torch.int64),
                    windows.new_full((B, T, NEIGHBOUR_SLOTS), -1, dtype=torch.int64))
        # [B, T, H]: H = 2 strands' rows
        anchor, direction, valid, chunk = self.seed_hits(windows, prefix, chunks, seed_ranges)
        # every hit of the last NEIGHBOUR_LOOKBACK targets' lookups, carried to this target: [B, T, H * L]
        L = NEIGHBOUR_LOOKBACK
        lag = torch.arange(L, device=windows.device)
        carried = lambda x: F.pad(x, (0, 0, L - 1, 0)).unfold(1, L, 1).flip(-1)  # noqa: E731  [B, T, H, L], lag 0 first
        anchor = (carried(anchor) + carried(direction) * BASES_PER_TOKEN * lag).flatten(2)
        valid, chunk, direction = (carried(x).flatten(2) for x in (valid.long(), chunk, direction))
        valid = valid.bool()
        age = lag.repeat(anchor.shape[-1] // L)  # the flattened order: hit-major, lag-minor
        # one homolog per (place, strand): of hits that align alike, the youngest; then the youngest homologs
        place = torch.where(valid, (anchor << 1 | (direction > 0)) << 7 | age, torch.iinfo(torch.int64).max)
        place, order = torch.sort(place, dim=-1)
        first = torch.ones_like(valid)
        first[..., 1:] = (place[..., 1:] >> 7) != (place[..., :-1] >> 7)
        keep = first & (place != torch.iinfo(torch.int64).max)
        age = age[order]
        # ages fit a byte (NEIGHBOUR_LOOKBACK < 256): a radix sort of bytes makes 2 passes where one of int64 makes
        # 16 (on an H200 the two int64 sorts were 14 % of a batch-4096 step)
        youngest = torch.sort(torch.where(keep, age, L).to(torch.uint8), dim=-1, stable=True)
        pick = order.gather(-1, youngest.indices[..., :NEIGHBOUR_SLOTS])
        anchor, chunk, direction = (x.gather(-1, pick) for x in (anchor, chunk, direction))
        age = youngest.values[..., :NEIGHBOUR_SLOTS].long()
        age = torch.where(age < L, age, -1)
        offsets = torch.arange(-BASES_PER_TOKEN, BASES_PER_TOKEN, device=windows.device)
        position = anchor[..., None] + direction[..., None] * offsets  # [B, T, S, 12]
        chunk = chunk[..., None]
        start = torch.where(chunk > 0, self.chunk_ends[(chunk - 1).clamp_min(0)], 0)
        inside = (age[..., None] >= 0) & (position >= start) & (position < self.chunk_ends[chunk])
        position = position.clamp(0, len(self.text) * 32 - 1)
        bases = (self.text[position >> 5] >> (62 - 2 * (position & 31))) & 3
        bases = torch.where(direction[..., None] > 0, bases, 3 - bases)
        return torch.where(inside, bases, 4), age

    def seed_hits(self, windows, prefix, chunks, seed_ranges=None):
        """neighbours' lookups: for each target, NEIGHBOUR_HITS + 1 rows of each strand's range for the
        NEIGHBOUR_SEED_BASES bases before it, the strands in turn, as (anchor, direction, valid, chunk)
        [B, T, 2 * rows]: the text position aligned with the target's first base (after the seed on the forward
        strand; on the reverse, the seed's reverse complement starts at the hit, and the window's next base pairs
        with the base before it), which way the window's bases run there (1, -1), whether the row is a hit (outside
        the window's own chunk), and the hit's chunk."""
        B, T = windows.shape[0], windows.shape[1] - prefix - 1
        k = -(-NEIGHBOUR_SEED_BASES // BASES_PER_TOKEN)  # tokens that hold the seed
        context = windows.unfold(1, k, 1)[:, prefix + 1 - k:prefix + 1 - k + T].long()  # the k tokens before each
        known = (context >= 0).all(-1)
        first, end = seed_ranges or suffix_ranges(self, *seed_strings(self, context.clamp_min(0)))  # [B, T, 2]:
        found = end - first  # each strand's range of rows
        # one row more than NEIGHBOUR_HITS: in training a window's own occurrence is always in its range, and is
        # left out below, so that training reads as many hits as validation
        rows_read = NEIGHBOUR_HITS + 1
        pick = torch.arange(rows_read, device=windows.device)
        spread = found[..., None].clamp_min(rows_read)  # a range of fewer rows is read from its start
        rows = (first[..., None] + pick * spread // rows_read).clamp_max(self.n - 1)  # [B, T, 2, rows_read]
        valid = (pick < found[..., None]) & known[..., None, None]
        at = self.positions(rows)
        chunk = torch.searchsorted(self.chunk_ends, at, right=True)
        if chunks is not None:
            valid &= chunk != chunks.view(B, 1, 1, 1)
        direction = (1 - 2 * torch.arange(2, device=windows.device)).view(1, 1, 2, 1).expand_as(at)  # made on the
        # device, as every tensor here: a captured step copies nothing from the host
        anchor = torch.where(direction > 0, at + NEIGHBOUR_SEED_BASES, at - 1)
        take = lambda x: x.transpose(2, 3).flatten(2)  # noqa: E731  [B, T, 2, H] -> [B, T, H * 2], strands in turn
        return take(anchor), take(direction), take(valid), take(chunk)

    def chunk_numbers(self):
        """{chunk_digest of each chunk's bases: its number in the text}: how inference finds the training chunk it
        scores, so that it leaves that chunk's homologs out as training does (read from the text on the host)."""
        text, shifts = self.text.cpu().numpy().view(np.uint64), np.arange(62, -1, -2, dtype=np.uint64)
        numbers, start = {}, 0
        for number, end in enumerate(self.chunk_ends.tolist()):
            words = text[start >> 5:(end + 31) >> 5]
            bases = ((words[:, None] >> shifts) & np.uint64(3)).astype(np.uint8).ravel()
            numbers[chunk_digest(bases[start & 31:(start & 31) + end - start])] = number
            start = end
        return numbers

    def occurrences(self, strings, lengths):
        """Forward-strand occurrences inside a chunk of each string (its `lengths` bases, left-aligned in 60 bits),
        summed over the ranks' slices."""
        asked = torch.stack([strings, lengths])  # the same shape on every rank (the class's contract)
        everyone = [torch.empty_like(asked) for _ in range(self.ranks)]
        dist.all_gather(everyone, asked)
        everyone = torch.cat(everyone, 1)
        found = self.in_slice(everyone[0], everyone[1])
        dist.all_reduce(found)
        mine = dist.get_rank() * len(strings)
        return found[mine:mine + len(strings)]

    def in_slice(self, strings, lengths):
        """occurrences() among this rank's rows of the array."""
        first, end = self.rows_of(strings, lengths)
        return end - first

    def rows_of(self, strings, lengths):
        """suffix_ranges in this rank's rows of the array (none: more ranks than rows)."""
        if not self.n:
            return torch.zeros_like(strings), torch.zeros_like(strings)
        return suffix_ranges(self, strings, lengths)

    def positions(self, rows):
        """Rows of the suffix array -> their text positions (int64), from the 40 bits stored as 32 + 8."""
        return (self.sa_high[rows].long() << 32) | (self.sa_low[rows].long() & 0xFFFFFFFF)

    def suffix(self, rows):
        """Rows of the suffix array -> suffix_keys of their positions."""
        return suffix_keys(self, self.positions(rows))


KEY_MASK = (1 << 2 * SUFFIX_KEY_BASES) - 1
COUNT_CONTEXT_BASES = tuple(BASES_PER_TOKEN * k for k in RETRIEVAL_CONTEXT_TOKENS)
assert NEIGHBOUR_SEED_BASES in COUNT_CONTEXT_BASES, "counts_and_neighbours takes the seeds from the counts' search"


def seed_strings(index, context):
    """The k tokens before each target [B, T, k] -> neighbours' seeds, (strings, lengths) [B, T, 2]: the last
    NEIGHBOUR_SEED_BASES bases, and their reverse complement, left-aligned as suffix_ranges reads them."""
    forward, reverse = packed_tokens(context), packed_tokens(index.reverse_complement[context.flip(-1)])
    extra = context.shape[-1] * BASES_PER_TOKEN - NEIGHBOUR_SEED_BASES
    forward = (forward & ((1 << 2 * NEIGHBOUR_SEED_BASES) - 1)) << 2 * (SUFFIX_KEY_BASES - NEIGHBOUR_SEED_BASES)
    reverse = (reverse >> 2 * extra) << 2 * (SUFFIX_KEY_BASES - NEIGHBOUR_SEED_BASES)
    strings = torch.stack([forward, reverse], -1)
    return strings, torch.full_like(strings, NEIGHBOUR_SEED_BASES)


def suffix_ranges(index, strings, lengths):
    """The rows of a SuffixIndex's array (its rank's slice) that begin with each string (its `lengths` bases,
    left-aligned in 60 bits), as (first, end): how many suffixes sort before it, and before or at it. Two binary
    searches of fixed length, run together, so that they need no host sync (a captured graph can hold them)."""
    shape, strings, lengths = strings.shape, strings.flatten(), lengths.flatten()
    low = torch.zeros(2, len(strings), dtype=torch.int64, device=strings.device)
    high = torch.full_like(low, index.n)
    for _ in range(max(index.n, 1).bit_length()):
        low, high = index.halving(index, low, high, strings, lengths)
    return low[0].view(shape), low[1].view(shape)


def halve_ranges(index, low, high, strings, lengths):
    """One step of suffix_ranges' searches, low and high [2, N]: row 0 narrows to the first suffix that does not
    sort before its string, row 1 to the first past those that begin with it."""
    at_most = torch.arange(2, device=low.device).view(2, 1) == 1
    active = low < high
    middle = (low + high) >> 1
    bases, left = index.suffix(middle.clamp_max(index.n - 1))
    shared = top_bases_mask(torch.minimum(left, lengths))
    here, wanted = bases & shared, strings & shared
    before = (here < wanted) | (here == wanted) & (at_most | (left < lengths))
    return torch.where(active & before, middle + 1, low), torch.where(active & ~before, middle, high)


def suffix_keys(index, position):
    """Positions in a SuffixIndex's text -> (the 30 bases from each, left-aligned in 60 bits; how many of them lie
    in its chunk). Bases past the chunk's end are the next chunk's: the count says how many are its own."""
    word, offset = position >> 5, 2 * (position & 31)
    first, second = index.text[word], index.text[word + 1]
    bits = (first << offset) | ((second >> 1) >> (63 - offset)) & ((offset * 0 + 1 << offset) - 1)
    block = position >> index.block_bits
    end = torch.where(position < index.block_ends[block], index.block_ends[block], index.block_ends[block + 1])
    return (bits >> 4) & KEY_MASK, (end - position).clamp_max(SUFFIX_KEY_BASES)


def top_bases_mask(n):
    """The bits of the first n bases (a tensor or array of counts) of left-aligned 60-bit strings."""
    return KEY_MASK ^ ((n * 0 + 1 << 2 * (SUFFIX_KEY_BASES - n)) - 1)


def load_or_build_retrieval_index(catalog, cfg, rt, warn=print):
    """The retrieval index (of cfg.index_layout) of this data set's training chunks, on rt.device: loaded from
    checkpoint_dir when an index of the same training chunks is cached there, else built by rank 0 (tables on its
    device, a suffix array on the host) and cached; of a suffix array each rank loads its slice, or with
    global_memory = neighbours all of it (neighbours reads positions from the whole array)."""
    digest = training_chunks_digest(catalog)
    slices = 1 if cfg.global_memory == "neighbours" else rt.world_size
    path = retrieval_index_path(cfg.checkpoint_dir, digest, cfg.index_layout)
    n_bases = sum(c.n_tokens for c in catalog.train_chunks) * BASES_PER_TOKEN
    problem = index_fit_problem(n_bases, os.path.getsize(path) if os.path.exists(path) else None,
                                free_device_bytes(rt.device), available_host_bytes(),
                                free_disk_bytes(cfg.checkpoint_dir), cfg.index_layout, slices, cfg.global_memory)
    if problem:  # every rank finds the same (one machine kind); a mixed cluster fails on the smallest GPU
        raise ConfigError(problem)
    if rt.is_main and not os.path.exists(path):
        t_start = time.time()
        built = build_retrieval_index(catalog, cfg, rt.device, digest)
        save_retrieval_index(built, path)
        warn(f"retrieval index: {built.summary()}, built in {time.time() - t_start:.0f} s, cached as {path} "
             f"({os.path.getsize(path) / 1e9:.2f} GB, {os.path.getsize(path) / max(n_bases, 1):.2f} bytes per base)")
        del built  # loaded again below, as this rank's share: never two copies on the device
    if rt.distributed:
        dist.barrier()  # the other ranks wait for rank 0's build
    if not os.path.exists(path):
        raise ConfigError(f"{path}: rank {rt.rank} finds no retrieval index. Rank 0 builds it in checkpoint_dir, "
                          f"which every node must share: set --checkpoint_dir to a folder all nodes see")
    return load_retrieval_index(path, rt.device, rt.rank % slices, slices)


def index_fit_problem(n_bases, cached_bytes, free_device, free_host, free_disk, layout, ranks, memory="retrieval"):
    """Why the retrieval index (of index_layout `layout`) of n_bases of training sequence cannot be built or held
    here, as one line naming the figures and the ways out; None when it fits. cached_bytes: the size of the cached
    index, or None if it must be built. Tables are built on the device that holds them, and every rank holds them
    whole; a suffix array is built on the host, and each of `ranks` holds 1/ranks of it (and all of its text).
    memory: the global_memory that reads it (neighbours holds a suffix array whole on every rank: ranks = 1)."""
    gb = lambda n: f"{n / 1e9:,.1f} GB"  # noqa: E731
    held, building = ((INDEX_BYTES_PER_BASE, INDEX_BUILD_BYTES_PER_BASE) if layout == "tables" else
                      (SUFFIX_INDEX_BYTES_PER_BASE, SUFFIX_INDEX_BUILD_BYTES_PER_BASE))
    built = cached_bytes is None
    resident = n_bases * held if built else cached_bytes
    where, free = ("on each GPU", free_device) if free_device is not None else ("in host memory", free_host)
    if layout == "tables":  # built where they are held, and the build holds more than its result
        needs = [(where, n_bases * building if built else resident, free)]
    else:  # every rank holds the 2-bit text whole, beside its slice of the rest; the build is on the host, where
        text = n_bases / 4  # on the CPU the result is held too, and the build's peak is the larger
        needs = [] if built and free_device is None else [(where, (resident - text) / ranks + text, free)]
        if built:
            needs.append(("in host memory", n_bases * building, free_host))
    if built:
        needs.append(("on disk in checkpoint_dir", resident, free_disk))
    short = [f"{gb(need)} {where} ({gb(free)} free)" for where, need, free in needs if need > free]
    if not short:
        return None
    ways = {"tables": "--index_layout=suffix_array (about 16 times smaller, and shared out over the GPUs), ",
            "suffix_array": "more GPUs (each holds its share of a suffix array), "}[layout]
    if memory == "neighbours" and free_device is not None:  # more GPUs do not help: each holds the whole array
        ways = "--global_memory=retrieval (the counts alone: its suffix array is shared out over the GPUs), "
    return (f"the retrieval index of {n_bases / 1e9:,.2f} Gbp of training sequence does not fit: it needs "
            f"{' and '.join(short)}, about {held} bytes per base held and {building} while it is built "
            f"(index_layout = {layout}). Ways out: {ways}--global_memory=none (no retrieval memory), fewer species "
            f"or genomes (a species_distribution weight of 0 leaves a species out), or a GPU with more memory")


def free_device_bytes(device):
    """Free memory on the CUDA device, None on the CPU (where host memory is what counts)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def free_disk_bytes(folder):
    """Free bytes on the file system that holds `folder`, or would hold it once made."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def available_host_bytes():
    """MemAvailable from /proc/meminfo, or unlimited where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def training_chunks_digest(catalog):
    """A hash of what the index is built from: every training chunk's identity and length, and each file's size and
    modification time (copying the genomes elsewhere therefore builds the index again, which is the safe side)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((RETRIEVAL_CONTEXT_TOKENS, BASES_PER_TOKEN, RETRIEVAL_INDEX_FORMAT)).encode())
    for chunk in sorted(catalog.train_chunks, key=lambda c: c.key):
        h.update(repr((chunk.key, chunk.n_tokens)).encode())
    for species in sorted(catalog.files):
        for path, label in catalog.files[species]:
            stat = os.stat(path)  # a file edited in place (a polished assembly, same length) has a new mtime
            h.update(repr((label, stat.st_size, stat.st_mtime_ns)).encode())
    return h.hexdigest()


def build_retrieval_index(catalog, cfg, device, digest):
    """The index of cfg.index_layout over the training chunks: tables built on `device`, a suffix array on the host
    with its groups sorted on `device` where it has room (load_retrieval_index moves it, or a rank's slice of it, to
    the device: no GPU holds more than its slice)."""
    keys, bases = [], []
    for chunk in tokenized_chunks(catalog, cfg, catalog.train_chunks):
        keys.append(chunk.key)
        bases.append(token_bases(chunk.tokens))
    numbers = text_chunk_numbers(catalog)
    if [numbers.get(key) for key in keys] != list(range(len(numbers))):  # what the loader tells neighbours
        raise RuntimeError("the training chunks were read in another order than text_chunk_numbers gives")
    if cfg.index_layout == "suffix_array":
        return build_suffix_index(bases, digest, progress=True, device=device)
    return build_count_tables(bases, device, digest)


def text_chunk_numbers(catalog):
    """Each training chunk's number in the order the index concatenates them (tokenized_chunks: species, files,
    then place in the file): a SuffixIndex's text holds chunk i between chunk_ends[i - 1] and chunk_ends[i]."""
    species = {name: i for i, name in enumerate(catalog.species)}
    files = {(name, label): i for name, pairs in catalog.files.items() for i, (_, label) in enumerate(pairs)}
    order = sorted(catalog.train_chunks, key=lambda c: (species[c.key[0]], files[c.key[0], c.key[1]], c.key[2:]))
    return {chunk.key: i for i, chunk in enumerate(order)}


def chunk_digest(bases):
    """A chunk's identity by its bases (uint8 codes 0..3, its tokens' bases): the same wherever the file lies."""
    return hashlib.blake2b(np.ascontiguousarray(bases, dtype=np.uint8).tobytes(), digest_size=16).digest()


def build_count_tables(bases, device, digest):
    """Count the training chunks' (context, next 6-mer) strings on both strands (bases: each chunk's 2-bit codes).

    One sort serves every context length: each position's longest key is sorted once (see longest_keys); a shorter
    key is its top bits, so that order sorts the shorter keys too, and each length's unique keys and cumulative
    counts are a filter, a shift and the starts of the runs of equal keys.
    """
    lengths = [len(b) for b in bases]
    forward = torch.from_numpy(np.concatenate(bases)).to(device)
    reverse = 3 - forward.flip(0)  # the other strand, read 5' to 3': the chunks in reverse order
    packed = torch.cat([longest_keys(forward, lengths, INDEX_KEY_BASES),
                        longest_keys(reverse, lengths[::-1], INDEX_KEY_BASES)])
    del forward, reverse
    keys, cumulative = key_tables(packed)
    return RetrievalIndex(keys, cumulative, digest)


def build_suffix_index(bases, digest, progress=False, device=None):
    """SuffixIndex of the chunks (a list of arrays of 2-bit base codes, emptied here), built on the host a group of
    positions at a time, each group's keys made and sorted on `device` when it holds the 2-bit text and one group
    (at crop scale a few host cores take most of an hour over them), else on the host. The index is returned on
    the host.

    Each position's key is its next 30 bases with those past its chunk's end set to A, and its distance to that end
    (at most 30); (key, distance) order is the suffix order SuffixIndex describes. Positions are taken in
    SUFFIX_GROUPS groups by their key's first 3 bases, and each group is sorted apart and written to its rows, so
    that the build holds the text, the array and one group: about 16 bytes a base at its peak on the host, with the
    process's own memory (SUFFIX_INDEX_BUILD_BYTES_PER_BASE)."""
    from tqdm import tqdm
    lengths = np.array([len(b) for b in bases], dtype=np.int64)
    text = np.concatenate(bases) if bases else np.zeros(0, dtype=np.uint8)
    bases.clear()  # the chunks are in text now: at crop scale each copy is gigabytes
    n = len(text)
    if n >= 1 << 40:
        raise ConfigError(f"index_layout = suffix_array holds positions in 40 bits: {n:,} bases of training chunks "
                          f"are too many")
    ends = np.cumsum(lengths)
    words = np.zeros((n + 2 * 32 - 1) // 32, dtype=np.uint64)  # one word past the last base's word
    for i in range(32):
        column = np.zeros(len(words), dtype=np.uint64)
        column[:len(text[i::32])] = text[i::32]
        words |= column << np.uint64(62 - 2 * i)
    block_bits = int(np.log2(max(int(lengths.min()) if n else 1, 1)))  # then a block holds at most one chunk end
    block_starts = np.arange((n >> block_bits) + 2, dtype=np.int64) << block_bits
    block_ends = np.append(ends, n)[np.searchsorted(ends, block_starts, side="right")]  # first end past its start
    index = SuffixIndex(torch.from_numpy(words.view(np.int64)), torch.zeros(n, dtype=torch.int32),
                        torch.zeros(n, dtype=torch.uint8), torch.from_numpy(block_ends.astype(np.int64)), block_bits,
                        digest)
    group = np.zeros(n, dtype=np.uint8)  # the first 3 bases, A past the chunk's end
    for i in range(3):
        group <<= 2
        group[:n - i] |= text[i:]
    for gap in (1, 2):  # the last 2 positions of each chunk: bases of the next chunk set to A
        at = ends[lengths >= gap] - gap
        group[at] &= np.uint8(0x3F ^ ((1 << 2 * (3 - gap)) - 1))
    del text
    device = suffix_sort_device(device, (index.text.numel() + index.block_ends.numel()) * 8 + group.nbytes
                                + min(group.nbytes, GROUP_SCAN_SLICE),
                                int(np.bincount(group, minlength=SUFFIX_GROUPS).max()))
    sorter = SuffixIndex(index.text.to(device), index.sa_low[:0], index.sa_high[:0], index.block_ends.to(device),
                         block_bits, digest)  # the text and block ends that suffix_keys reads, where it sorts
    # the 64 scans for each group's positions, there too: on the host they were the build's largest cost at crop scale
    scanned = group if device.type == "cpu" else torch.from_numpy(group).to(device)
    row = 0
    for code in tqdm(range(SUFFIX_GROUPS), desc=f"suffix array ({device.type})", unit="group", disable=not progress):
        positions = group_positions(scanned, code)
        keys, left = suffix_keys(sorter, positions)
        keys &= top_bases_mask(left)
        # within a group the first 3 bases are equal: the other 54 bits of the key and 5 of distance make one key
        # stable: equal 30-base suffixes keep their text order, so a GPU build and a host build give the same rows
        order = torch.argsort(((keys & ((1 << 54) - 1)) << 5) | left, stable=True)
        positions = positions[order]  # split into the array's 5 bytes where sorted: 5 bytes a row, not 8, cross over
        index.sa_low[row:row + len(positions)] = (positions & 0xFFFFFFFF).to(torch.int32).cpu()
        index.sa_high[row:row + len(positions)] = (positions >> 32).to(torch.uint8).cpu()
        row += len(positions)
    return index


def group_positions(group, code):
    """The positions whose group (first 3 bases) is `code`, in order, as int64 where `group` lies: a host array (numpy
    scans it about 3 times as fast as torch on a CPU) or a tensor on the sorting GPU, scanned GROUP_SCAN_SLICE
    positions at a time (CUDA's nonzero takes at most 2**31 - 1 elements before torch 2.6; a slice's mask is
    what the scan holds)."""
    if isinstance(group, np.ndarray):
        return torch.from_numpy(np.flatnonzero(group == code))
    slices = [torch.nonzero(group[start:start + GROUP_SCAN_SLICE] == code).flatten() + start
              for start in range(0, len(group), GROUP_SCAN_SLICE)]
    return torch.cat(slices) if slices else torch.zeros(0, dtype=torch.int64, device=group.device)


GROUP_SCAN_SLICE = 1 << 30  # positions a group scan on the GPU compares at once
SUFFIX_SORT_BYTES_PER_POSITION = 96  # a group's positions, keys, distances and order on the device, with temporaries
# (suffix_keys' temporaries measured at about 88 bytes a position with the positions, on the CPU)


def suffix_sort_device(device, resident_bytes, largest_group):
    """Where build_suffix_index scans and sorts its groups: `device` when it is a GPU with room for what the build
    keeps there (resident_bytes: the text, block ends, each position's group and a scan slice's mask) and the
    largest group, else the host (a small or busy card)."""
    if device is None or device.type != "cuda":
        return torch.device("cpu")
    needs = resident_bytes + largest_group * SUFFIX_SORT_BYTES_PER_POSITION
    return device if needs < free_device_bytes(device) else torch.device("cpu")


SUFFIX_GROUPS = 64  # the build's groups of positions: by their first 3 bases


def key_tables(packed):
    """longest_keys of both strands -> per context length, (sorted unique keys, cumulative counts). Consumes packed."""
    n_bases = INDEX_KEY_BASES
    if packed.device.type == "cpu":
        packed.numpy().sort()  # in place and without an index tensor: several times torch.sort's speed on a CPU
    else:
        packed = torch.sort(packed).values
    keys, cumulative = [], []
    for fits, n in enumerate(n_bases, 1):
        shift = 2 + 2 * (max(n_bases) - n)
        if fits == 1:  # every position kept fits the shortest length
            strings = packed >> shift
        else:
            strings = packed[(packed & 3) >= fits]
            strings >>= shift
        new = torch.ones(len(strings), dtype=torch.bool, device=strings.device)
        new[1:] = strings[1:] != strings[:-1]
        starts = new.nonzero().flatten()  # a run's start in the sorted order = the count of the strings before it
        keys.append(strings[starts].cpu())
        cumulative.append(torch.cat([starts, starts.new_tensor([len(strings)])]).cpu())
        del strings, new, starts
    return keys, cumulative


def token_bases(tokens):
    """6-mer ids -> their bases as 2-bit codes (uint8 0..3), in order."""
    shifts = 2 * np.arange(BASES_PER_TOKEN - 1, -1, -1)
    return ((tokens.astype(np.int64)[:, None] >> shifts) & 3).astype(np.uint8).reshape(-1)


def longest_keys(bases, lengths, n_bases):
    """Each position's key of its longest string (max(n_bases) bases, 2 bits a base, first base highest; bases past
    the array's end read as 0), shifted left 2 bits to hold how many of n_bases fit before its piece of `lengths`
    ends (1..3); positions where none fits are left out. A string never crosses a piece: where the longest would,
    only the shorter ones that fit are used, and they are the top bits of the key."""
    longest, n = max(n_bases), len(bases)
    padded = torch.cat([bases, bases.new_zeros(longest)]).long()
    key = torch.zeros(n, dtype=torch.int64, device=bases.device)
    for i in range(longest):  # in place and int64 | int64: no n-sized temporaries, no casts
        key <<= 2
        key |= padded[i:i + n]
    del padded
    fits = torch.full((n,), len(n_bases), dtype=torch.int64, device=bases.device)
    ends = torch.tensor(np.cumsum(lengths), dtype=torch.int64, device=bases.device)
    for d in range(longest - 1, 0, -1):  # d bases left in the piece; the nearest end is written last
        at = ends - d
        fits[at[at >= 0]] = sum(length <= d for length in n_bases)
    key <<= 2
    key |= fits
    return key[fits > 0]


def retrieval_index_path(folder, digest, layout):
    """Where the index (of index_layout `layout`) of the training chunks with this digest is cached: beside the
    checkpoints trained with it."""
    return os.path.join(folder, f"retrieval_index_{digest}{'' if layout == 'tables' else '.' + layout}.pt")


def save_retrieval_index(retrieval_index, path):
    if isinstance(retrieval_index, SuffixIndex):
        fields = {"layout": "suffix_array", "text": retrieval_index.text, "sa_low": retrieval_index.sa_low,
                  "sa_high": retrieval_index.sa_high, "block_ends": retrieval_index.block_ends,
                  "block_bits": retrieval_index.block_bits}
    else:
        fields = {"keys": retrieval_index.keys, "cumulative": retrieval_index.cumulative}
    write_atomically(path, {**fields, "digest": retrieval_index.digest,
                            "context_tokens": list(RETRIEVAL_CONTEXT_TOKENS)})


def load_retrieval_index(path, device, rank=0, ranks=1):
    """The cached index at `path` on `device`; of a suffix array, only rank's slice of `ranks` (the tables are held
    whole by every rank)."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if saved.get("context_tokens") != list(RETRIEVAL_CONTEXT_TOKENS):
        raise ConfigError(f"{path}: a retrieval index of other context lengths ({saved.get('context_tokens')}); "
                          f"delete it and it is rebuilt")
    if saved.get("layout") == "suffix_array":
        whole = SuffixIndex(saved["text"], saved["sa_low"], saved["sa_high"], saved["block_ends"],
                            saved["block_bits"], saved["digest"])
        return (whole.slice_for(rank, ranks) if ranks > 1 else whole).to(device)  # memory-mapped: reads its slice
    return RetrievalIndex(saved["keys"], saved["cumulative"], saved["digest"]).to(device)


# ----------------------------------------------------------------------------- model

def rotary_tables(n_positions, head_dim, device=None):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs of channels of x [B, H, T, D] by position: attention scores then depend on relative offsets."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def local_window_mask(q_index, kv_index, window):
    """Causal sliding window: query i sees keys j with i - window < j <= i, exactly `window` keys with itself."""
    offset = q_index - kv_index
    return (offset >= 0) & (offset < window)


def local_attention(q, k, v, window_bias):
    """Softmax attention of q over k, v [B, H, T, D] plus window_bias [T, T] (0 where a key is seen, -inf where
    not), written out. At 64 tokens a whole window's scores are one small tile: two batched matmuls and one fused
    softmax take 9 ms of a batch-4096 step where FlexAttention's 128-row tiles took 17 (BENCHMARKS.md), and the CPU
    and the GPU run this one path. The scores are rounded to the autocast dtype before the fp32 softmax, as in any
    unfused attention; q is scaled first, so that an fp16 score overflows only where the scaled score does."""
    scores = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float() + window_bias
    return scores.softmax(-1).type_as(v) @ v


class BucketAttention(nn.Module):
    """Local sliding-window self-attention plus global attention over the bucket memory.

    The memory's keys and values are projections of the bucket matrix (one row per 6-mer, a running average of
    the model's own hidden states over the last ~global_context tokens). The local and global outputs are each
    normalized over their own keys and summed with a learned per-head gate that starts at 0, so training starts
    as a plain local model and opens the memory path as it proves useful.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.global_memory == "buckets":
            self.memory_kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
            self.memory_gate = nn.Parameter(torch.zeros(cfg.n_heads))

    def forward(self, x, rotary, window_bias, memory):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rotary
        y = local_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, window_bias)
        if memory is not None:
            # every query of the batch attends to the same 4096 memory rows: fold the batch into the sequence axis
            memory_k, memory_v = self.memory_kv(memory).view(-1, 2, self.n_heads, self.head_dim).permute(1, 2, 0, 3)
            global_q = q.transpose(0, 1).reshape(1, self.n_heads, B * T, self.head_dim)
            global_y = F.scaled_dot_product_attention(global_q, memory_k[None], memory_v[None])
            global_y = global_y.view(self.n_heads, B, T, self.head_dim).transpose(0, 1)
            y = y + self.memory_gate.view(1, -1, 1, 1).to(y.dtype) * global_y
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # GPT-2's tanh GELU: 2 ms of a 105 ms batch-4096 step less than the exact erf one
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = BucketAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, rotary, window_bias, memory):
        x = x + self.attn(self.ln_attn(x), rotary, window_bias, memory)
        return x + self.mlp(self.ln_mlp(x))


def token_base_shifts(device):
    """The shifts that read a 6-mer id's bases, first base highest (tokens[..., None] >> shifts & 3)."""
    return 2 * torch.arange(BASES_PER_TOKEN - 1, -1, -1, device=device)


def slot_features(tokens, bases, age):
    """Each homolog slot's features [B, T, S, NEIGHBOUR_FEATURES] (bool) for input tokens [B, T] and
    SuffixIndex.neighbours' bases and age: its 12 bases one-hot (none as a fifth letter), which of its 6 bases at
    the input token agree with the token's own (is the homolog still in step), and its age (none, 0, 1, ..., 6+)."""
    own = (tokens[..., None, None] >> token_base_shifts(tokens.device)) & 3  # [B, T, 1, 6]
    letters = torch.arange(5, device=tokens.device)  # comparisons, not F.one_hot, which checks its input on the host
    ages = torch.arange(-1, NEIGHBOUR_AGES - 1, device=tokens.device)
    return torch.cat([(bases[..., None] == letters).flatten(-2), bases[..., :BASES_PER_TOKEN] == own,
                      age.clamp_max(NEIGHBOUR_AGES - 2)[..., None] == ages], -1)


def prefix_log_probs(logits, targets, target_bases):
    """log p(the target's first j bases) [B, T, len(target_bases)] under the logits [B, T, 4096], for each j in
    target_bases (1..6; -100 targets read as 0). A 6-mer id is its bases in base 4, first base highest, so the
    6-mers that begin with j given bases are a run of 4^(6 - j) ids, and a prefix's probability is a logsumexp
    over that run: the per-base likelihood marginalizes the 6-mer prediction within the token."""
    logits = logits.float()
    if tuple(target_bases) == (BASES_PER_TOKEN,):  # training: the whole 6-mer, through the fused cross-entropy
        return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")[..., None]
    # runs[i]: the unnormalized probabilities summed over the runs of 4^i ids, [B, T, 4^(6 - i)], each from the last
    # in groups of 4; scaled by the largest logit's exp, which cancels in the ratio (one exp pass, no overflow), in
    # fp64 so that no 6-mer less likely than the largest by e^87 underflows to a log of -inf
    logits = logits.double()
    runs = [(logits - logits.amax(-1, keepdim=True)).exp()]
    for _ in range(BASES_PER_TOKEN):
        runs.append(runs[-1].unflatten(-1, (-1, 4)).sum(-1))
    normalizer, targets = runs[-1][..., 0].log(), targets.clamp_min(0)
    return torch.stack([runs[BASES_PER_TOKEN - j].gather(-1, (targets >> 2 * (BASES_PER_TOKEN - j))[..., None])[..., 0]
                        for j in target_bases], -1).log() - normalizer[..., None]


class PlantLM(nn.Module):
    """Causal next-6-mer model: token + species embeddings, rotary local attention, and a global memory.

    global_memory = retrieval: the final distribution over the next 6-mer is the LM's, smoothed toward what the
    training genomes say follows the same 12, 18 and 24 bases (RetrievalIndex counts, given to forward). With
    retrieval_mixing = dirichlet, each context length in turn, shortest first, takes the estimate so far as the prior
    of a Dirichlet over the next 6-mer: p <- (count(context, x) + a p(x)) / (count(context) + a), the concentration a
    read from the final hidden state per position and context length. With gate, p <- (1 - g) p + g count(context,
    x) / count(context) for the longest context that occurs, g a learned gate of the hidden state (as kNN-LM).
    global_memory = neighbours: the same smoothing by counts, and each position reads the homologs that
    SuffixIndex.neighbours found for it, their bases aligned to the input token and to the target: added to its input
    (neighbour_input, a cross-attention whose alignment the index gives), and as experts that copy them through
    substitutions, mixed into the output (copied_log_probs).
    global_memory = buckets: a learned memory of 4096 rows, one per 6-mer, that the attention reads in every layer
    (BucketAttention); it gained nothing measurable over none and stays selectable.
    """

    def __init__(self, cfg, n_species):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.species_embedding = nn.Embedding(n_species, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB_SIZE, bias=False)
        self.head.weight = self.token_embedding.weight  # tied, as in GPT-2
        cos, sin = rotary_tables(cfg.context_size, cfg.d_model // cfg.n_heads)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        # The bucket memory: row b is the running mean of final hidden states at tokens with id b; its weight is
        # the decayed count of those observations. Both are state, not parameters: saved, never trained.
        self.register_buffer("bucket_memory", torch.zeros(cfg.n_buckets, cfg.d_model))
        self.register_buffer("bucket_weight", torch.zeros(cfg.n_buckets))
        if cfg.retrieves:  # per position, one value per context length (see mixed_log_probs)
            self.retrieval_head = nn.Linear(cfg.d_model, len(RETRIEVAL_CONTEXT_TOKENS))
        if cfg.global_memory == "neighbours":
            self.neighbour_features = nn.Linear(NEIGHBOUR_FEATURES, cfg.d_model)
            self.neighbour_copy = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            # per slot, from its features and the final hidden state: its weight in the mixture, its substitution rate
            self.copy_head = nn.Linear(NEIGHBOUR_FEATURES, 2)
            self.copy_from_hidden = nn.Linear(cfg.d_model, 2, bias=False)
        self._window_biases = {}
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.retrieves:  # start from one pseudo-count per context (dirichlet), or g = 0.12 (gate)
            nn.init.zeros_(self.retrieval_head.weight)
            nn.init.constant_(self.retrieval_head.bias, 0.0 if cfg.retrieval_mixing == "dirichlet" else -2.0)
        if cfg.global_memory == "neighbours":  # each slot starts at weight e^-4 against the model's 1, rate 0.12
            nn.init.zeros_(self.copy_head.weight)
            nn.init.zeros_(self.copy_from_hidden.weight)
            with torch.no_grad():
                self.copy_head.bias.copy_(torch.tensor([-4.0, -2.0]))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def window_bias(self, T, device):
        """local_attention's [T, T] bias, built once per (length, device) and shared by every layer."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one entry, as forward asks
            device = torch.device("cuda", torch.cuda.current_device())
        key = (T, str(device))
        if key not in self._window_biases:
            positions = torch.arange(T, device=device)
            seen = local_window_mask(positions[:, None], positions[None, :], self.cfg.local_attn_window)
            self._window_biases[key] = torch.zeros(T, T, device=device).masked_fill(~seen, -math.inf)
        return self._window_biases[key]

    def forward(self, tokens, species, targets=None, retrieval=None, neighbours=None, reduction="mean"):
        """Logits [B, T, V] and the final hidden states; with targets, the fp32 cross-entropy in nats (the mean over
        targets that are not -100, or per target with reduction='none') in place of the logits. `retrieval` is
        RetrievalIndex.counts for the targets, required with targets and global_memory = retrieval or neighbours;
        `neighbours` is SuffixIndex.neighbours for them, required with global_memory = neighbours."""
        B, T = tokens.shape
        x = self.token_embedding(tokens) + self.species_embedding(species)[:, None, :]
        if self.cfg.global_memory == "neighbours":  # one set of slot features for the input and the experts
            bases, features = neighbours[0], slot_features(tokens, *neighbours)
            x = x + self.neighbour_input(bases, features)
        x = self.dropout(x)
        rotary = (self.rotary_cos[:T], self.rotary_sin[:T])
        window_bias = self.window_bias(T, tokens.device)
        memory = self.memory_rows() if self.cfg.global_memory == "buckets" else None
        for block in self.blocks:
            x = block(x, rotary, window_bias, memory)
        hidden = self.ln_final(x)
        logits = self.head(hidden)
        if targets is None:
            return logits, hidden.detach()
        log_p = prefix_log_probs(logits, targets, (BASES_PER_TOKEN,))
        if self.cfg.retrieves:
            log_p = self.mixed_log_probs(log_p, hidden, retrieval)
        if self.cfg.global_memory == "neighbours":
            log_p = self.copied_log_probs(log_p, hidden, targets, (BASES_PER_TOKEN,), bases, features)
        nats = torch.where(targets != -100, -log_p[..., 0], 0.0)
        if reduction == "none":
            return nats, hidden.detach()
        return nats.sum() / (targets != -100).sum().clamp_min(1), hidden.detach()

    def neighbour_input(self, bases, features):
        """What the homologs add to each position's input, summed over the slots (bases [B, T, S, 12] of
        SuffixIndex.neighbours, and their slot_features): the features through one linear map, and the token
        embedding of their 6 bases at the target through another, because the tied output head then scores that
        6-mer up, so that copying the homolog is one step for the model."""
        target = bases[..., BASES_PER_TOKEN:]
        copied = self.token_embedding((target.clamp_max(3) << token_base_shifts(bases.device)).sum(-1))
        copied = copied * (target < 4).all(-1, keepdim=True)
        return (self.neighbour_features(features.to(copied.dtype)) + self.neighbour_copy(copied)).sum(2)

    def copied_log_probs(self, log_p, hidden, targets, target_bases, bases, features):
        """log_p [B, T, P] of the targets' first j bases (j in target_bases) mixed with one expert per homolog slot
        that copies the slot's bases at the target, each base kept with probability 1 - r and changed to each other
        base with r / 3: q(first j bases) = prod over them of (1 - r if the slot's base is the target's, else r / 3).
        Each q sums to 1 over the 6-mers and over each base given the ones before, so the mixture scores base by
        base exactly as the 6-mer does. The weights (a softmax over the model and the slots that have a homolog)
        and each r come from the slot's features (slot_features) and the final hidden state: copy_head,
        copy_from_hidden."""
        # fp32 after the maps, as mixed_log_probs: under autocast a Linear returns bf16, whose sigmoid rounds to 1
        values = (self.copy_head(features.to(hidden.dtype)) +
                  self.copy_from_hidden(hidden)[:, :, None, :]).float()  # [B, T, S, 2]
        copied = bases[..., BASES_PER_TOKEN:]
        present = (copied < 4).all(-1)
        wanted = (targets.clamp_min(0)[..., None] >> token_base_shifts(targets.device)) & 3  # [B, T, 6]
        rate = values[..., 1:]  # the substitution rate r = sigmoid(rate): log(1 - r) and log(r / 3) without rounding
        per_base = torch.where(copied == wanted[:, :, None, :], F.logsigmoid(-rate), F.logsigmoid(rate) - math.log(3))
        cumulative = per_base.cumsum(-1)
        q = torch.stack([cumulative[..., j - 1] for j in target_bases], -1)  # [B, T, S, P]
        weights = torch.cat([torch.zeros_like(values[..., :1, 0]),
                             torch.where(present, values[..., 0], -math.inf)], -1).log_softmax(-1)  # [B, T, 1 + S]
        return torch.logsumexp(torch.cat([log_p[:, :, None], q], 2) + weights[..., None], 2)

    def mixed_log_probs(self, log_p, hidden, retrieval):
        """The LM's log-probabilities of the targets' first j bases, log_p [B, T, P] (prefix_log_probs), smoothed by
        the retrieved counts (class docstring); retrieval [B, T, O, 1 + P] is RetrievalIndex.counts with
        target_bases (0, j...). Every smoothing step is linear in p, so a prefix's probability (a sum over the
        6-mers that begin with it) is smoothed by the counts of the same prefix: each step is a scalar per position
        and prefix, and the 4096-way distribution is never built. Where a context never occurs, its step leaves p
        as it was."""
        values = self.retrieval_head(hidden).float()  # [B, T, context lengths]
        in_context, with_prefix = retrieval[..., 0], retrieval[..., 1:]
        if self.cfg.retrieval_mixing == "dirichlet":
            for i in range(values.shape[-1]):
                log_p = torch.logaddexp(with_prefix[..., i, :].log(), values[..., i, None] + log_p) - \
                    torch.logaddexp(in_context[..., i, None].log(), values[..., i, None])
        else:
            lengths = torch.arange(1, values.shape[-1] + 1, device=values.device)
            longest = ((in_context > 0) * lengths).amax(-1, keepdim=True)  # 0 where no context occurs
            pick = (longest - 1).clamp_min(0)
            gate = values.gather(-1, pick)
            frequency = with_prefix.gather(2, pick[..., None].expand(-1, -1, 1, log_p.shape[-1])).squeeze(2).log() - \
                in_context.gather(-1, pick).clamp_min(1).log()
            mixed = torch.logaddexp(F.logsigmoid(-gate) + log_p, F.logsigmoid(gate) + frequency)
            log_p = torch.where(longest > 0, mixed, log_p)
        return log_p

    def memory_rows(self):
        """The bucket memory as attention reads it: every row scaled to unit RMS (an empty row stays zero).

        The stored rows are running means, which shrink as disagreeing observations average out; scaling them when
        they are read keeps the keys' scale steady at every step, where a periodic renormalization made it jump.
        """
        rms = self.bucket_memory.pow(2).mean(dim=1, keepdim=True).sqrt()
        return self.bucket_memory / torch.where(rms > 0, rms, torch.ones_like(rms))

    @torch.no_grad()
    def bucket_observations(self, tokens, hidden):
        """Per-bucket sums of hidden states and counts for one micro-batch: [n_buckets, d_model + 1] fp32."""
        flat = tokens.reshape(-1)
        stats = torch.zeros(self.cfg.n_buckets, self.cfg.d_model + 1, device=hidden.device)
        stats[:, :-1].index_add_(0, flat, hidden.reshape(-1, hidden.shape[-1]).float())
        stats[:, -1].index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        return stats

    @torch.no_grad()
    def update_bucket_memory(self, observations):
        """Fold one optimizer step's observations (summed over micro-batches and ranks) into the memory.

        With n tokens observed this step and decay = exp(-n / global_context):
            weight_b <- decay * weight_b + count_b
            memory_b <- memory_b + (sum_b - count_b * memory_b) / weight_b     (rows with count_b > 0)
        i.e. memory_b is the mean of its observations, each weighted by exp(-tokens seen since / global_context):
        an observation counts 1/e as much as a new one after global_context tokens.
        """
        sums, counts = observations[:, :-1], observations[:, -1]
        decay = torch.exp(-counts.sum() / self.cfg.global_context)
        self.bucket_weight.mul_(decay).add_(counts)
        rate = torch.where(counts > 0, 1.0 / self.bucket_weight.clamp_min(1e-30), torch.zeros_like(counts))
        self.bucket_memory.add_((sums - counts[:, None] * self.bucket_memory) * rate[:, None])

    def flops_per_step(self, n_tokens, batch_forwards):
        """Real training FLOPs for n_tokens in batch_forwards forward calls: backward costs 2x forward, except for
        the memory projection, whose input needs no gradient."""
        cfg = self.cfg
        d, L, T, W = cfg.d_model, cfg.n_layers, cfg.context_size, cfg.local_attn_window
        keys_per_query = sum(min(i + 1, W) for i in range(T)) / T
        per_token = L * (24 * d * d + 4 * keys_per_query * d) + 2 * d * VOCAB_SIZE
        per_forward = 0
        if cfg.global_memory == "buckets":
            per_token += L * 4 * cfg.n_buckets * d
            per_forward = L * 2 * cfg.n_buckets * d * 2 * d
        if cfg.global_memory == "neighbours":  # neighbour_input's two maps, per slot
            per_token += NEIGHBOUR_SLOTS * 2 * (NEIGHBOUR_FEATURES + d) * d
        # the memory's key/value projection reads a buffer: its backward is the weight gradient only (1x, not 2x)
        return 3 * per_token * n_tokens + 2 * per_forward * batch_forwards


# ----------------------------------------------------------------------------- training

NATS_PER_TOKEN_TO_BITS_PER_BASE = 1 / (BASES_PER_TOKEN * math.log(2))  # a loss in nats per 6-mer -> bits per base


def train(cfg, build_model=None, started=None):
    """Train on cfg.data_dir under torchrun (or as one plain process); returns the last validation loss. max_minutes
    counts from run.sh's start, else from `started` (main passes the process's start), else from now."""
    cfg.check()
    clock = Clock(cfg, invocation_start(time.time() if started is None else started))
    rt = setup_distributed()
    log = RunLog(cfg, rt)
    try:
        run = start_run(cfg, rt, log, build_model, clock)
        batches = loader_steps(iter(run.loader))  # iter() now: it draws the workers' seed from the global RNG
        if run.saved_rng is not None:  # after iter(loader), which draws its base seed from the global torch RNG
            restore_rng_states(run.saved_rng, rt.device)
        clock.start_steps(run)
        meter, bar, due, result = LogMeter(run), None, clock.poll(run), None
        # the stops: every epoch (or max_steps) trained; max_minutes; validation no longer improving
        while run.step < run.total_steps and not due.out_of_time and not validation_stalled(run):
            bar = bar or epoch_progress_bar(run)
            with clock.waiting_for_data():
                step_tokens, step_species, step_repeat, step_chunks = next(batches)
            result = train_step(run.learner, step_tokens, step_species, step_repeat,
                                lr_at(run.step, cfg, run.total_steps), step_chunks)
            run.step += 1
            meter.add(result)
            bar.update(1)
            if run.step % cfg.log_every == 0:
                record = write_log_line(run, meter, result)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}")
                meter = LogMeter(run)
                if record["bad_step_streak"] >= cfg.max_bad_steps:  # non-finite steps in a row: the run diverged
                    raise bad_steps_stop(run, record["bad_step_streak"])
            due = clock.poll(run)  # what the wall clock asks for now, agreed by every rank
            if due.validation:  # by the clock (or eval_every), not at epoch ends: a small data set's epochs are seconds
                score_validation(run)
            epoch_done = run.step % run.per_epoch == 0
            if epoch_done:
                save_epoch_checkpoint(run)
            elif due.checkpoint:
                save_run(run, "model_latest.pt")
            if epoch_done:
                bar.close()
                bar = None
        if bar is not None:
            bar.close()
        if due.out_of_time:
            log.info(out_of_time_line(cfg, run.step, clock.deadline - time.time(), clock.finish_estimate(run)))
        elif (why := validation_stalled(run)) and run.step > clock.first_step:
            log.info(f"early stop at step {run.step}: {why}")
        stop_loader(run, batches)
        finish_run(run, meter, result)
    finally:
        log.close()
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return run.val_loss


def out_of_time_line(cfg, step, seconds_left, seconds_to_finish):
    """The log line of a run that max_minutes stops, honest about a budget too small for its last validation and
    save (start-up and one validation on a CPU can outlast a few minutes)."""
    line = f"max_minutes = {cfg.max_minutes} reached at step {step}: stopping"
    if seconds_to_finish <= seconds_left:
        return f"{line} with time left for the last validation and checkpoint"
    return (f"{line}; the last validation and checkpoint (about {seconds_to_finish:.0f} s) will run about "
            f"{seconds_to_finish - max(seconds_left, 0):.0f} s past it: the budget holds less than start-up and one "
            f"validation (a smaller --eval_windows, now {cfg.eval_windows}, validates faster)")


def stop_loader(run, batches):
    """Shut the loader's workers down now, while the interpreter runs. Left to the interpreter's exit they are
    joined one after another with a 5 s timeout each: on an H200 the process then ended 20 s after its closing lines,
    outside max_minutes."""
    batches.close()
    run.loader = None  # persistent workers: the DataLoader holds the last reference to its iterator


def finish_run(run, meter, result):
    """The run's last log line (result: the last step's), validation and model_latest.pt (each unless this step
    already had it, or no step was taken), then the closing lines: the best checkpoint beside the last figure, and
    where the wall time went."""
    if run.step > run.clock.first_step:  # else resumed at its end, or out of time before a step: nothing new to keep
        if meter.steps:
            record = write_log_line(run, meter, result)
            if record["bad_step_streak"] >= run.cfg.max_bad_steps:
                raise bad_steps_stop(run, record["bad_step_streak"])
        validating = run.validated_at != run.step
        if validating:
            score_validation(run)
        if validating or run.saved_at != run.step:  # a save made before the last validation lacks its best and count
            save_run(run, "model_latest.pt")
    for line in closing_lines(run):
        run.log.info(line)
    split, wall = run.clock.split(), run.clock.elapsed()
    run.log.metrics({"step": run.step, "wall_s": wall, "time_split_s": split,
                     "tokens_per_wall_s": run.clock.tokens / max(wall, 1e-9),
                     "tokens_per_step_s": run.clock.tokens / max(split["steps"], 1e-9)})


def validation_stalled(run):
    """Why validation says stop ('' while it does not): early_stop_evals validations in a row without a new best, or
    the last one more than early_stop_rise bits/base above the best."""
    cfg = run.cfg
    if cfg.early_stop_evals and run.evals_since_best >= cfg.early_stop_evals:
        return (f"{run.evals_since_best} validations in a row without a new best (early_stop_evals = "
                f"{cfg.early_stop_evals})")
    if cfg.early_stop_rise and run.bits_above_best > cfg.early_stop_rise:
        return (f"validation {run.bits_above_best:.4f} bits/base above its best (early_stop_rise = "
                f"{cfg.early_stop_rise})")
    return ""


def bad_steps_stop(run, streak):
    latest = find_latest_checkpoint(run.cfg.checkpoint_dir, run.log.info)
    return TrainingStopped(f"{streak} consecutive non-finite steps up to step {run.step} (Config.max_bad_steps = "
                           f"{run.cfg.max_bad_steps}); last good checkpoint: {latest or 'none'}. Lower "
                           f"learning_rate, or use bf16 or fp32.")


@dataclass
class Run:
    """One training invocation: what the loop reads and advances."""
    cfg: Config
    rt: "Runtime"
    log: "RunLog"
    catalog: GenomeCatalog
    learner: "Learner"
    val_tokens: torch.Tensor
    val_species: torch.Tensor
    val_repeat: torch.Tensor  # the validation tokens' repeat flags
    per_epoch: int
    total_steps: int
    loader: DataLoader = None
    step: int = 0  # optimizer steps taken, over all invocations of this run
    best_val: float = math.inf
    val_loss: float = math.nan  # nan until this invocation validates
    saved_rng: list = None  # this rank's RNG states from the checkpoint, when the data order replays exactly
    resumed_from: str = None
    clock: "Clock" = None
    best_step: int = None  # the step of model_best.pt's validation
    evals_since_best: int = 0  # validations since the best one: early_stop_evals' count
    bits_above_best: float = 0.0  # the last validation's bits/base minus the best's: early_stop_rise's measure
    validated_at: int = None  # steps of this invocation's last validation and last save
    saved_at: int = None


def start_run(cfg, rt, log, build_model, clock):
    """Everything before the first step: seeds, the genome scan, the model, resume, the start-up report, the loader."""
    warn = log.info
    torch.manual_seed(cfg.seed + rt.rank)
    random.seed(cfg.seed + rt.rank)
    np.random.seed(cfg.seed + rt.rank)
    if rt.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        warn(f"no GPU found: training on the CPU with {rt.world_size} process(es) (gloo). This is slow; the progress "
             f"bar's ETA is the real estimate. Use a smaller model (--d_model=128 --n_layers=2) to try things out.")
    cache_dir = os.path.join(cfg.checkpoint_dir, "data_cache")
    catalog = scan_genomes(cfg, warn=warn, progress=log.progress, cache_dir=cache_dir)
    val_tokens, val_species, val_repeat = cached_validation(catalog, cfg, cache_dir, warn)
    if not len(val_tokens):
        warn(f"warning: no validation windows: a species whose sequence fits in one chunk (chunk_size = "
             f"{cfg.chunk_size:,} bases) keeps that chunk for training. Validation and model_best.pt are skipped; "
             f"a smaller --chunk_size holds some sequence out.")
    per_epoch = steps_per_epoch(catalog, cfg, rt.world_size)
    total_steps = per_epoch * cfg.n_epochs if not cfg.max_steps else min(cfg.max_steps, per_epoch * cfg.n_epochs)
    run = Run(cfg, rt, log, catalog, build_learner(cfg, rt, len(catalog.species), build_model), val_tokens, val_species,
              val_repeat, per_epoch, total_steps, clock=clock)
    if rt.is_main:  # before the index's disk check: an interrupted index save leaves gigabytes
        for leftover in remove_stale_temporaries(cfg.checkpoint_dir):
            warn(f"removed {leftover}: the temporary file of a save that was interrupted")
    if cfg.retrieves:
        run.learner.retrieval_index = with_compiled_lookups(load_or_build_retrieval_index(catalog, cfg, rt, warn),
                                                            cfg, rt.device)
    resume(run)
    report_start(run)
    log.start_wandb(cfg)
    stream = GenomeStream(catalog, cfg, rt.rank, rt.world_size, per_epoch, start_step=run.step)
    run.loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=rt.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                            prefetch_factor=4 if cfg.num_workers else None)
    return run


def with_compiled_lookups(index, cfg, device):
    """The index, its suffix array's searches compiled where the model is compiled (cfg.compile on CUDA)."""
    if cfg.compile and device.type == "cuda" and isinstance(index, SuffixIndex):
        index.compile_lookups()
    return index


def resume(run):
    """Continue from the checkpoint resume_path picks, if any: weights, optimizer, scaler, step, RNG states."""
    cfg, rt, learner = run.cfg, run.rt, run.learner
    path = resume_path(cfg, run.log.info)
    if not path:
        return
    ckpt = load_checkpoint(path)
    check_compatible(ckpt["config"], cfg, ckpt["species"], run.catalog.species, path, warn=run.log.info)
    learner.model.load_state_dict(ckpt["model_state_dict"])
    learner.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    for group in learner.optimizer.param_groups:  # a graphed run saved True, which AdamW on a CPU refuses;
        group["capturable"] = False                # StepGraph.capture sets it again where it captures
    learner.scaler.load_state_dict(ckpt["scaler_state_dict"])
    run.step, run.best_val, run.resumed_from = ckpt["step"], ckpt["best_val_loss"], path
    run.best_step, run.evals_since_best = ckpt.get("best_step"), ckpt.get("evals_since_best", 0)
    run.bits_above_best = ckpt.get("bits_above_best", 0.0)
    saved_workers = ckpt["config"].get("num_workers")
    if (ckpt["steps_per_epoch"], ckpt["world_size"], saved_workers) != (run.per_epoch, rt.world_size, cfg.num_workers):
        # Each rank's DataLoader workers own disjoint shards of the chunks, so any of the three reorders the data.
        run.log.info(f"warning: {path} was written with {ckpt['world_size']} rank(s), {saved_workers} DataLoader "
                     f"worker(s) per rank and {ckpt['steps_per_epoch']} steps/epoch, now {rt.world_size} rank(s), "
                     f"{cfg.num_workers} worker(s) and {run.per_epoch} steps/epoch: the data order will not replay "
                     f"exactly")
    elif rt.rank < len(ckpt["rng_states"]):
        run.saved_rng = ckpt["rng_states"][rt.rank]
    run.log.info(f"resumed from {path} at step {run.step}")
    saved_index, index_now = ckpt.get("retrieval_index"), learner.retrieval_index and learner.retrieval_index.digest
    if saved_index and saved_index != index_now:
        run.log.info(f"warning: {path} was trained with retrieval index {saved_index}; the training chunks or genome "
                     f"files have changed since, and training goes on with index {index_now}")
    if run.step >= run.total_steps:
        run.log.info(f"nothing to train: {path} is at step {run.step} of this run's {run.total_steps}; to train "
                     f"further raise --max_steps or --n_epochs and add --resume_with_new_settings=true, or start "
                     f"fresh with --resume=none")
    elif validation_stalled(run):
        run.log.info(f"nothing to train: {path} stopped early at step {run.step}: {validation_stalled(run)}; to train "
                     f"further raise --early_stop_evals or --early_stop_rise (0 = never stop early), or start fresh "
                     f"with --resume=none")


def report_start(run):
    """The start-up lines: Config, versions, the species table, the model, the batch, and the disk checkpoints use."""
    cfg, rt, info = run.cfg, run.rt, run.log.info
    n_params = sum(p.numel() for p in run.learner.model.parameters())
    effective = cfg.batch_size * cfg.accumulation_steps * rt.world_size
    info(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    info(f"versions: {json.dumps(versions(rt.device))}")
    info(data_summary(run.catalog, cfg))
    info(f"model: {n_params:,} parameters ({n_params / 1e6:.1f}M), precision "
         f"{run.learner.autocast_dtype or torch.float32}{', compiled' if run.learner.compiled is not run.learner.model else ''}")
    info(f"effective batch: {cfg.batch_size} x {cfg.accumulation_steps} accumulation x {rt.world_size} rank(s) = "
         f"{effective} windows = {effective * cfg.context_size:,} tokens per optimizer step; {run.per_epoch} steps "
         f"per epoch, {run.total_steps} steps in all; {len(run.val_tokens)} validation windows")
    if rt.is_main:
        info(checkpoint_disk_report(run))


# ----------------------------------------------------------------------------- training: one optimizer step

@dataclass
class Learner:
    """The model and everything one optimizer step touches.

    Three handles, one set of weights: `model` is the bare module (checkpoints hold its state_dict, the bucket memory
    lives on it); `compiled` is what forward passes run (torch.compile of `model` on CUDA, else `model` itself);
    `wrapped` is `compiled` inside DDP when there are several ranks. Validation runs `compiled`, not the DDP wrapper,
    so that a rank with fewer validation rows joins no collective but the final sum.
    """
    cfg: Config
    rt: "Runtime"
    model: nn.Module
    compiled: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype
    fixed_scale: float  # None with fp16 (the loss scale moves); 1.0 otherwise
    retrieval_index: "RetrievalIndex" = None  # with global_memory = retrieval (or a SuffixIndex), or neighbours
    lr: torch.Tensor = None  # the learning rate on the device: every step reads it, so a captured step can too
    graph: "StepGraph" = None  # with Config.cuda_graphs on one CUDA process: what train_step replays
    # Bad-step accounting on the device, so that no step waits for the host: the current and the longest run of
    # consecutive non-finite steps, and the count of skipped steps.
    consecutive_bad: torch.Tensor = None
    worst_streak: torch.Tensor = None
    skipped_steps: torch.Tensor = None

    def autocast(self):
        return torch.autocast(self.rt.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean training loss of the step's micro-batches, nats/token, on the device: unweighted
    weighted_loss: torch.Tensor  # the same with repeat targets weighted by repeat_loss_weight: what is trained
    grad_norm: torch.Tensor
    finite: torch.Tensor  # False when a gradient was not finite and the step was skipped


def build_learner(cfg, rt, n_species, build_model=None):
    """The model on its device with its optimizer, loss scaler, compiled and DDP handles."""
    model = (build_model or PlantLM)(cfg, n_species).to(rt.device)
    if isinstance(model, PlantLM):  # build the window bias eagerly: compiled graphs then read it as an input
        model.window_bias(cfg.context_size, rt.device)
    autocast_dtype, use_scaler = precision_settings(cfg, rt.device)
    # The scaler also guards bf16 and fp32 runs: it skips a step whose gradients are not finite, on the device,
    # with no host sync. Only fp16 needs its scale to move; elsewhere update() pins it at 1.
    scaler = torch.amp.GradScaler(rt.device.type, init_scale=2.0**16 if use_scaler else 1.0)
    compiled = torch.compile(model, mode=cfg.compile_mode) if cfg.compile and rt.device.type == "cuda" else model
    zero = lambda: torch.zeros((), device=rt.device)  # noqa: E731
    learner = Learner(cfg, rt, model, compiled, wrap_ddp(compiled, rt.device) if rt.distributed else compiled,
                      build_optimizer(model, cfg, rt.device), scaler, autocast_dtype, None if use_scaler else 1.0,
                      lr=torch.full((), cfg.learning_rate, device=rt.device),
                      consecutive_bad=zero(), worst_streak=zero(), skipped_steps=zero())
    if cfg.cuda_graphs and rt.device.type == "cuda" and not rt.distributed:  # DDP's hooks stay eager
        learner.graph = StepGraph(learner)
    return learner


def train_step(learner, step_tokens, step_species, step_repeat, lr, step_chunks=None):
    """One optimizer step: forward and backward over the accumulation micro-batches, clip, optimizer, memory update,
    bad-step accounting. step_tokens [A, B, prefix + context + 1], step_species [A, B], step_repeat (the tokens'
    repeat flags) and step_chunks [A, B] (each window's chunk, its number in the index's text; needed with
    global_memory = neighbours) as the loader yields them. Replays the learner's StepGraph when it has one, else runs
    step_on_device directly: the same work either way. Returns device tensors and never waits for the device."""
    learner.lr.fill_(lr)
    batch = (step_tokens, step_species, step_repeat) + (() if step_chunks is None else (step_chunks,))
    if learner.graph is not None:
        return learner.graph.step(batch)
    return step_on_device(learner, *(t.to(learner.rt.device, non_blocking=True) for t in batch))


def step_on_device(learner, step_tokens, step_species, step_repeat, step_chunks=None):
    """train_step's work once its inputs are on the device: only device work, so that a CUDA graph can hold it."""
    cfg, rt, model = learner.cfg, learner.rt, learner.model
    if cfg.global_memory == "neighbours" and step_chunks is None:  # else every window would copy its own bases
        raise ValueError("global_memory = neighbours trains with each window's chunk number (step_chunks); -1 for "
                         "windows from no training chunk")
    for group in learner.optimizer.param_groups:
        group["lr"] = learner.lr  # a resume's load_state_dict brings the saved value back: point at ours again
    step_tokens = step_tokens.long()
    # each target weighs 1, a repeat target repeat_loss_weight: the gradient follows the weighted mean, while the
    # reported loss stays the plain mean, comparable across runs
    step_weights = 1 + (cfg.repeat_loss_weight - 1) * step_repeat.float()
    # one weighted mean over the whole step: every micro-batch and every rank divides by the same total weight
    # (DDP averages the ranks' gradients, hence the division by world_size)
    total_weight = step_weights[:, :, cfg.prefix_tokens + 1:].sum()
    if rt.distributed and cfg.repeat_loss_weight != 1:  # unweighted, every rank's total is the same target count
        dist.all_reduce(total_weight)
        total_weight = total_weight / rt.world_size
    step_loss, step_weighted = torch.zeros((), device=rt.device), torch.zeros((), device=rt.device)
    observations = None
    for micro in range(cfg.accumulation_steps):
        windows = step_tokens[micro]
        inputs, targets = windows[:, cfg.prefix_tokens:-1], windows[:, cfg.prefix_tokens + 1:]
        weights = step_weights[micro, :, cfg.prefix_tokens + 1:]
        chunks = None if step_chunks is None else step_chunks[micro]
        memory = memory_inputs(learner.retrieval_index, cfg, windows, True, chunks)  # leave-one-out: a window never
        # counts itself, nor reads its own chunk
        syncs_gradients = micro == cfg.accumulation_steps - 1
        # gradients are all-reduced only on the last micro-batch; no_sync must wrap the forward too
        with learner.wrapped.no_sync() if rt.distributed and not syncs_gradients else contextlib.nullcontext():
            with learner.autocast():
                nats, hidden = learner.wrapped(inputs, step_species[micro], targets, reduction="none", **memory)
            weighted = (nats * weights).sum() / total_weight
            learner.scaler.scale(weighted).backward()
        step_loss += nats.detach().mean() / cfg.accumulation_steps  # training windows have no -100 targets
        step_weighted += weighted.detach()
        if cfg.global_memory == "buckets":
            seen = model.bucket_observations(inputs, hidden)
            observations = seen if observations is None else observations.add_(seen)
    # the memory's all-reduce runs on NCCL's stream while the optimizer steps on the compute stream
    pending = dist.all_reduce(observations, async_op=True) if rt.distributed and observations is not None else None
    learner.scaler.unscale_(learner.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    finite = torch.isfinite(grad_norm)  # the same on every rank: gradients are all-reduced
    learner.scaler.step(learner.optimizer)  # skipped when a gradient is not finite
    learner.scaler.update(learner.fixed_scale)
    learner.optimizer.zero_grad(set_to_none=True)
    bad = (~finite).float()
    learner.consecutive_bad.mul_(bad).add_(bad)
    torch.maximum(learner.worst_streak, learner.consecutive_bad, out=learner.worst_streak)
    learner.skipped_steps.add_(bad)
    if observations is not None:
        if pending is not None:
            pending.wait()
        model.update_bucket_memory(torch.where(finite, observations, 0.0))  # a skipped step teaches it nothing
    return StepResult(step_loss, step_weighted, grad_norm, finite)


def memory_inputs(retrieval_index, cfg, windows, exclude_self, chunks=None, target_bases=(0, BASES_PER_TOKEN)):
    """The model's memory arguments for windows: the retrieval counts (of target_bases), and with global_memory =
    neighbours the homologs, their seeds found by the counts' own search (SuffixIndex.counts_and_neighbours)."""
    if retrieval_index is None:
        return {}
    if cfg.global_memory == "neighbours":
        counts, found = retrieval_index.counts_and_neighbours(windows, cfg.prefix_tokens, exclude_self, chunks,
                                                              target_bases)
        return {"retrieval": counts, "neighbours": found}
    return {"retrieval": retrieval_index.counts(windows, cfg.prefix_tokens, exclude_self, target_bases)}


class StepGraph:
    """train_step's device work captured once as a CUDA graph and then replayed: one launch per optimizer step in
    place of thousands, which is what bounds a small batch (Config.cuda_graphs).

    The graph reads fixed addresses, so each step's batch is first copied into static buffers, and every replay
    writes its StepResult into the same tensors, which are handed back as copies. The first WARMUP_STEPS steps run
    step_on_device eagerly, on a side stream as capture requires: they compile, create the optimizer state and the
    loss scale, which must all exist before capture. A replay then does what an eager step does, dropout included
    (torch.cuda.graph registers the default generator, whose offset advances on every replay). build_learner makes
    one only for a single CUDA process; on the CPU (where a test runs it) nothing is captured and every step runs
    eagerly from the buffers.
    """

    WARMUP_STEPS = 2

    def __init__(self, learner):
        self.learner, self.inputs, self.graph, self.outputs, self.eager_steps = learner, None, None, None, 0
        self.side = torch.cuda.Stream() if learner.rt.device.type == "cuda" else None

    def step(self, batch):
        device = self.learner.rt.device
        if self.inputs is None:
            self.inputs = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in batch]
        for static, new in zip(self.inputs, batch):
            if static.shape != new.shape:
                raise ValueError(f"a step of shape {tuple(new.shape)} after {tuple(static.shape)}: a captured step "
                                 f"needs the same shapes every time")
            static.copy_(new, non_blocking=True)
        if self.graph is None and device.type == "cuda" and self.eager_steps == self.WARMUP_STEPS:
            self.capture()
        if self.graph is None:
            self.eager_steps += 1
            return self.eager_step()
        self.graph.replay()
        return StepResult(*(t.clone() for t in vars(self.outputs).values()))

    def eager_step(self):
        if self.learner.rt.device.type != "cuda":
            return step_on_device(self.learner, *self.inputs)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            result = step_on_device(self.learner, *self.inputs)
        torch.cuda.current_stream().wait_stream(self.side)
        return result

    def capture(self):
        for group in self.learner.optimizer.param_groups:
            group["capturable"] = True  # fused AdamW computes the same either way; the flag only admits capture
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph allocates from a pool of its own
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread goes on calling CUDA while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = step_on_device(self.learner, *self.inputs)


# ----------------------------------------------------------------------------- training: log lines, validation, saves

class LogMeter:
    """What the steps since the last log line add up to. A skipped step's loss stays out of the mean."""

    def __init__(self, run):
        self.clock, self.steps = run.clock, 0
        self.t_start, self.paused_before = time.time(), run.clock.paused()
        self.data_wait_before = run.clock.spent["data_wait"]
        self.loss_sum = torch.zeros((), device=run.rt.device)
        self.weighted_sum = torch.zeros((), device=run.rt.device)
        self.good_steps = torch.zeros((), device=run.rt.device)
        self.skipped_before = int(run.learner.skipped_steps.item())

    def add(self, result):
        self.steps += 1
        self.loss_sum += torch.where(result.finite, result.loss, 0.0)
        self.weighted_sum += torch.where(result.finite, result.weighted_loss, 0.0)
        self.good_steps += result.finite.float()

    def step_seconds(self):
        """Wall seconds of the steps since the last log line, data waits included, validation and saves not. Call
        after the device has finished them (write_log_line synchronizes): a CUDA-graph launch returns at once."""
        return time.time() - self.t_start - (self.clock.paused() - self.paused_before)


def write_log_line(run, meter, result):
    """One metrics record and log line for the steps since the last (result: the last step's). Its timing
    is the device's: it synchronizes first, so tokens/s counts finished work, not launches."""
    cfg, rt, learner = run.cfg, run.rt, run.learner
    synchronize(rt.device)
    seconds = meter.step_seconds()
    run.clock.observe_steps(run, meter.steps, seconds)
    worst, skipped = int(learner.worst_streak.item()), int(learner.skipped_steps.item())
    if skipped > meter.skipped_before:
        run.log.info(f"warning: {skipped - meter.skipped_before} step(s) up to step {run.step} had non-finite "
                     f"gradients and were skipped ({skipped} in all)")
    totals = torch.stack([meter.loss_sum, meter.weighted_sum, meter.good_steps])
    if rt.distributed:
        dist.all_reduce(totals)
    loss_sum, weighted_sum, good_steps = totals.tolist()
    mean_loss = loss_sum / good_steps if good_steps else math.nan
    samples_per_s = meter.steps * cfg.batch_size * cfg.accumulation_steps * rt.world_size / seconds
    record = {"step": run.step, "epoch": run.step / run.per_epoch, "loss": mean_loss,
              "bits_per_base": mean_loss * NATS_PER_TOKEN_TO_BITS_PER_BASE}
    if cfg.repeat_loss_weight != 1:  # what the gradient follows; `loss` stays the plain mean, comparable across runs
        record["weighted_loss"] = weighted_sum / good_steps if good_steps else math.nan
    data_wait = run.clock.spent["data_wait"] - meter.data_wait_before
    record.update({"lr": lr_at(run.step - 1, cfg, run.total_steps),
                   "grad_norm": result.grad_norm.item(),
                   "step_ms": 1000 * seconds / meter.steps, "samples_per_s": samples_per_s,
                   "tokens_per_s": samples_per_s * cfg.context_size, "data_wait_frac": data_wait / seconds,
                   "skipped_steps": skipped, "bad_step_streak": worst, "host_rss_mb": host_rss_mb(),
                   "elapsed_s": run.clock.elapsed(), "train_s": run.clock.split()["steps"]})
    peak = peak_flops(rt.device)
    if peak:
        n_tokens = cfg.batch_size * cfg.accumulation_steps * rt.world_size * cfg.context_size
        flops = learner.model.flops_per_step(n_tokens, cfg.accumulation_steps * rt.world_size)
        record["mfu"] = flops * meter.steps / seconds / (peak * rt.world_size)
    if rt.device.type == "cuda":
        record["gpu_mem_alloc_gb"] = torch.cuda.memory_allocated(rt.device) / 2**30
        record["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
        record.update(gpu_state(rt.device))
    run.log.metrics(record)
    run.log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    return record


def score_validation(run):
    """Score the fixed validation windows, log them, and save model_best.pt at a new low."""
    run.validated_at = run.step
    if not len(run.val_tokens):
        return
    learner = run.learner
    with run.clock.paused_for("validation"):
        run.val_loss, by_species, by_repeat = validation_loss(
            learner.model, run.val_tokens, run.val_species, run.val_repeat, run.cfg, run.rt, learner.autocast_dtype,
            learner.retrieval_index)
    improved = run.val_loss < run.best_val  # the same on every rank: the loss is all-reduced
    if improved:
        run.best_val, run.best_step = run.val_loss, run.step
    run.evals_since_best = 0 if improved else run.evals_since_best + 1
    to_bits = NATS_PER_TOKEN_TO_BITS_PER_BASE
    run.bits_above_best = (run.val_loss - run.best_val) * to_bits
    run.log.metrics({"step": run.step, "epoch": run.step / run.per_epoch, "val_loss": run.val_loss,
                     "val_bits_per_base": run.val_loss * to_bits, "best_val_loss": run.best_val,
                     "val_bits_per_base_by_species": {name: loss * to_bits for name, loss in
                                                      zip(run.catalog.species, by_species)},
                     "val_bits_per_base_repeat": by_repeat["repeat"] * to_bits,
                     "val_bits_per_base_nonrepeat": by_repeat["nonrepeat"] * to_bits,
                     "evals_since_best": run.evals_since_best, "bits_above_best": run.bits_above_best,
                     "elapsed_s": run.clock.elapsed(),
                     "train_s": run.clock.split()["steps"]})
    run.log.info(f"step {run.step}: validation loss {run.val_loss:.4f} nats/token = {run.val_loss * to_bits:.4f} "
                 f"bits/base (best {run.best_val * to_bits:.4f}; repeat targets {by_repeat['repeat'] * to_bits:.4f}, "
                 f"others {by_repeat['nonrepeat'] * to_bits:.4f})")
    if improved:  # long runs over-fit a few genomes: keep the weights a user most likely wants
        save_run(run, "model_best.pt")


def save_epoch_checkpoint(run):
    """model_epoch_N.pt, then the oldest epoch checkpoints beyond keep_epoch_checkpoints are deleted. Only epochs
    before this one count: a later epoch's file in the folder is another run's, and this one is never deleted."""
    epochs = run.step // run.per_epoch
    save_run(run, f"model_epoch_{epochs}.pt", epoch=epochs)
    keep = run.cfg.keep_epoch_checkpoints
    if run.rt.is_main and keep:
        older = [path for epoch, path in epoch_checkpoints(run.cfg.checkpoint_dir) if epoch < epochs]
        for path in older[:max(0, len(older) - (keep - 1))]:
            os.remove(path)
            run.log.info(f"removed {path} (keep_epoch_checkpoints = {run.cfg.keep_epoch_checkpoints})")


def save_run(run, name, epoch=None):
    """A checkpoint of the whole run, with every rank's RNG states, written by rank 0."""
    rt, learner = run.rt, run.learner
    if name != "model_best.pt":  # the best weights are a copy on the side, not where a resume continues
        run.saved_at = run.step
    # the best weights are a copy on the side: they do not put off model_latest.pt
    with run.clock.paused_for("checkpoints", reschedule=name != "model_best.pt"):
        all_states = [rng_states(rt.device)]
        if rt.distributed:
            all_states = [None] * rt.world_size
            dist.all_gather_object(all_states, rng_states(rt.device))
        if rt.is_main:
            path = os.path.join(run.cfg.checkpoint_dir, name)
            payload = {
                "model_state_dict": learner.model.state_dict(), "optimizer_state_dict": learner.optimizer.state_dict(),
                "scaler_state_dict": learner.scaler.state_dict(),
                "epoch": (run.step - 1) // run.per_epoch if epoch is None else epoch, "step": run.step,
                "config": dataclasses.asdict(run.cfg), "species": run.catalog.species,
                "steps_per_epoch": run.per_epoch, "world_size": rt.world_size, "best_val_loss": run.best_val,
                "best_step": run.best_step, "evals_since_best": run.evals_since_best,
                "bits_above_best": run.bits_above_best, "rng_states": all_states,
                "retrieval_index": learner.retrieval_index and learner.retrieval_index.digest}
            try:
                save_checkpoint(path, payload)
            except OSError as e:  # a full disk, say: the run cannot keep its work, so it stops, saying what is kept
                raise TrainingStopped(str(e.strerror)) from e
    if rt.is_main:
        run.log.info(f"saved {os.path.join(run.cfg.checkpoint_dir, name)} (step {run.step})")


def closing_lines(run):
    """The run's last lines: its steps and validation, model_best.pt beside the last figure, the wall time split."""
    to_bits, clock = NATS_PER_TOKEN_TO_BITS_PER_BASE, run.clock
    skipped = int(run.learner.skipped_steps.item())
    lines = [f"done: {run.step} steps, {skipped} step(s) skipped"]
    if len(run.val_tokens) and run.best_step is not None:
        last = "" if math.isnan(run.val_loss) else f"last validation {run.val_loss * to_bits:.4f} bits/base at step " \
                                                    f"{run.validated_at}; "
        lines.append(f"{last}best {run.best_val * to_bits:.4f} bits/base at step {run.best_step}, kept in "
                     f"{os.path.join(run.cfg.checkpoint_dir, 'model_best.pt')}")
    elif not len(run.val_tokens):
        lines.append("no validation set: model_best.pt is not written")
    wall, split = clock.elapsed(), clock.split()
    lines.append(f"wall time {wall:.1f} s: " + ", ".join(
        f"{name.replace('_', ' ')} {seconds:.1f} s ({100 * seconds / max(wall, 1e-9):.1f} %)"
        for name, seconds in split.items()))
    if split["steps"] > 0:
        lines.append(f"tokens: {clock.tokens:,} this invocation, {clock.tokens / max(wall, 1e-9):,.0f} per wall "
                     f"second, {clock.tokens / split['steps']:,.0f} per second in steps")
    return lines


def epoch_progress_bar(run):
    """A bar over the current epoch's steps (to the run's end when that comes first); none unless on a terminal."""
    from tqdm import tqdm
    epoch = run.step // run.per_epoch
    first, end = epoch_bar_span(run.step, run.per_epoch, run.total_steps)
    return tqdm(total=end - first, initial=run.step - first, desc=f"epoch {epoch + 1}/{run.cfg.n_epochs}",
                disable=not run.log.progress, dynamic_ncols=True, unit="step")


def epoch_bar_span(step, per_epoch, total_steps):
    """(first, end) steps the progress bar of step's epoch counts between: a max_steps run ends inside its epoch,
    and an ETA towards the epoch's end would be hours off."""
    first = step - step % per_epoch
    return first, min(first + per_epoch, total_steps)


@torch.no_grad()
def validation_loss(model, tokens, species, repeat, cfg, rt, autocast_dtype, retrieval_index=None):
    """Mean loss (nats/token, unweighted) over the fixed validation windows: overall, per species id (a list), and
    over the targets whose repeat flag is set and the others ({"repeat", "nonrepeat"}; nan where there are none);
    every rank scores its share, then all-reduce.

    `model` is the bare module, not the DDP wrapper, so a rank with fewer rows joins no collective of the model's.
    Every rank makes the same passes all the same, its retrieval lookups padded to the same number of windows (the
    last pass may hold fewer rows, or none): a sharded SuffixIndex answers each pass's counts with collectives. It
    runs eagerly, eval_batch_size windows at a time: a few large forward passes cost less than compiling another
    shape, and than many training-sized ones. Validation chunks are not in the retrieval index: nothing is left out.
    """
    was_training = model.training
    model.eval()
    mine = torch.arange(rt.rank, len(tokens), rt.world_size)
    n_species = int(species.max()) + 1 if len(species) else 1  # the same on every rank: all rows are everywhere
    # per species: nats, targets, and the same over repeat targets
    totals = torch.zeros(n_species, 4, dtype=torch.float64, device=rt.device)
    most_rows = -(-len(tokens) // rt.world_size)  # the largest rank's share
    for start in range(0, most_rows, cfg.eval_batch_size):
        rows = mine[start:start + cfg.eval_batch_size]
        batch = tokens[rows].to(rt.device)
        targets = batch[:, cfg.prefix_tokens + 1:]
        memory = {}
        if retrieval_index is not None:  # as many windows as every other rank looks up in this pass: -1 rows pad
            asked = torch.cat([batch, batch.new_full((min(cfg.eval_batch_size, most_rows - start) - len(rows),
                                                      batch.shape[1]), -1)])
            memory = memory_inputs(retrieval_index, cfg, asked, False)
            memory = {name: value[:len(rows)] if name == "retrieval" else tuple(x[:len(rows)] for x in value)
                      for name, value in memory.items()}
        if not len(rows):
            continue
        with torch.autocast(rt.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            nats, _ = model(batch[:, cfg.prefix_tokens:-1], species[rows].to(rt.device), targets, reduction="none",
                            **memory)
        nats = nats.double()
        flags = repeat[rows, cfg.prefix_tokens + 1:].to(rt.device)
        row_nats = nats.sum(1)
        totals.index_add_(0, species[rows].to(rt.device),
                          torch.stack([row_nats, torch.full_like(row_nats, cfg.context_size),
                                       torch.where(flags, nats, 0.0).sum(1), flags.sum(1).double()], 1))
    if rt.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    total_nats, targets, repeat_nats, repeat_targets = totals.sum(0).tolist()
    other_targets = targets - repeat_targets
    by_repeat = {"repeat": repeat_nats / repeat_targets if repeat_targets else math.nan,
                 "nonrepeat": (total_nats - repeat_nats) / other_targets if other_targets else math.nan}
    return total_nats / max(targets, 1), (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist(), by_repeat


# ----------------------------------------------------------------------------- training: the wall clock

MAX_PAUSE_SHARE = 0.025  # validation, and saves, each stretch their cadence to stay under this share of wall time
CLOCK_SYNC_STEPS = 16  # with several ranks, the clock's decisions are agreed (one all_reduce) every this many steps
EXIT_SECONDS = 5.0  # from the closing lines to the end of run.sh: loader workers, process group, interpreter exit
# An invocation's first steps compile and capture (StepGraph.WARMUP_STEPS eager steps, then the capture): a minute on
# a GPU where a step then takes milliseconds, so no step time is estimated from them
CLOCK_WARMUP_STEPS = 3


def invocation_start(default):
    """When this invocation began: run.sh's start (PLANT_LM_START, which torchrun's restarts inherit), else
    `default`."""
    try:
        return float(os.environ["PLANT_LM_START"])
    except (KeyError, ValueError):
        return default


def synchronize(device):
    """Wait for the device's queued work, so that a time taken next counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Due:
    """What the wall clock asks of the loop after a step."""
    out_of_time: bool = False  # what is left of max_minutes holds no further step besides the last validation and save
    validation: bool = False
    checkpoint: bool = False


class Clock:
    """The invocation's wall time: where it went (start-up, steps, data wait, validation, checkpoints), when the next
    validation and save are due, and whether max_minutes still holds another step and then the run's last validation
    and save. Its step times are the device's: write_log_line synchronizes before it reports them here."""

    def __init__(self, cfg, start):
        self.cfg, self.start = cfg, start
        self.deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        self.spent = {"data_wait": 0.0, "validation": 0.0, "checkpoints": 0.0}
        self.last = {"validation": None, "checkpoints": None}  # how long the last of each took
        self.next_due = {"validation": math.inf, "checkpoints": math.inf}
        self.steps_start = self.first_step = self.step_seconds = self.run = None
        self.warm = None  # (time, paused seconds) when the warm-up steps were done
        self.checkpoint_guess = None  # seconds, until a save is measured: weights and two AdamW moments at 200 MB/s

    def start_steps(self, run):
        """Start-up ends here, and the cadences start."""
        synchronize(run.rt.device)
        self.run, self.first_step, self.steps_start = run, run.step, time.time()
        self.checkpoint_guess = 12 * sum(p.numel() for p in run.learner.model.parameters()) / 200e6 + 1.0
        self.next_due = {"validation": self.steps_start + 60 * self.cfg.eval_every_minutes,
                         "checkpoints": self.steps_start + 60 * self.cfg.checkpoint_every_minutes
                         if self.cfg.checkpoint_every_minutes else math.inf}

    def elapsed(self):
        return time.time() - self.start

    def paused(self):
        return self.spent["validation"] + self.spent["checkpoints"]

    @property
    def tokens(self):
        """Tokens trained in this invocation, over all ranks."""
        cfg, run = self.cfg, self.run
        if run is None:
            return 0
        return (run.step - self.first_step) * cfg.batch_size * cfg.accumulation_steps * run.rt.world_size * \
            cfg.context_size

    def split(self):
        """Seconds of wall time so far by what they went to; they add up to elapsed()."""
        now = time.time()
        if self.steps_start is None:
            return {"start_up": now - self.start, "steps": 0.0, **self.spent}
        in_loop = now - self.steps_start
        return {"start_up": self.steps_start - self.start, "steps": in_loop - sum(self.spent.values()), **self.spent}

    @contextlib.contextmanager
    def waiting_for_data(self):
        t = time.time()
        yield
        self.spent["data_wait"] += time.time() - t

    @contextlib.contextmanager
    def paused_for(self, kind, reschedule=True):
        """Time a validation or a save ("validation", "checkpoints"), with the device's queued steps finished first
        so that they are not counted in it; then set when the next is due: the Config's interval, stretched so
        that this kind stays under MAX_PAUSE_SHARE of the wall time where it takes long (a big model on a CPU)."""
        device = self.run.rt.device if self.run else torch.device("cpu")
        synchronize(device)
        t = time.time()
        yield
        synchronize(device)
        now = time.time()
        self.spent[kind] += now - t
        self.last[kind] = now - t
        if reschedule:
            minutes = self.cfg.eval_every_minutes if kind == "validation" else self.cfg.checkpoint_every_minutes
            self.next_due[kind] = now + max(60 * minutes, (now - t) / MAX_PAUSE_SHARE) if minutes else math.inf

    def observe_steps(self, run, steps, seconds):
        """The wall seconds of the last `steps` steps up to run.step, measured after a synchronization; kept unless
        they include warm-up steps."""
        if run.step - steps >= self.first_step + CLOCK_WARMUP_STEPS:
            self.step_seconds = seconds / max(steps, 1)

    def poll(self, run):
        """What is due after this step. With several ranks the answer is agreed (the latest of any rank's clock)
        every CLOCK_SYNC_STEPS steps and is 'nothing' between, so every rank validates, saves and stops together."""
        now = time.time()
        if self.warm is None and run.step - self.first_step >= CLOCK_WARMUP_STEPS:
            synchronize(run.rt.device)
            self.warm = (time.time(), self.paused())
        # the first validation waits too until its estimated cost is within MAX_PAUSE_SHARE of the time in steps
        validation_due = now >= self.next_due["validation"] and (
            self.last["validation"] is not None
            or now - self.steps_start >= self.validation_estimate(run) / MAX_PAUSE_SHARE)
        validation_due, checkpoint_due = self.by_step_counts(run, validation_due, now >= self.next_due["checkpoints"])
        # a validation or save due now must fit too, besides what finishing takes
        due_now = validation_due * self.validation_estimate(run) + checkpoint_due * self.checkpoint_estimate()
        asks = [now + self.finish_estimate(run) + due_now > self.deadline, validation_due, checkpoint_due]
        if run.rt.distributed:
            if run.step % CLOCK_SYNC_STEPS:
                asks = [False] * 3
            else:
                agreed = torch.tensor(asks, dtype=torch.float32, device=run.rt.device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                asks = [bool(flag) for flag in agreed.tolist()]
        out_of_time, validation, checkpoint = asks
        validation, checkpoint = self.by_step_counts(run, validation, checkpoint)  # the same on every rank, every step
        if out_of_time:  # the run's last validation and save come next, in finish_run
            validation = checkpoint = False
        return Due(out_of_time, validation, checkpoint)

    def by_step_counts(self, run, validation, checkpoint):
        """eval_every and checkpoint_every, when > 0, override what the minutes say."""
        cfg = self.cfg
        return (run.step % cfg.eval_every == 0 if cfg.eval_every else validation,
                run.step % cfg.checkpoint_every == 0 if cfg.checkpoint_every else checkpoint)

    def finish_estimate(self, run):
        """Seconds that the next step (CLOCK_SYNC_STEPS of them with several ranks), the last validation, the last
        saves (model_best.pt when that validation is a new best, then model_latest.pt) and the exit take."""
        ahead = CLOCK_SYNC_STEPS if run.rt.distributed else 1
        return ahead * self.step_estimate(run) + self.validation_estimate(run) + \
            2 * self.checkpoint_estimate() + EXIT_SECONDS

    def step_estimate(self, run):
        """Wall seconds a step takes: as measured at the last log line, else the mean since the warm-up steps, else
        (during the warm-up) nothing yet."""
        if self.step_seconds is not None:
            return self.step_seconds
        if self.warm is None:
            return 0.0
        warm_time, paused = self.warm
        steps = run.step - self.first_step - CLOCK_WARMUP_STEPS
        return (time.time() - warm_time - (self.paused() - paused)) / steps if steps else 0.0

    def validation_estimate(self, run):
        """The last validation's seconds, else a guess: a forward pass is about a third of a step's work per
        window; half, to be safe."""
        if self.last["validation"] is not None:
            return self.last["validation"]
        cfg = self.cfg
        return len(run.val_tokens) / (cfg.batch_size * cfg.accumulation_steps) * self.step_estimate(run) / 2 + 1.0

    def checkpoint_estimate(self):
        """The last save's seconds, else the guess made at start_steps."""
        return self.checkpoint_guess if self.last["checkpoints"] is None else self.last["checkpoints"]


# ----------------------------------------------------------------------------- training: set-up helpers

@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed():
    """torchrun's environment -> process group: NCCL on GPUs, gloo on the CPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE = {world_size}: must be >= 1")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Runtime(rank, local_rank, world_size, device)


def precision_settings(cfg, device):
    """(autocast dtype or None, whether a GradScaler is needed)."""
    wanted = cfg.precision
    if wanted == "auto":
        wanted = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if wanted == "fp16" and device.type != "cuda":
        raise ConfigError("Config.precision = 'fp16' needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[wanted], wanted == "fp16"


def lr_at(step, cfg, total_steps):
    """Linear warm-up, then cosine decay to learning_rate * min_lr_ratio at total_steps."""
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model, cfg, device):
    """AdamW; no weight decay on embeddings, norms, biases or gates (anything not a weight matrix)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), fused=device.type == "cuda")


def wrap_ddp(module, device):
    """DDP without per-forward buffer broadcasts: the bucket memory is kept equal by its own all-reduce."""
    # torch 2.13 renamed broadcast_buffers (now deprecated, with a warning on every run) to forward_sync_buffers.
    renamed = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def species_table(catalog, cfg):
    """Each species found, its id, its sampling weight, where the weight came from, and its share of the draws."""
    shares = np.asarray(catalog.weights) / sum(catalog.weights)
    lines = [f"{'id':>3s} {'species':24s} {'weight':>7s} {'from':22s} {'draws':>6s}"]
    for i, (name, weight) in enumerate(zip(catalog.species, catalog.weights)):
        source = "species_distribution" if name in cfg.species_distribution else "default_species_weight"
        lines.append(f"{i:3d} {name[:24]:24s} {weight:7g} {source:22s} {shares[i]:6.1%}")
    return "\n".join(lines)


def steps_per_epoch(catalog, cfg, world_size):
    """An epoch draws as many windows as the training split holds (species-weighted), in whole optimizer steps."""
    samples_per_step = cfg.batch_size * cfg.accumulation_steps * world_size
    return max(1, catalog.windows(catalog.train_chunks, cfg) // samples_per_step)


def data_summary(catalog, cfg):
    """The start-up report of the data: the species table, then what was read of each species."""
    lines = [species_table(catalog, cfg)]
    for name in catalog.species:
        st = catalog.stats[name]
        train_chunks = [c for c in catalog.train_chunks if c.key[0] == name]
        val_chunks = [c for c in catalog.val_chunks if c.key[0] == name]
        lines.append(f"  {name}: {len(catalog.files[name])} file(s), {st.records} record(s), {st.bases:,} bases read, "
                     f"{st.non_acgt:,} non-ACGT removed, {st.dropped_short:,} in too-short pieces dropped; "
                     f"chunks {len(train_chunks)} train / {len(val_chunks)} val; windows "
                     f"{catalog.windows(train_chunks, cfg):,} train / {catalog.windows(val_chunks, cfg):,} val")
    for path, reason in catalog.skipped:
        lines.append(f"  skipped {path}: {reason}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training: checkpoint files

def save_checkpoint(path, payload):
    """A checkpoint of finite weights, written atomically (write_atomically): it exists only when whole."""
    for name, tensor in payload["model_state_dict"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingStopped(f"refusing to write {path}: {name} holds non-finite values")
    write_atomically(path, payload)


def write_atomically(path, payload, save=None, what="checkpoint"):
    """save(payload, file) (torch.save by default) to a temporary file in the same directory, fsync, rename: the
    file exists only when whole. Ctrl-C waits for the write (interrupts_deferred)."""
    folder = os.path.dirname(path) or "."
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with interrupts_deferred():
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                (save or torch.save)(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException as e:  # an interrupt as well as a full disk: no partial file is left
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {what} {path}: {e.strerror or e}; the previous {what} is kept") from e
        raise


@contextlib.contextmanager
def interrupts_deferred():
    """A SIGINT (Ctrl-C, or torchrun passing one on) that arrives inside the block acts when the block ends: one that
    lands inside torch.save loses the file being written, and its zip writer then raises an unrelated error."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives Python signals
        yield
        return
    arrived = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if arrived and callable(previous):
        previous(signal.SIGINT, arrived[0])


def load_checkpoint(path):
    """Load with weights_only=True: a checkpoint holds tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: not a loadable Plant LM checkpoint ({type(e).__name__}: {str(e)[:300]})") from e


def find_latest_checkpoint(folder, warn=print):
    """The complete checkpoint with the most optimizer steps; temporary and unreadable files are passed over.

    model_best.pt is a full checkpoint too, so it counts; at the same step model_latest.pt is preferred (a run's last
    save, after its last validation), then an epoch checkpoint, then model_best.pt.
    """
    if not os.path.isdir(folder):
        return None
    latest = None
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("model_") and name.endswith(".pt")):
            continue
        path = os.path.join(folder, name)
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
        except Exception as e:
            warn(f"warning: {path}: unreadable checkpoint ({type(e).__name__}); passed over")
            continue
        preference = 2 if name == "model_latest.pt" else 0 if name == "model_best.pt" else 1
        if latest is None or (step, preference) > latest[:2]:
            latest = (step, preference, path)
    return latest and latest[2]


def epoch_checkpoints(folder):
    """(N, path) of the model_epoch_N.pt files in folder, oldest epoch first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        stem = name[len("model_epoch_"):-len(".pt")]
        if name.startswith("model_epoch_") and name.endswith(".pt") and stem.isdigit():
            found.append((int(stem), os.path.join(folder, name)))
    return sorted(found)


def checkpoint_disk_report(run):
    """One line: what this run's checkpoints will take on disk, and a warning when the free space looks too small."""
    cfg, model = run.cfg, run.learner.model
    tensors = list(model.state_dict().values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the weights and buffers, plus AdamW's two fp32 moments per trainable weight
    each = sum(t.numel() * t.element_size() for t in tensors) + sum(2 * 4 * p.numel() for p in trainable)
    epochs = run.total_steps // run.per_epoch
    kept = min(epochs, cfg.keep_epoch_checkpoints) if cfg.keep_epoch_checkpoints else epochs
    files = kept + 2  # and model_latest.pt, model_best.pt
    folder = os.path.abspath(cfg.checkpoint_dir)
    existing = sum(os.path.getsize(path) for _, path in epoch_checkpoints(folder))
    probe = folder
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    needed = max(0, files * each - existing)
    line = (f"checkpoints: about {each / 1e9:.2f} GB each, up to {files} files ({kept} model_epoch_N.pt"
            f"{'' if cfg.keep_epoch_checkpoints else ', all kept'}, model_latest.pt, model_best.pt) = "
            f"{files * each / 1e9:.2f} GB in {cfg.checkpoint_dir}; {free / 1e9:.1f} GB free there")
    indexes = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith("retrieval_index_")] \
        if os.path.isdir(folder) else []
    if indexes:  # built before this report; one per training split, and a stale one is never reused
        line += (f"; beside them {len(indexes)} retrieval index file(s), "
                 f"{sum(os.path.getsize(p) for p in indexes) / 1e9:.2f} GB (a changed split builds another)")
    if needed > free:
        line += (f"\nwarning: the checkpoints need {needed / 1e9:.2f} GB more than is there, and {free / 1e9:.1f} GB "
                 f"is free: set --keep_epoch_checkpoints=N or free some space")
    return line


def remove_stale_temporaries(folder):
    """Delete the temporary files of saves whose process is gone (killed mid-write); returns their paths."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        stem, _, pid = name.rpartition(".tmp")
        if not (name.startswith(("model_", "retrieval_index_")) and stem.endswith(".pt") and pid.isdigit()):
            continue
        path = os.path.join(folder, name)
        try:
            os.kill(int(pid), 0)
            continue  # its writer is still alive (another run saving here): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by another user
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed


def resume_path(cfg, warn=print):
    """The checkpoint this run resumes from, or None."""
    if cfg.resume == "auto":
        return find_latest_checkpoint(cfg.checkpoint_dir, warn)
    return None if cfg.resume == "none" else cfg.resume


# What a checkpoint that predates a field ran with, where the field's default has changed since it was added
FORMER_DEFAULTS = {"global_memory": "buckets", "index_layout": "tables"}


def checkpoint_config(saved):
    """The Config a checkpoint was written with: a field it predates had its default value then."""
    names = {f.name for f in dataclasses.fields(Config)}
    values = {**FORMER_DEFAULTS, **{k: v for k, v in saved.items() if k in names}}
    return Config(**values)


def check_compatible(saved_config, cfg, saved_species, species, path, warn=print):
    """May this run continue the run saved at `path`? Raises ConfigError, listing each differing field, unless so.

    Architecture and split fields must match: the weights would not load, or validation would hold trained-on
    sequence. Any other field that decides what is learned (learning rate, schedule, batch, data mix, ...) may
    differ only with resume_with_new_settings: a user who edits Config and runs again would otherwise continue the
    old run, silently, under a reshaped schedule. Runtime fields may differ; each difference is reported.
    species=None leaves the species to a later check (run.sh's pre-check runs before the genomes are scanned).
    """
    saved_cfg = checkpoint_config(saved_config)

    def differences(kind):
        return [f"{name}: checkpoint {saved!r} vs now {now!r}" for name in fields_of_kind(kind)
                if (saved := getattr(saved_cfg, name)) != (now := getattr(cfg, name))]

    fixed = differences("architecture") + differences("split")
    if species is not None and saved_species != species:
        fixed.append(f"species: checkpoint {saved_species} vs data now {species}")
    if fixed:
        raise ConfigError(f"{path} does not match this run's model or validation split; differing fields:\n  " +
                          "\n  ".join(fixed) +
                          "\nSet the Config fields back, or start fresh with RESUME=none (or --resume=none).")
    changed = differences(None)
    if changed and not cfg.resume_with_new_settings:
        raise ConfigError(f"{path} was trained with other settings; differing fields:\n  " + "\n  ".join(changed) +
                          "\nTo continue that run with the new values: --resume_with_new_settings=true. "
                          "To start a new run: RESUME=none (or --resume=none). Or set the fields back.")
    for difference in changed:
        warn(f"resuming {path} with a changed setting: {difference}")
    for difference in differences("runtime"):
        if not difference.startswith("resume"):  # how this invocation resumes is no news
            warn(f"note: runtime setting changed since {path}: {difference}")


# ----------------------------------------------------------------------------- training: logs, wandb, RNG states

PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12,
                   "RTX 4090": 165e12, "V100": 125e12}  # dense bf16 (fp16 on V100), datasheets


def peak_flops(device):
    """The GPU's dense bf16 peak, matched on whole words of its name ('L40' is not 'L4'), or None if unknown."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name):
    padded = f" {name.replace('-', ' ')} "
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if f" {key} " in padded:
            return PEAK_BF16_FLOPS[key]
    return None


class RunLog:
    """Rank 0's record of a run: logs/training_TIMESTAMP.log, logs/metrics_TIMESTAMP.jsonl, a loss curve and wandb.

    Progress bars only on a terminal: redirected to a file, tqdm's redraws would fill it, and the log lines written
    every log_every steps already say how the run goes.
    """

    def __init__(self, cfg, rt):
        self.enabled = rt.is_main
        self.progress = rt.is_main and sys.stderr.isatty()
        self.history = {"train": [], "val": []}
        self.wandb = None
        self.log_file = self.metrics_file = None
        if not self.enabled:
            return
        os.makedirs(cfg.log_dir, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        self.log_path = os.path.join(cfg.log_dir, f"training_{stamp}.log")
        self.metrics_path = os.path.join(cfg.log_dir, f"metrics_{stamp}.jsonl")
        self.plot_path = os.path.join(cfg.log_dir, f"loss_{stamp}.png")
        self.log_file = open(self.log_path, "a", buffering=1)
        self.metrics_file = open(self.metrics_path, "a", buffering=1)

    def info(self, message):
        if self.enabled:
            if self.progress:
                from tqdm import tqdm
                tqdm.write(message)  # above the bar, not through it
            else:
                print(message, flush=True)
            self.log_file.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")

    def metrics(self, record):
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        if "val_bits_per_base" in record:
            self.history["val"].append((record["step"], record["val_bits_per_base"]))
            self.plot()
        elif "bits_per_base" in record:
            self.history["train"].append((record["step"], record["bits_per_base"]))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def start_wandb(self, cfg):
        """Online when credentials exist; otherwise offline with one warning. Never prompts for a login."""
        mode = os.environ.get("WANDB_MODE", "online").lower()
        if not self.enabled or mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self.info("warning: wandb is not installed; metrics go to the jsonl log only")
            return
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or netrc_has_wandb()):
            self.info("warning: WANDB_MODE=online but no wandb credentials (WANDB_API_KEY or ~/.netrc); logging offline")
            mode = "offline"
        config = dataclasses.asdict(cfg)
        try:
            self.wandb = wandb.init(project=cfg.wandb_project, config=config, mode=mode,
                                    settings=wandb.Settings(init_timeout=60, silent=True))
        except Exception as e:
            self.info(f"warning: wandb online start failed ({type(e).__name__}); logging offline")
            self.wandb = wandb.init(project=cfg.wandb_project, config=config, mode="offline",
                                    settings=wandb.Settings(silent=True))

    def plot(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for split, style in (("train", "-"), ("val", "o-")):
            if self.history[split]:
                steps, values = zip(*self.history[split])
                ax.plot(steps, values, style, label=split, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("bits per base")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.plot_path + ".tmp.png", dpi=100)
        plt.close(fig)
        os.replace(self.plot_path + ".tmp.png", self.plot_path)

    def close(self):
        """Finish wandb and close the files; safe to call after a failed start (the scan raised, say)."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        for f in (self.log_file, self.metrics_file):
            if f is not None:
                f.close()


def netrc_has_wandb():
    path = os.path.expanduser("~/.netrc")
    if not os.path.exists(path):
        return False
    with open(path, errors="ignore") as f:
        return "api.wandb.ai" in f.read()


def host_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@functools.lru_cache(maxsize=None)
def nvml_handle(device_index):
    """NVML, initialized once per process; None where it is not installed."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:  # no NVML: the memory figures still come from torch
        return None


def gpu_state(device):
    """Utilization, temperature and power through NVML, where it is installed."""
    handle = nvml_handle(device.index) if device.type == "cuda" else None
    if handle is None:
        return {}
    import pynvml
    try:
        return {"gpu_util": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                "gpu_temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                "gpu_power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000}
    except pynvml.NVMLError:
        return {}


def versions(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda, "host": platform.node()}
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def rng_states(device):
    states = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
              "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states, device):
    random.setstate((states["python_version"], tuple(states["python"]), None))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


# ----------------------------------------------------------------------------- entry point

USAGE = """usage: python plant_lm_train.py [--field=value ...]
Trains on Config.data_dir (launch through run.sh, which runs torchrun, for several GPUs or nodes). Config fields are
the Config dataclass at the top of this file; --field=value overrides one for this run. Scoring, variants and
embeddings are plant_lm_infer.py's."""


def config_from_args(args):
    overrides = parse_overrides(args)
    if "RESUME" in os.environ and "resume" not in overrides:  # the command line beats the environment
        overrides["resume"] = os.environ["RESUME"]
    return Config(**overrides).check()


def error_message(error):
    """The user's part of an error: a DataLoader worker's error arrives wrapped in the worker's traceback."""
    message = str(error)
    if "Original Traceback" in message:
        return message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
    return message


def main(argv):
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    is_main = int(os.environ.get("RANK", 0)) == 0
    cfg = None
    try:
        cfg = config_from_args(argv)
        train(cfg, started=PROCESS_START)
    except (ConfigError, DataError, TrainingStopped) as e:  # ours, with a message that names the cause; the rest
        if is_main:                                         # are bugs and keep their traceback
            print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: say where the work stands, not where the interpreter was
        if is_main:
            latest = cfg and find_latest_checkpoint(cfg.checkpoint_dir, warn=lambda message: None)
            where = "no checkpoint was written yet" if not latest else \
                f"the same command resumes from {latest}" if cfg.resume == "auto" else \
                f"the latest checkpoint is {latest} (this run has resume={cfg.resume}; --resume=auto resumes from it)"
            print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Plant LM: a causal 6-mer language model over the genomes of many plant species.

One module, read top-down: Config -> data -> model -> training -> evaluation -> entry point.
Launch with `bash run.sh` (torchrun); `python plant_lm_train.py --help` lists the subcommands.
"""

import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import platform
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# ----------------------------------------------------------------------------- Config

KMER = 6
VOCAB_SIZE = 4**KMER
FASTA_SUFFIXES = (".fa", ".fna", ".fasta")


@dataclass
class Config:
    # data
    data_dir: str = "data"
    species_distribution: dict = field(default_factory=lambda: {"arabidopsis": 1.0, "lyrata": 1.0, "arenosa": 1.0})
    default_species_weight: float = 1.0  # for a species found in data_dir but missing above
    chunk_size: int = 1_200_000  # bases; windows never cross a chunk boundary
    context_size: int = 64  # tokens a sample reads; it also predicts 64 next tokens
    overlap_ratio: float = 0.5  # consecutive windows share this fraction of their tokens
    val_fraction: float = 0.02  # fraction of chunks held out, chosen by hash of the chunk's identity
    eval_windows: int = 4096  # fixed validation windows scored at each evaluation (0 = all)
    open_chunks_per_species: int = 16  # chunks each loader worker interleaves, per species
    num_workers: int = 4  # DataLoader workers per rank
    # model
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    dropout: float = 0.1
    local_attn_window: int = 32  # keys per query, the query's own position included
    n_buckets: int = VOCAB_SIZE  # rows of the bucket memory, one per 6-mer
    global_context: int = 200_000  # tokens after which an observation's weight in the memory falls to 1/e
    bucket_norm_every: int = 1000  # optimizer steps between renormalizations of the memory rows
    use_global_memory: bool = True
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
    seed: int = 1337
    # runtime
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    compile: bool = True  # torch.compile on CUDA (the CPU always runs eager)
    eval_every: int = 500  # optimizer steps between validations (also at each epoch end)
    log_every: int = 50
    checkpoint_every: int = 1000  # optimizer steps between rolling mid-epoch checkpoints (0 = epoch ends only)
    checkpoint_dir: str = "dna_model"
    log_dir: str = "logs"
    resume: str = "auto"  # auto = latest complete checkpoint if any, none, or a path
    wandb_project: str = "plant-lm"

    @property
    def window_stride(self):
        return max(1, round(self.context_size * (1 - self.overlap_ratio)))

    @property
    def window_bases(self):
        return (self.context_size + 1) * KMER

    def validate(self):
        """Fail before any heavy work, naming the field."""
        checks = [
            (self.chunk_size % KMER == 0, "chunk_size", f"must be a multiple of {KMER}"),
            (self.chunk_size >= self.window_bases, "chunk_size", f"must hold one window ({self.window_bases} bases)"),
            (self.context_size >= 2, "context_size", "must be >= 2"),
            (0 <= self.overlap_ratio < 1, "overlap_ratio", "must be in [0, 1)"),
            (1 <= self.local_attn_window <= self.context_size, "local_attn_window", "must be in [1, context_size]"),
            (self.n_buckets == VOCAB_SIZE, "n_buckets", f"must be 4^{KMER} = {VOCAB_SIZE}, one bucket per 6-mer"),
            (self.d_model % self.n_heads == 0, "d_model", "must be divisible by n_heads"),
            ((self.d_model // max(self.n_heads, 1)) % 2 == 0, "d_model", "d_model / n_heads must be even (rotary)"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.accumulation_steps >= 1, "accumulation_steps", "must be >= 1"),
            (self.n_epochs >= 1, "n_epochs", "must be >= 1"),
            (self.max_steps >= 0, "max_steps", "must be >= 0"),
            (self.global_context >= 1, "global_context", "must be >= 1"),
            (self.bucket_norm_every >= 1, "bucket_norm_every", "must be >= 1"),
            (0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)"),
            (self.eval_windows >= 0, "eval_windows", "must be >= 0"),
            (self.open_chunks_per_species >= 1, "open_chunks_per_species", "must be >= 1"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
            (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
            (self.precision in ("auto", "bf16", "fp16", "fp32"), "precision", "must be auto, bf16, fp16 or fp32"),
            (self.default_species_weight >= 0, "default_species_weight", "must be >= 0"),
            (isinstance(self.species_distribution, dict), "species_distribution", "must map species name -> weight"),
            (self.log_every >= 1 and self.eval_every >= 1, "log_every/eval_every", "must be >= 1"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"Config.{name} = {getattr(self, name.split('/')[0])!r}: {why}")
        for name, weight in self.species_distribution.items():
            if not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
                raise ValueError(f"Config.species_distribution[{name!r}] = {weight!r}: weights must be finite and >= 0")
        return self


def parse_overrides(args):
    """Turn ['--key=value', ...] into Config field values, typed after the field."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown Config field {key!r}; known fields: {', '.join(fields)}")
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
            raise SystemExit(f"error: --{key}={text!r} is not a valid {type(default).__name__}: {e}") from None
        overrides[key] = value
    return overrides


# ----------------------------------------------------------------------------- data

class DataError(Exception):
    """Bad input data; the message names the file or directory."""


def _byte_table():
    # A C G T -> 0..3, a c g t -> 4..7 (soft-masked repeat), anything else -> 8 (splits the sequence)
    table = np.full(256, 8, dtype=np.uint8)
    for i, base in enumerate(b"ACGT"):
        table[base] = i
        table[base + 32] = i + 4
    return table


BYTE_CODES = _byte_table()
KMER_PLACE_VALUES = 4 ** np.arange(KMER - 1, -1, -1)


def tokenize(codes):
    """Base codes (0..3 = A C G T) -> non-overlapping 6-mer ids, index = sum b_i * 4^(5-i); trailing bases dropped."""
    n = len(codes) // KMER
    kmers = (np.asarray(codes[: n * KMER], dtype=np.uint16) & 3).reshape(n, KMER)
    tokens = kmers[:, 0] << 10
    for i in range(1, KMER):
        tokens |= kmers[:, i] << (2 * (KMER - 1 - i))
    return tokens


def detokenize(tokens):
    """6-mer ids -> the bases they spell, as a str."""
    tokens = np.asarray(tokens, dtype=np.int64)
    digits = (tokens[:, None] >> (2 * np.arange(KMER - 1, -1, -1))) & 3
    return np.frombuffer(np.array(b"ACGT")[digits].tobytes(), dtype="S1").tobytes().decode() if len(tokens) else ""


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
    line streams in block_size pieces. Blank lines and ';' comment lines are skipped; CRLF is accepted.
    """
    record_index, record_id = -1, None
    carry = b""
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
                        if data.startswith((b">", b";")):
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
                    if data[pos] in b">;":
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
                        piece = data[pos:end].translate(None, b"\r\n")
                        if piece:
                            yield record_index, record_id, piece
                    pos = end
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


@dataclass
class Chunk:
    key: tuple  # (species, file, record_index, segment_start, chunk_index): the chunk's stable identity
    n_tokens: int
    tokens: np.ndarray = None  # uint16 6-mer ids
    repeat: np.ndarray = None  # bool per token: at least 3 of its 6 bases soft-masked (lowercase)


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


def chunk_file(path, species, file_label, cfg, wanted=None, stats=None):
    """Stream one FASTA file into Chunks: split at every non-ACGT character, cut segments into chunk_size pieces.

    With `wanted` (a set of chunk keys) only those chunks carry tokens; the others are still yielded as bare keys,
    so every reader of a file sees the same chunk boundaries. Memory is one chunk plus one read block.
    """
    stats = stats if stats is not None else FileStats()
    buffer = np.empty(cfg.chunk_size, dtype=np.uint8)
    fill = 0
    record_index = segment_start = chunk_index = 0
    in_segment = False  # does the last base read continue an A/C/G/T run?

    def emit():
        nonlocal fill, chunk_index
        usable = fill - fill % KMER
        if fill < cfg.window_bases:
            stats.dropped_short += fill
            fill = 0
            return None
        stats.dropped_short += fill - usable
        stats.used_bases += usable
        stats.chunks += 1
        key = (species, file_label, record_index, segment_start, chunk_index)
        chunk_index += 1
        fill = 0
        chunk = Chunk(key=key, n_tokens=usable // KMER)
        if wanted is None or key in wanted:
            codes = buffer[:usable]
            chunk.tokens = tokenize(codes)
            chunk.repeat = ((codes >> 2) & 1).reshape(-1, KMER).sum(1) >= 3
        return chunk

    position = 0  # offset of the current piece within its record
    current_record = -1
    for rec_index, _, piece in read_fasta(path):
        if rec_index != current_record:
            if in_segment and (chunk := emit()):
                yield chunk
            in_segment = False
            current_record, record_index, position = rec_index, rec_index, 0
            stats.records += 1
        codes = BYTE_CODES[np.frombuffer(piece, dtype=np.uint8)]
        segments = acgt_segments(codes)
        n_valid = int((segments[:, 1] - segments[:, 0]).sum()) if len(segments) else 0
        stats.bases += len(codes)
        stats.acgt_bases += n_valid
        if n_valid < len(codes):
            stats.non_acgt += len(codes) - n_valid
            letters = np.frombuffer(piece, dtype=np.uint8) & 0xDF
            stats.other_letters += int(((letters >= 65) & (letters <= 90) & (codes == 8) & (letters != 78)).sum())
        if len(segments) == 0 or segments[0, 0] > 0:
            if in_segment and (chunk := emit()):
                yield chunk
            in_segment = False
        for start, end in segments:
            if not in_segment:
                segment_start, chunk_index = position + int(start), 0
            cursor = start
            while cursor < end:
                take = min(end - cursor, cfg.chunk_size - fill)
                buffer[fill:fill + take] = codes[cursor:cursor + take]
                fill += take
                cursor += take
                if fill == cfg.chunk_size and (chunk := emit()):
                    yield chunk
            in_segment = end == len(codes)
            if not in_segment and fill and (chunk := emit()):
                yield chunk
            elif not in_segment:
                fill = 0
        position += len(codes)
    if in_segment and (chunk := emit()):
        yield chunk


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
        weight = cfg.species_distribution.get(species)
        if weight is None:
            weight = cfg.default_species_weight
            warn(f"warning: species {species!r} is not in Config.species_distribution; "
                 f"using default_species_weight = {weight}")
        if weight == 0:
            warn(f"note: species {species!r} has weight 0 and is excluded")
            continue
        genomes[species], weights[species] = files, float(weight)
    for species in cfg.species_distribution:
        if species not in genomes and cfg.species_distribution[species] > 0:
            warn(f"warning: species {species!r} is configured but {os.path.join(root, species)} has no usable FASTA")
    if not genomes:
        raise DataError(f"{root}: no usable genomes; {layout}, with at least one species of weight > 0")
    return genomes, weights


@dataclass
class GenomeIndex:
    """What one scan of the data found: the chunks of each split and what was counted on the way."""
    species: list  # sorted names; the position is the species id
    weights: list  # sampling weight of each species
    files: dict  # species -> [(path, label)]
    train: list  # Chunk (no tokens) per training chunk
    val: list
    stats: dict  # species -> FileStats
    skipped: list  # (path, reason)

    def windows(self, chunks, cfg):
        return sum(windows_per_chunk(c.n_tokens, cfg.context_size, cfg.window_stride) for c in chunks)


def split_chunks(chunks, val_fraction):
    """Deterministic split by a hash of each chunk's identity; a species with >= 2 chunks gets >= 1 of each."""
    train, val = [], []
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
            (val if id(chunk) in held else train).append(chunk)
    return train, val


def scan_genomes(cfg, warn=print, progress=True):
    """Stream every genome once to find its chunks and count bases, before any model is built."""
    from tqdm import tqdm
    genomes, weights = discover_genomes(cfg, warn)
    species = sorted(genomes)
    chunks, stats, files, skipped = [], {}, {}, []
    total_bytes = sum(os.path.getsize(p) for paths in genomes.values() for p in paths)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="scanning genomes", disable=not progress)
    for name in species:
        stats[name] = FileStats()
        for path in genomes[name]:
            label = os.path.relpath(path, cfg.data_dir)
            file_stats = FileStats()
            try:
                found = list(chunk_file(path, name, label, cfg, wanted=set(), stats=file_stats))
                if file_stats.bases and file_stats.other_letters > 0.1 * file_stats.bases:
                    raise DataError(f"{path}: {file_stats.other_letters / file_stats.bases:.0%} of the letters are "
                                    f"neither A/C/G/T nor N: this looks like protein, not DNA")
                if file_stats.records == 0:
                    raise DataError(f"{path}: no FASTA records")
            except DataError as e:
                warn(f"warning: {e}; file skipped")
                skipped.append((path, str(e)))
                continue
            finally:
                bar.update(os.path.getsize(path))
            if not found:
                warn(f"warning: {path}: no A/C/G/T run of at least {cfg.window_bases} bases; nothing to train on")
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
    train, val = split_chunks(chunks, cfg.val_fraction)
    return GenomeIndex(species=present, weights=[weights[s] for s in present], files=files, train=train, val=val,
                       stats={s: stats[s] for s in present}, skipped=skipped)


def assign_chunks(n_chunks, shard, n_shards, epoch, seed, species_id):
    """Indices of one species' chunks that a (rank, worker) shard reads this epoch.

    The permutation is shared by all shards (same seed), so with at least n_shards chunks every chunk goes to
    exactly one shard; with fewer, shards share chunks round-robin so that every shard can draw every species.
    """
    order = np.random.default_rng([seed, epoch, species_id]).permutation(n_chunks)
    if n_chunks >= n_shards:
        return sorted(order[shard::n_shards].tolist())
    return [int(order[shard % n_chunks])]


class SpeciesStream:
    """The windows of one species' owned chunks, drawn without replacement within each pass over them.

    `open_chunks_per_species` chunks are open at once, each read in a random window order, so that a batch mixes
    many chunks and consecutive samples are not near-duplicates. A pass ends when every owned window was drawn once.
    """

    def __init__(self, species_id, chunks, files, cfg, rng):
        self.species_id, self.cfg, self.rng = species_id, cfg, rng
        self.owned = {c.key for c in chunks}
        labels = {c.key[1] for c in chunks}
        self.files = [(p, label) for p, label in files if label in labels]
        self.offsets = np.arange(cfg.context_size + 1)
        self.slots, self.source = [], None

    def _open_chunks(self):
        name = next(iter(self.owned))[0]
        for path, label in self.files:
            for chunk in chunk_file(path, name, label, self.cfg, wanted=self.owned):
                if chunk.tokens is not None:
                    yield chunk

    def _refill(self, slot_index=None):
        """Open the next chunk into a slot; False when this pass has no chunk left."""
        for chunk in self.source:
            starts = window_starts(chunk.n_tokens, self.cfg.context_size, self.cfg.window_stride)
            slot = [chunk, self.rng.permutation(starts), 0]
            if slot_index is None:
                self.slots.append(slot)
            else:
                self.slots[slot_index] = slot
            return True
        return False

    def _new_pass(self):
        self.source = self._open_chunks()
        self.slots = []
        while len(self.slots) < self.cfg.open_chunks_per_species and self._refill():
            pass

    def draw(self, count):
        """`count` windows as (tokens [count, context+1] int16, chunk keys)."""
        windows, keys = [], []
        while count:
            if not self.slots:
                self._new_pass()
            picks = np.bincount(self.rng.integers(len(self.slots), size=count), minlength=len(self.slots))
            for i in np.flatnonzero(picks)[::-1]:
                chunk, order, pos = self.slots[i]
                take = min(int(picks[i]), len(order) - pos)
                starts = order[pos:pos + take]
                windows.append(chunk.tokens[starts[:, None] + self.offsets])
                keys.extend([chunk.key] * take)
                self.slots[i][2] = pos + take
                count -= take
                if pos + take == len(order) and not self._refill(i):
                    del self.slots[i]
        return np.concatenate(windows).astype(np.int16), keys


class EpochSampler:
    """One shard's species-weighted stream of batches for one epoch."""

    def __init__(self, index, cfg, epoch, shard, n_shards):
        self.epoch, self.cfg = epoch, cfg
        self.rng = np.random.default_rng([cfg.seed, epoch, shard, 1])
        weights = np.asarray(index.weights, dtype=np.float64)
        self.probs = weights / weights.sum()
        self.streams = []
        for species_id, name in enumerate(index.species):
            chunks = [c for c in index.train if c.key[0] == name]
            if not chunks:
                self.probs[species_id] = 0
                self.streams.append(None)
                continue
            mine = assign_chunks(len(chunks), shard, n_shards, epoch, cfg.seed, species_id)
            self.streams.append(SpeciesStream(species_id, [chunks[i] for i in mine], index.files[name], cfg,
                                              np.random.default_rng([cfg.seed, epoch, shard, 2, species_id])))
        if self.probs.sum() == 0:
            raise DataError(f"{cfg.data_dir}: no training chunks (every chunk went to validation)")
        self.probs /= self.probs.sum()

    def next_batch(self, batch_size):
        """(tokens [B, context+1] int16, species ids [B] int64, chunk keys) with rows in random order."""
        species = self.rng.choice(len(self.probs), size=batch_size, p=self.probs)
        parts, ids, keys = [], [], []
        for species_id, count in enumerate(np.bincount(species, minlength=len(self.probs))):
            if count:
                windows, chunk_keys = self.streams[species_id].draw(int(count))
                parts.append(windows)
                ids.append(np.full(count, species_id))
                keys.extend(chunk_keys)
        order = self.rng.permutation(batch_size)
        tokens, ids = np.concatenate(parts)[order], np.concatenate(ids)[order]
        return tokens, ids, [keys[i] for i in order]


class GenomeStream(IterableDataset):
    """The training stream of one rank: an endless run of micro-batches, epoch after epoch.

    Global micro-batch b of a rank comes from DataLoader worker b % num_workers (the DataLoader's round-robin),
    and belongs to epoch b // micro_batches_per_epoch. Each (rank, worker) is a shard with its own chunks and seeds,
    so the stream is reproducible, and it can restart at any micro-batch for an exact resume.
    """

    def __init__(self, index, cfg, rank, world_size, micro_batches_per_epoch, start_micro_batch=0):
        self.index, self.cfg, self.rank, self.world_size = index, cfg, rank, world_size
        self.per_epoch, self.start = micro_batches_per_epoch, start_micro_batch

    def __iter__(self):
        worker = get_worker_info()
        wid, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        shard, n_shards = self.rank * n_workers + wid, self.world_size * n_workers
        batch = self.start + (wid - self.start) % n_workers
        sampler = None
        while True:
            epoch = batch // self.per_epoch
            if sampler is None or sampler.epoch != epoch:
                sampler = EpochSampler(self.index, self.cfg, epoch, shard, n_shards)
                first = epoch * self.per_epoch + (wid - epoch * self.per_epoch) % n_workers
                for _ in range((batch - first) // n_workers):  # fast-forward to resume mid-epoch
                    sampler.next_batch(self.cfg.batch_size)
            tokens, species, _ = sampler.next_batch(self.cfg.batch_size)
            yield torch.from_numpy(tokens), torch.from_numpy(species)
            batch += n_workers


def load_validation(index, cfg):
    """The fixed validation windows: evenly spaced over the validation chunks, in file order, never shuffled."""
    stride = cfg.window_stride
    counts = [windows_per_chunk(c.n_tokens, cfg.context_size, stride) for c in index.val]
    total = sum(counts)
    picks = np.arange(total) if not cfg.eval_windows or total <= cfg.eval_windows else \
        np.unique(np.linspace(0, total - 1, cfg.eval_windows).round().astype(np.int64))
    bounds = np.cumsum([0] + counts)
    wanted = {}
    for i, chunk in enumerate(index.val):
        mine = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
        if len(mine):
            wanted[chunk.key] = mine * stride
    windows, species = {}, {}
    offsets = np.arange(cfg.context_size + 1)
    for name in index.species:
        for path, label in index.files.get(name, []):
            if not any(k[1] == label and k[0] == name for k in wanted):
                continue
            for chunk in chunk_file(path, name, label, cfg, wanted=set(wanted)):
                if chunk.tokens is not None:
                    windows[chunk.key] = chunk.tokens[wanted[chunk.key][:, None] + offsets]
                    species[chunk.key] = index.species.index(name)
    keys = [c.key for c in index.val if c.key in windows]
    if not keys:
        return torch.zeros(0, cfg.context_size + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    tokens = torch.from_numpy(np.concatenate([windows[k] for k in keys]).astype(np.int64))
    ids = torch.from_numpy(np.concatenate([np.full(len(windows[k]), species[k]) for k in keys]))
    return tokens, ids

"""Plant LM inference: score DNA, score variants, embed sequences, with a checkpoint that plant_lm_train.py wrote.

  python plant_lm_infer.py eval --checkpoint PATH --species NAME [--per-base OUT.bedGraph] FASTA [FASTA ...]
  python plant_lm_infer.py variants --checkpoint PATH --species NAME --fasta REF.fa --vcf IN.vcf --out OUT.tsv
  python plant_lm_infer.py embed --checkpoint PATH --species NAME --out OUT.npz (FASTA | --bed REGIONS --fasta REF)

The model, tokenizer, FASTA reader and retrieval index come from plant_lm_train.py, so a checkpoint is read exactly as
training wrote it. Sections: scoring (checkpoint, windows, per-base log-probabilities) -> eval -> variants ->
embeddings -> entry point.
"""

import argparse
import collections
import contextlib
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from plant_lm_train import (BASES_PER_TOKEN, BYTE_CODES, Config, ConfigError, DataError, FileStats, PlantLM,
                          RetrievalIndex, acgt_segments, check_looks_like_dna, checkpoint_config, chunk_digest,
                          chunk_file, chunk_start, load_checkpoint, load_retrieval_index, memory_inputs, open_genome,
                          other_letters, prefix_log_probs, read_fasta, retrieval_index_path, slot_features, token_bases,
                          tokenize, write_atomically)

# ----------------------------------------------------------------------------- scoring: windows, per-base log-probs

TARGET_PREFIXES = tuple(range(1, BASES_PER_TOKEN + 1))  # a target 6-mer's first 1..6 bases: scoring base by base


@dataclass
class Inference:
    """A trained checkpoint ready for inference: the model in eval mode on its device, with its global memory."""
    model: nn.Module
    cfg: Config
    species_id: int
    device: torch.device
    retrieval_index: RetrievalIndex = None
    training_chunks: dict = None  # with neighbours: {chunk_digest of a training chunk's bases: its number}


def load_for_inference(checkpoint, species, device="auto", warn=print, scoring=True):
    """The checkpoint's model for `species` (a name it was trained on, or 'average': the mean species embedding),
    on `device` ('auto': a GPU when there is one), with its memory: the frozen bucket memory in its weights, or, for
    scoring, the retrieval index of its training chunks, cached beside it (the hidden states of global_memory =
    retrieval never read it; those of neighbours do)."""
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else \
            torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here")
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt["config"])
    names = ckpt["species"]
    model = PlantLM(cfg, len(names))
    model.load_state_dict(ckpt["model_state_dict"])
    if species == "average":
        mean = model.species_embedding.weight.detach().mean(0, keepdim=True)
        model.species_embedding = nn.Embedding.from_pretrained(mean)
        species_id = 0
    elif species in names:
        species_id = names.index(species)
    else:
        raise ConfigError(f"species {species!r} is unknown to {checkpoint}; known species: "
                          f"{', '.join(names)} (or 'average' for the mean species embedding)")
    retrieval_index = None
    if cfg.retrieves and (scoring or cfg.global_memory == "neighbours"):
        path = retrieval_index_path(os.path.dirname(checkpoint) or ".", ckpt["retrieval_index"], cfg.index_layout)
        if not os.path.exists(path):
            raise ConfigError(f"{checkpoint} reads the retrieval index {path}, which is missing; it is rebuilt "
                              f"by a training run on the same data with --checkpoint_dir set to that folder")
        retrieval_index = load_retrieval_index(path, device)
        warn(f"memory: retrieval index {ckpt['retrieval_index']} ({path}), the training chunks of {', '.join(names)}")
    training_chunks = retrieval_index.chunk_numbers() if cfg.global_memory == "neighbours" else None
    return Inference(model.to(device).eval(), cfg, species_id, device, retrieval_index, training_chunks)


def score_pieces(inference, pieces, batch_size=64, chunk_of=None):
    """Per-base log-likelihoods of DNA: for each (key, codes) of pieces (base codes 0..3), yields (key, codes,
    log_probs), log_probs [len(codes)] float64: ln p(base | the piece's bases before it), nan for the first 6 bases,
    which are context only (nothing predicts a piece's first 6-mer).

    chunk_of(key, codes): the training chunk a piece lies in (training_chunk; -1: none), whose homologs are left out
    as training leaves them out; by default the piece is one if it is a whole training chunk (eval's pieces are cut
    as training cuts a genome).

    A piece is tokenized from its first base, and a last partial 6-mer is scored too: a base's probability is the
    probability of the 6-mer prefix it ends over the one before it, each a sum over the 6-mers that begin with it
    (prefix_log_probs), so the bases of a 6-mer multiply to the 6-mer's probability. Windows of context_size + 1
    tokens read a piece as training and validation do, each target scored once, in the window where it has the
    most context (covering_windows); windows of many pieces share a batch, and pieces come back in order."""
    cfg = inference.cfg
    width = cfg.prefix_tokens + cfg.context_size + 1
    chunk_of = chunk_of or (lambda key, codes: training_chunk(inference, codes))
    numbered = ((key, (codes, chunk_of(key, codes))) for key, codes in pieces)
    for key, (codes, _), windows in windowed(
            numbered, lambda piece: ((*window, piece[1]) for window in scoring_windows(piece[0], cfg)), width,
            batch_size, lambda rows, windows: window_base_log_probs(inference, rows, [w[3] for w in windows])):
        log_probs = np.full(len(codes), np.nan)
        for (_, start, owned, _), per_base in windows:
            targets = np.flatnonzero(owned)  # the window's t-th target is the piece's token start + 1 + t
            at = BASES_PER_TOKEN * (start + 1 + targets)[:, None] + np.arange(BASES_PER_TOKEN)
            inside = at < len(codes)  # the last 6-mer may be partial
            log_probs[at[inside]] = per_base[targets][inside]
        yield key, codes, log_probs


def scoring_windows(codes, cfg):
    """(row, start, owned) per window that scores a piece: row = its tokens from start - prefix_tokens to the window's
    end (-1 before the piece), owned = which of the window's targets it scores. The last 6-mer may be partial: its
    missing bases read as A and are never scored."""
    tokens = tokenize(np.concatenate([codes, np.zeros(-len(codes) % BASES_PER_TOKEN, np.uint8)])).astype(np.int64)
    for start, length, owned in covering_windows(len(tokens), cfg.context_size + 1, cfg.window_stride):
        if length > 1:
            row = np.concatenate([np.full(max(0, cfg.prefix_tokens - start), -1),
                                  tokens[max(0, start - cfg.prefix_tokens):start + length]])
            yield row, start, owned[1:]  # a window's first token is context only


def covering_windows(n, span, stride):
    """(start, length, owned) windows of at most `span` positions over positions 0..n-1, every position owned by
    exactly one: the first window owns all of its positions, each later one, `stride` further on, only those past
    the previous one's end, so most positions are read with span - stride positions before them. A last window sits
    flush with the end, so that no tail is left out."""
    if n <= span:
        return [(0, n, np.ones(n, dtype=bool))] if n else []
    starts = list(range(0, n - span + 1, stride))
    if starts[-1] + span < n:
        starts.append(n - span)
    windows, covered = [], 0
    for start in starts:
        windows.append((start, span, np.arange(start, start + span) >= covered))
        covered = start + span
    return windows


def training_chunk(inference, codes):
    """The number of the training chunk that this piece is (codes: BYTE_CODES or 0..3, cut as training cuts a
    genome: a chunk holds its whole 6-mers, a tail of fewer bases is not in the index), or -1 (also without
    neighbours)."""
    if inference.training_chunks is None:
        return -1
    return inference.training_chunks.get(chunk_digest(codes[:len(codes) - len(codes) % BASES_PER_TOKEN] & 3), -1)


@torch.no_grad()
def window_base_log_probs(inference, rows, chunks=None):
    """rows [B, prefix + T + 1] int64 token windows (-1 where there is none) -> [B, T, 6] float64 numpy: each target
    base's ln p given everything before it, in fp32 on every device (so that CPU and GPU scores agree). chunks:
    each row's training chunk (-1: none), whose homologs are left out."""
    model, cfg = inference.model, inference.cfg
    rows = rows.to(inference.device)
    inputs, targets = rows[:, cfg.prefix_tokens:-1].clamp_min(0), rows[:, cfg.prefix_tokens + 1:]
    targets = torch.where(targets >= 0, targets, -100)  # padding: right of every real token, so it changes none
    species = torch.full((len(rows),), inference.species_id, device=inference.device)
    # the counts of every target prefix, and the neighbours from the same search, as training reads them
    memory = memory_inputs(inference.retrieval_index, cfg, rows, False, chunk_numbers(chunks, rows.device),
                           target_bases=(0,) + TARGET_PREFIXES)
    neighbours = memory.get("neighbours")
    logits, hidden = model(inputs, species, neighbours=neighbours)
    log_p = prefix_log_probs(logits, targets, TARGET_PREFIXES)
    if "retrieval" in memory:
        log_p = model.mixed_log_probs(log_p, hidden, memory["retrieval"])
    if neighbours is not None:
        log_p = model.copied_log_probs(log_p, hidden, targets, TARGET_PREFIXES, neighbours[0],
                                       slot_features(inputs, *neighbours))
    return torch.diff(log_p, dim=-1, prepend=torch.zeros_like(log_p[..., :1])).double().cpu().numpy()


def window_neighbours(inference, rows, chunks=None):
    """SuffixIndex.neighbours of rows [B, prefix + T + 1] as training reads them (None unless global_memory =
    neighbours): a row's homologs in its own training chunk (chunks: each row's number, -1 or None for none) are
    left out, as training leaves them out, so that a training genome is not scored by copying itself."""
    if inference.cfg.global_memory != "neighbours":
        return None
    return inference.retrieval_index.neighbours(rows, inference.cfg.prefix_tokens, chunk_numbers(chunks, rows.device))


def chunk_numbers(chunks, device):
    """Rows' training chunk numbers (a list, a tensor or None) as neighbours() reads them."""
    return None if chunks is None else torch.as_tensor(chunks, dtype=torch.int64, device=device)


def windowed(pieces, windows_of, width, batch_size, score_batch):
    """For each (key, piece) of pieces, yields (key, piece, [(window, output) per window of windows_of(piece)]), in
    order, scoring the windows of many pieces in batches: score_batch(rows, windows) maps a batch of windows' rows (int64
    [B, width], each window's row padded on the right with -1) to one output per window, keeping only what the
    caller needs. Only unfinished pieces are held."""
    in_flight, batch = collections.deque(), []

    def flush_batch():
        rows = torch.full((len(batch), width), -1, dtype=torch.int64)
        for i, (_, window) in enumerate(batch):
            rows[i, :len(window[0])] = torch.from_numpy(window[0])
        for (entry, window), output in zip(batch, score_batch(rows, [window for _, window in batch])):
            entry.outstanding -= 1
            entry.results.append((window, output))
        batch.clear()

    def finished():
        while in_flight and in_flight[0].outstanding == 0:
            entry = in_flight.popleft()
            yield entry.key, entry.piece, entry.results

    for key, piece in pieces:
        entry = PieceInFlight(key, piece)
        in_flight.append(entry)
        for window in windows_of(piece):
            batch.append((entry, window))
            entry.outstanding += 1
            if len(batch) == batch_size:
                flush_batch()
                yield from finished()
        entry.outstanding -= 1  # all its windows are listed
    if batch:
        flush_batch()
    yield from finished()


@dataclass
class PieceInFlight:
    key: object
    piece: np.ndarray
    outstanding: int = 1  # windows not yet run, + 1 while they are still being listed
    results: list = field(default_factory=list)  # (window, output)


# ----------------------------------------------------------------------------- eval

def score_fasta(inference, paths, batch_size=64, progress=True, per_base=None):
    """Per-record and per-file log-likelihood of FASTA files, base by base (score_pieces), with the checkpoint's
    global memory. Every A/C/G/T run of at least 7 bases is scored (split at other letters, cut at chunk_size as in
    training); per_base, an open text file, receives the per-base bedGraph track."""
    from tqdm import tqdm
    cfg = inference.cfg
    results = []
    for path in paths:
        totals = {}  # (record index, record id) -> [log-likelihood, bases scored]
        stats = FileStats()
        chunks = chunk_file(path, "eval", path, cfg, stats=stats, min_bases=BASES_PER_TOKEN + 1)
        pieces = (((c.key, c.record_id), np.concatenate([token_bases(c.tokens), c.tail])) for c in chunks)
        bar = tqdm(desc=os.path.basename(path), unit=" bases", unit_scale=True,
                   disable=None if progress else True)  # None: a bar only on a terminal
        for (key, record_id), codes, log_probs in score_pieces(inference, pieces, batch_size):
            scored = ~np.isnan(log_probs)
            entry = totals.setdefault((key[2], record_id), [0.0, 0])
            entry[0] += float(log_probs[scored].sum())
            entry[1] += int(scored.sum())
            if per_base is not None:
                write_bedgraph(per_base, record_id, chunk_start(key, cfg), log_probs)
            bar.update(len(codes))
        bar.close()
        check_looks_like_dna(path, stats)
        results.append({"file": path, "records": {name: likelihood_summary(ll, n) for name, (ll, n) in
                                                   zip(distinct_names(totals), totals.values())},
                        **likelihood_summary(sum(ll for ll, _ in totals.values()), sum(n for _, n in totals.values())),
                        "bases_read": stats.bases, "non_acgt_removed": stats.non_acgt})
    return results


def distinct_names(records):
    """The names a table gives (0-based record number, record id) pairs: the id, or "id (record N)" where several
    records share it."""
    counts = collections.Counter(record_id for _, record_id in records)
    return [f"{record_id} (record {number + 1})" if counts[record_id] > 1 else record_id for number, record_id in records]


def likelihood_summary(log_likelihood, bases):
    """The figures reported per record, file and overall; bits/base is None where nothing was scored (0 would read as a
    perfect model)."""
    return {"bases_scored": bases, "log_likelihood": log_likelihood,
            "bits_per_base": -log_likelihood / (bases * math.log(2)) if bases else None}


def write_bedgraph(out, chrom, offset, log_probs):
    """One bedGraph line per scored base: chrom, 0-based start, end, ln p(base | the bases before it)."""
    at = np.flatnonzero(~np.isnan(log_probs))
    out.write("".join(f"{chrom}\t{offset + i}\t{offset + i + 1}\t{value:.6g}\n"
                      for i, value in zip(at.tolist(), log_probs[at].tolist())))


def eval_main(argv):
    parser = argparse.ArgumentParser(
        prog="plant_lm_infer.py eval",
        description="Log-likelihood and bits per base of a trained checkpoint on FASTA files, base by base: every "
                    "A/C/G/T run of at least 7 bases is scored, each base given the bases before it (the first 6 "
                    "bases of a run are context only).")
    add_inference_arguments(parser)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--per-base", metavar="OUT.bedGraph",
                        help="write the per-base track: ln p(base | the bases before it), in nats, one line per scored "
                             "base (bedGraph: record id, 0-based start, end, value)")
    parser.add_argument("fasta", nargs="+", help="FASTA files, optionally gzipped")
    args = parser.parse_args(argv)
    for path in args.fasta:
        check_input_file(path, "the FASTA files in it")
    for path in filter(None, (args.json, args.per_base)):
        check_output_path(path)
    inference = load_for_inference(args.checkpoint, args.species, args.device, warn=print_to_stderr)
    with open(args.per_base, "w") if args.per_base else contextlib.nullcontext() as per_base:
        if per_base is not None:
            per_base.write(f'track type=bedGraph name="Plant LM" description="ln p(base | bases before it), nats, '
                           f'{os.path.basename(args.checkpoint)}, species {args.species}"\n')
        results = score_fasta(inference, args.fasta, args.batch_size, per_base=per_base)
    print(f"{'file / record':60s} {'bases scored':>14s} {'log-lik (nats)':>16s} {'bits/base':>10s}")
    for result in results:
        for record, r in result["records"].items():
            print(summary_line("  " + record, r))
        print(summary_line(os.path.basename(result["file"]), result))
        if not result["bases_scored"]:
            print_to_stderr(f"warning: {result['file']}: nothing scored: no A/C/G/T run of at least "
                            f"{BASES_PER_TOKEN + 1} bases ({result['bases_read']:,} bases read, "
                            f"{result['non_acgt_removed']:,} non-ACGT removed)")
    overall = likelihood_summary(sum(r["log_likelihood"] for r in results), sum(r["bases_scored"] for r in results))
    if not overall["bases_scored"]:
        raise DataError(f"nothing to score in {', '.join(args.fasta)}: eval needs A/C/G/T runs of at least "
                        f"{BASES_PER_TOKEN + 1} bases (one 6-mer of context and a base to predict)")
    print(summary_line("overall", overall))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "species": args.species, "files": results, **overall}, f,
                      indent=1)
    return overall


def summary_line(name, figures):
    bits = "-" if figures["bits_per_base"] is None else f"{figures['bits_per_base']:.4f}"
    return f"{name[:60]:60s} {figures['bases_scored']:14,d} {figures['log_likelihood']:16.2f} {bits:>10s}"


def add_inference_arguments(parser):
    """The arguments every inference subcommand takes."""
    parser.add_argument("--checkpoint", required=True, help="a model_*.pt written by training")
    parser.add_argument("--species", required=True,
                        help="species name known to the checkpoint, or 'average' for the mean species embedding")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="windows per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")


def check_output_path(path):
    """Before any work: an output's folder must exist and be writable, so that a long run does not end in a lost
    result."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise DataError(f"{path}: cannot write here: {folder} " +
                        ("is not writable" if os.path.isdir(folder) else "does not exist"))
    if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DataError(f"{path}: cannot write here: " + ("a directory" if os.path.isdir(path) else "not writable"))


def check_input_file(path, hint):
    if not os.path.isfile(path):
        raise DataError(f"{path}: " + (f"a directory; give {hint}" if os.path.isdir(path) else "no such file"))


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not a positive integer")
    return value


def print_to_stderr(message):
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- variants

@dataclass(slots=True)  # a VCF can hold millions
class Allele:
    """One ALT allele of a VCF record, and its score or the reason it has none."""
    chrom: str
    pos: int  # 1-based, as in the VCF
    id: str
    ref: str
    alt: str
    llr: float = math.nan
    note: str = None  # why it is not scored; None while it may be


def variants_main(argv):
    parser = argparse.ArgumentParser(
        prog="plant_lm_infer.py variants",
        description="Zero-shot scores of the SNVs of a VCF: the log-likelihood ratio log P(alt) - log P(ref), in "
                    "nats, of the sequence around each, over every 6-mer whose prediction the change can affect, "
                    "averaged over the 6 token frames and both strands. Negative: the model finds the ALT allele "
                    "less likely than the reference. One row per ALT allele; indels, non-ACGT alleles and a REF that "
                    "disagrees with the FASTA get NA and the reason.")
    add_inference_arguments(parser)
    parser.add_argument("--fasta", required=True, help="the reference genome (FASTA, optionally gzipped)")
    parser.add_argument("--vcf", required=True, help="the variants (VCF or VCF.gz)")
    parser.add_argument("--out", required=True, help="the scores, a tab-separated table")
    args = parser.parse_args(argv)
    check_input_file(args.fasta, "the reference FASTA file")
    check_input_file(args.vcf, "the VCF file")
    check_output_path(args.out)
    inference = load_for_inference(args.checkpoint, args.species, args.device, warn=print_to_stderr)
    alleles = read_vcf_alleles(args.vcf)
    score_alleles(inference, args.fasta, alleles, args.batch_size)
    write_variant_table(args.out, alleles)
    reasons = collections.Counter(a.note for a in alleles if a.note is not None)
    print_to_stderr(f"{len(alleles) - sum(reasons.values()):,} of {len(alleles):,} ALT alleles scored, in {args.out}")
    for reason, n in reasons.most_common():
        print_to_stderr(f"  not scored: {n:,} x {reason}")
    return alleles


def read_vcf_alleles(path):
    """One Allele per ALT allele of every VCF record (cyvcf2, which reads VCF and VCF.gz); the ones that are not SNVs
    of A/C/G/T carry the reason. A record htslib cannot parse is an error naming its line."""
    from cyvcf2 import VCF
    line = check_vcf_columns(path)
    try:
        vcf = VCF(path)
    except Exception as e:  # OSError, or a bare Exception for a header htslib rejects
        raise DataError(f"{path}: not a readable VCF ({e})") from e
    records, alleles = iter(vcf), []
    while True:
        line += 1
        try:
            record = next(records)
        except StopIteration:
            break
        except Exception as e:  # cyvcf2 raises a bare Exception for a record htslib rejects
            raise DataError(f"{path}: line {line}: not a valid VCF record ({e})") from e
        for alt in record.ALT or ["."]:
            alleles.append(Allele(record.CHROM, record.POS, record.ID or ".", record.REF, alt,
                                  note=snv_problem(record.REF, alt)))
    vcf.close()
    return alleles


def check_vcf_columns(path):
    """The number of header lines of a VCF, after checking that every record has the 8 tab-separated columns and a
    whole-number POS: htslib crashes the process on some malformed records instead of raising."""
    header = 0
    for number, raw in text_lines(path):
        if raw.startswith(b"#"):
            header = number
            continue
        fields = raw.rstrip(b"\r\n").split(b"\t")
        if len(fields) < 8 or not fields[1].isdigit():
            raise DataError(f"{path}: line {number}: not a VCF record (8 or more tab-separated columns, POS a "
                            f"whole number); found {raw[:80].decode('utf-8', 'replace').rstrip()!r}")
    return header


def text_lines(path):
    """(line number, bytes) of a text file, gzipped or not; a damaged file is an error naming it."""
    try:
        with open_genome(path) as f:
            yield from enumerate(f, 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def snv_problem(ref, alt):
    """Why a VCF allele is not scored as an SNV, or None."""
    if alt == ".":
        return "no ALT allele"
    if alt.startswith("<") or "[" in alt or "]" in alt:
        return "symbolic or breakend ALT allele"
    if len(ref) != 1 or len(alt) != 1:
        return "indel or multi-base substitution: only SNVs are scored"
    if ref.upper() not in "ACGT" or alt.upper() not in "ACGT":
        return "non-ACGT allele"
    if ref.upper() == alt.upper():
        return "ALT equals REF"
    return None


def score_alleles(inference, fasta, alleles, batch_size=64):
    """Score every SNV of alleles in place (llr), reading the reference one record at a time, only the records that
    have variants: memory is one chromosome."""
    from tqdm import tqdm
    by_contig = collections.defaultdict(list)
    for allele in alleles:
        if allele.note is None:
            by_contig[allele.chrom].append(allele)
    bar = tqdm(total=sum(map(len, by_contig.values())), unit=" variants", disable=None)
    for record_id, codes in read_records(fasta, set(by_contig)):
        score_contig_snvs(inference, codes, by_contig.pop(record_id), batch_size, bar)
    bar.close()
    for contig, missing in by_contig.items():
        for allele in missing:
            allele.note = f"contig {contig} is not in {os.path.basename(fasta)}"


def read_records(path, wanted):
    """(record id, BYTE_CODES of the whole record) for each record of a FASTA file whose id is in wanted (None:
    every record), one at a time, in file order. A reference must name its records uniquely: a second record with a
    wanted id is an error, as is a record that looks like protein."""
    seen, current_index, current_id, parts = set(), None, None, None
    for record_index, record_id, piece in read_fasta(path):
        if record_index != current_index:
            if parts is not None:
                yield current_id, record_codes(path, current_id, parts)
            if wanted is not None and record_id in wanted and record_id in seen:
                raise DataError(f"{path}: two records are named {record_id}: a reference needs unique record ids")
            seen.add(record_id)
            current_index, current_id = record_index, record_id
            parts = [] if wanted is None or record_id in wanted else None
        if parts is not None:
            parts.append(piece)
    if parts is not None:
        yield current_id, record_codes(path, current_id, parts)


def record_codes(path, record_id, parts):
    """The BYTE_CODES of a record's pieces; an error naming it when it looks like protein (check_looks_like_dna,
    per record)."""
    text = b"".join(parts)
    codes = BYTE_CODES[np.frombuffer(text, dtype=np.uint8)]
    check_looks_like_dna(f"{path}: record {record_id}",
                         FileStats(bases=len(text), other_letters=other_letters(text, codes), records=1))
    return codes


def score_contig_snvs(inference, codes, alleles, batch_size, bar):
    """The LLRs of one chromosome's SNVs (codes: BYTE_CODES of the record). Each site's pieces (site_pieces: every
    placement of a window around it, on both strands) are scored with the reference base and with each ALT base; a
    piece's difference is the summed per-base log-likelihood from the variant on (the bases before it are the same).
    An allele's LLR is the mean over each strand's pieces, then over the two strands."""
    sites = collections.defaultdict(list)
    for allele in alleles:
        at = allele.pos - 1
        base = codes[at] if 0 <= at < len(codes) else None
        if base is None:
            allele.note = f"position {allele.pos:,} is outside {allele.chrom} ({len(codes):,} bases)"
        elif base >= 8:
            allele.note = "the reference base is not A/C/G/T"
        elif "ACGT"[base & 3] != allele.ref.upper():
            allele.note = f"REF {allele.ref} does not match the reference base {'ACGT'[base & 3]}"
        else:
            sites[at].append(allele)
    for at in [at for at in sites if np.diff(acgt_stretch(codes, at, inference.cfg))[0] <= BASES_PER_TOKEN]:
        for allele in sites.pop(at):  # a run of 6 bases or fewer holds nothing to score (site_pieces is empty)
            allele.note = f"fewer than {BASES_PER_TOKEN + 1} A/C/G/T bases around the site"
    bar.update(len(alleles) - sum(map(len, sites.values())))
    sums, strands = {}, {}  # (site, allele number: 0 = reference) -> per piece, the log-likelihood from the variant
    # on; site -> per piece, on the reverse strand? (pieces are made as they are scored: memory is a batch's worth)

    def pieces():
        for at, site_alleles in sites.items():
            alts = [BYTE_CODES[ord(a.alt)] & 3 for a in site_alleles]
            site = site_pieces(codes, at, inference.cfg)
            strands[at] = np.array([reverse for _, _, reverse in site])
            for number, (piece, variant, reverse) in enumerate(site):
                yield (at, 0, number, variant), piece
                for allele_number, base in enumerate(alts, 1):
                    changed = piece.copy()
                    changed[variant] = 3 - base if reverse else base
                    yield (at, allele_number, number, variant), changed

    chunks = site_chunks(inference, codes, sites)
    for (at, allele_number, number, variant), _, log_probs in score_pieces(
            inference, pieces(), batch_size, chunk_of=lambda key, _: chunks[key[0]]):
        sums.setdefault((at, allele_number), np.zeros(len(strands[at])))[number] = np.nansum(log_probs[variant:])
        site_alleles = sites[at]
        if allele_number == len(site_alleles) and number == len(strands[at]) - 1:  # the site's last piece
            reverse = strands.pop(at)
            reference = sums.pop((at, 0))
            for n, allele in enumerate(site_alleles, 1):
                difference = sums.pop((at, n)) - reference
                allele.llr = float(np.mean([difference[reverse == r].mean() for r in (False, True)
                                            if (reverse == r).any()]))
            bar.update(len(site_alleles))


def site_chunks(inference, codes, sites):
    """{site: the training chunk of the record's piece that holds it (training_chunk; -1: none)}, the record (codes:
    BYTE_CODES) cut as training cuts it: a reference the model was trained on is not scored by copying itself."""
    if inference.training_chunks is None:
        return dict.fromkeys(sites, -1)
    cuts = np.array(chunk_cuts(codes, inference.cfg), dtype=np.int64).reshape(-1, 2)
    by_cut, chunks = {}, {}
    for at in sites:
        start, end = cuts[np.searchsorted(cuts[:, 0], at, side="right") - 1]
        if start not in by_cut:
            by_cut[start] = training_chunk(inference, codes[start:end])
        chunks[at] = by_cut[start]
    return chunks


def chunk_cuts(codes, cfg):
    """(start, end) of the pieces training cuts a record into (codes: BYTE_CODES): its A/C/G/T runs, each cut every
    chunk_size bases."""
    return [(start, min(start + cfg.chunk_size, end)) for run_start, end in acgt_segments(codes).tolist()
            for start in range(run_start, end, cfg.chunk_size)]


def site_pieces(codes, at, cfg):
    """The pieces that score a SNV at `at`, each (base codes 0..3, the variant's index in it, on the reverse
    strand?): on each strand, read 5' to 3', every distinct window_placements region of at least 7 bases, the
    reverse strand's placed in its own frames (the run mirrored). Far from a gap, 6 per strand, one per frame."""
    run_start, run_end = acgt_stretch(codes, at, cfg)
    mirror = run_start + run_end - 1  # x -> mirror - x maps the run onto itself, reversed
    pieces = []
    for reverse, site in ((False, at), (True, mirror - at)):
        for start, end in dict.fromkeys(window_placements(site, run_start, run_end, cfg)):  # distinct, in order
            if end - start <= BASES_PER_TOKEN:  # nothing after the first 6-mer: nothing scored
                continue
            piece = 3 - (codes[mirror - end + 1:mirror - start + 1] & 3)[::-1] if reverse else codes[start:end] & 3
            pieces.append((piece, site - start, reverse))
    return pieces


def acgt_stretch(codes, at, cfg):
    """(start, end) of the run of A/C/G/T around `at`, as far as a placement can reach (a model window each way)."""
    span = (cfg.context_size + 1) * BASES_PER_TOKEN
    low = max(0, at - span)
    gaps = np.flatnonzero(codes[low:at] >= 8)
    run_start = low + int(gaps[-1]) + 1 if len(gaps) else low
    gaps = np.flatnonzero(codes[at:at + span] >= 8)
    return run_start, at + (int(gaps[0]) if len(gaps) else len(codes[at:at + span]))


def window_placements(site, run_start, run_end, cfg):
    """(start, end) of the 6 regions around a site in a run [run_start, run_end), one per token frame: in frame f the
    variant is base f of its 6-mer, with context_size // 2 whole 6-mers before it and the rest of one model window
    (65 6-mers) after it, clipped to the run. Near the run's start a region keeps its frame while the variant lies
    past the run's first f bases. The window is the model's: every 6-mer after the variant in it is scored."""
    span = (cfg.context_size + 1) * BASES_PER_TOKEN
    before = cfg.context_size // 2 * BASES_PER_TOKEN
    regions = []
    for frame in range(BASES_PER_TOKEN):
        start = site - frame - before
        if start < run_start:
            start = run_start + (site - frame - run_start) % BASES_PER_TOKEN if site - frame >= run_start else run_start
        regions.append((start, min(start + span, run_end)))
    return regions


def write_variant_table(path, alleles):
    with open(path, "w") as f:
        f.write("chrom\tpos\tid\tref\talt\tllr\tnote\n")
        for a in alleles:
            llr = "NA" if a.note is not None else f"{a.llr:.6f}"
            f.write(f"{a.chrom}\t{a.pos}\t{a.id}\t{a.ref}\t{a.alt}\t{llr}\t{a.note or '.'}\n")


# ----------------------------------------------------------------------------- embeddings

@dataclass
class Region:
    """One BED line's region of the reference."""
    name: str
    chrom: str
    start: int
    end: int
    reverse: bool
    line: int  # the BED line, for error messages


def embed_main(argv):
    parser = argparse.ArgumentParser(
        prog="plant_lm_infer.py embed",
        description="Embeddings of DNA regions: the final hidden states of the checkpoint's model, mean-pooled over "
                    "each region's 6-mers (and per 6-mer with --per-token), written to an .npz file with the region "
                    "names. Regions are the records of a FASTA file, or the lines of a BED file in --fasta.")
    add_inference_arguments(parser)
    parser.add_argument("--out", required=True, help="the embeddings, an .npz file (numpy.load, no pickle)")
    parser.add_argument("--bed", help="regions of --fasta: chrom, 0-based start, end, optional name, score and "
                                      "strand ('-' embeds the reverse complement)")
    parser.add_argument("--fasta", help="the reference genome that --bed refers to")
    parser.add_argument("--per-token", action="store_true",
                        help="also write every 6-mer's hidden state (token_embeddings, token_offsets, token_starts)")
    parser.add_argument("regions", nargs="?", help="a FASTA file: each record is a region (instead of --bed)")
    args = parser.parse_args(argv)
    if (args.bed is None) == (args.regions is None) or (args.bed is None) != (args.fasta is None):
        parser.error("give either a FASTA file of regions, or --bed REGIONS with --fasta REF")
    for path in filter(None, (args.bed, args.fasta, args.regions)):
        check_input_file(path, "a file")
    check_output_path(args.out)
    inference = load_for_inference(args.checkpoint, args.species, args.device, warn=print_to_stderr, scoring=False)
    regions = read_bed(args.bed) if args.bed else None
    sequences = bed_sequences(args.fasta, args.bed, regions) if args.bed else \
        (((number, record_id), codes) for number, (record_id, codes) in enumerate(read_records(args.regions, None)))
    found = {}  # region number -> (name, mean, 6-mers, per-token hidden states and their starts or None)
    from tqdm import tqdm
    for (number, name), *embedded in tqdm(embed_regions(inference, sequences, args.batch_size, args.per_token),
                                          unit=" regions", total=len(regions) if regions else None, disable=None):
        found[number] = (name, *embedded)
    if not found:
        raise DataError(f"{args.bed or args.regions}: no regions: " +
                        ("no BED lines" if args.bed else "no FASTA records"))
    names, pooled, n_tokens, hidden, starts = zip(*(found[number] for number in sorted(found)))  # input order
    if not args.bed:  # FASTA records that share an id are told apart by their number, as eval does
        names = distinct_names(list(enumerate(names)))
    empty = [name for name, n in zip(names, n_tokens) if not n]
    if empty:
        print_to_stderr(f"warning: {len(empty)} region(s) hold no 6-mer of A/C/G/T ({', '.join(empty[:3])}"
                        f"{', ...' if len(empty) > 3 else ''}): their embedding is nan")
    arrays = {"names": np.array(names, dtype=str), "embeddings": np.stack(pooled),
              "n_tokens": np.array(n_tokens, dtype=np.int64)}
    if args.per_token:
        arrays["token_embeddings"] = np.concatenate(hidden)
        arrays["token_offsets"] = np.concatenate([[0], np.cumsum(arrays["n_tokens"])])
        arrays["token_starts"] = np.concatenate(starts)
    write_atomically(args.out, arrays, save=lambda arrays, f: np.savez(f, **arrays), what="embeddings file")
    print_to_stderr(f"{len(names):,} region embeddings ({inference.cfg.d_model} values each) in {args.out}")
    return arrays


def embed_regions(inference, sequences, batch_size=64, per_token=False):
    """For each (key, codes) of sequences (BYTE_CODES), yields (key, mean [d_model] float32, 6-mers, hidden, starts):
    the mean of the final hidden states at the region's 6-mers (nan without one) and their number, and with
    per_token the states themselves [n, d_model] and each 6-mer's offset in the region [n] (else None). The region
    is read as training reads a genome: split into A/C/G/T runs, cut at chunk_size, each piece tokenized from its
    start (a last partial 6-mer dropped). A 6-mer's state is read in the window where it has the most context
    (covering_windows), as scoring reads its prediction. Memory: one piece's states, unless per_token."""
    cfg = inference.cfg

    def pieces():  # ((key, offset in the region, the region's last piece?), codes); an empty one for an empty region
        for key, codes in sequences:
            cuts = chunk_cuts(codes, cfg)
            for i, (start, end) in enumerate(cuts or [(0, 0)]):
                yield (key, start, i == max(len(cuts), 1) - 1), codes[start:end]

    def windows_of(codes):  # each row carries prefix_tokens of the piece before its window, as training's do
        tokens = tokenize(codes).astype(np.int64)
        for start, length, owned in covering_windows(len(tokens), cfg.context_size, cfg.window_stride):
            yield np.concatenate([np.full(max(0, cfg.prefix_tokens - start), -1),
                                  tokens[max(0, start - cfg.prefix_tokens):start + length]]), start, owned

    def run(rows, windows):  # only the rows each window owns leave the batch
        hidden = window_hidden_states(inference, rows)
        return [h[:len(owned)][owned] for h, (_, _, owned) in zip(hidden, windows)]

    total, count, kept, starts = np.zeros(cfg.d_model), 0, [], []
    width = cfg.prefix_tokens + cfg.context_size
    for (key, offset, last), _, windows in windowed(pieces(), windows_of, width, batch_size, run):
        for (_, start, owned), hidden in windows:
            total += hidden.sum(0, dtype=np.float64)
            count += len(hidden)
            if per_token:
                kept.append(hidden)
                starts.append(offset + BASES_PER_TOKEN * (start + np.flatnonzero(owned)))
        if last:
            mean = (total / count if count else np.full(cfg.d_model, np.nan)).astype(np.float32)
            yield (key, mean, count,
                   np.concatenate(kept or [np.zeros((0, cfg.d_model), np.float32)]) if per_token else None,
                   np.concatenate(starts or [np.zeros(0, np.int64)]).astype(np.int64) if per_token else None)
            total, count, kept, starts = np.zeros(cfg.d_model), 0, [], []


@torch.no_grad()
def window_hidden_states(inference, rows):
    """rows [B, prefix + T] int64 (-1 where there is no token) -> the final hidden states at the T tokens after the
    prefix [B, T, d_model], float32 numpy."""
    rows = rows.to(inference.device)
    species = torch.full((len(rows),), inference.species_id, device=inference.device)
    # neighbours are looked up per target: a -1 target after the last token makes each of the T tokens an input
    neighbours = window_neighbours(inference, torch.cat([rows, rows.new_full((len(rows), 1), -1)], 1))
    _, hidden = inference.model(rows[:, inference.cfg.prefix_tokens:].clamp_min(0), species, neighbours=neighbours)
    return hidden.float().cpu().numpy()


def read_bed(path):
    """The regions of a BED file (plain or gzipped), checked line by line; an error names the line."""
    regions = []
    for number, raw in text_lines(path):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 3:
            raise DataError(f"{path}: line {number}: a BED line needs chrom, start and end; found {line[:80]!r}")
        try:
            start, end = int(fields[1]), int(fields[2])
        except ValueError:
            raise DataError(f"{path}: line {number}: start and end must be whole numbers; found "
                            f"{fields[1]!r} and {fields[2]!r}") from None
        if not 0 <= start < end:
            raise DataError(f"{path}: line {number}: needs 0 <= start < end; found start {start}, end {end}")
        strand = fields[5] if len(fields) > 5 else "+"
        if strand not in ("+", "-", "."):
            raise DataError(f"{path}: line {number}: strand must be +, - or .; found {strand!r}")
        name = fields[3] if len(fields) > 3 and fields[3] not in ("", ".") else f"{fields[0]}:{start}-{end}"
        regions.append(Region(name, fields[0], start, end, strand == "-", number))
    return regions


def bed_sequences(fasta, bed, regions):
    """((region number, name), BYTE_CODES) of each BED region, in the reference's order, reading it one record at a
    time."""
    by_chrom = collections.defaultdict(list)
    for number, region in enumerate(regions):
        by_chrom[region.chrom].append(number)
    for record_id, codes in read_records(fasta, set(by_chrom)):
        for number in by_chrom.pop(record_id):
            region = regions[number]
            if region.end > len(codes):
                raise DataError(f"{bed}: line {region.line}: end {region.end:,} is past the end of {record_id} "
                                f"({len(codes):,} bases)")
            piece = codes[region.start:region.end]
            yield (number, region.name), reverse_complement_codes(piece) if region.reverse else piece
    if by_chrom:
        chrom, numbers = next(iter(by_chrom.items()))
        raise DataError(f"{bed}: line {regions[numbers[0]].line}: {chrom} is not a record of {fasta}")


def reverse_complement_codes(codes):
    """BYTE_CODES of the reverse strand: reversed, each base complemented (3 - base, soft-masking kept)."""
    reverse = codes[::-1]
    return np.where(reverse < 8, (reverse & 4) | (3 - (reverse & 3)), reverse).astype(np.uint8)


# ----------------------------------------------------------------------------- entry point

USAGE = __doc__.split("\n\n")[1]
SUBCOMMANDS = {"eval": eval_main, "variants": variants_main, "embed": embed_main}


def main(argv):
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage:\n{USAGE}\nEach subcommand's --help says more.", file=sys.stderr if argv[:1] not in
              (["-h"], ["--help"], ["help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"], ["help"]) else 2
    try:
        SUBCOMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError) as e:  # ours, with a message that names the file or field; the rest are bugs
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

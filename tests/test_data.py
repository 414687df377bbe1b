"""Tests of the data section of plant_lm_train.py: tokenizing, FASTA streaming, chunking, sampling, splits.

Synthetic genomes are seeded random DNA (tests/_helpers.py) in the data tests' tiny Config (DATA_SHAPE: 9-token
windows, 600-base chunks); the real-data tests read the bundled genomes ($PLANT_LM_REAL_DATA or <repo>/data) and
fail, rather than skip, when they are missing.
"""

import collections
import dataclasses
import functools
import gc
import gzip
import os
import re
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import plant_lm_train as plm
from _helpers import (DATA_SHAPE, detokenize, loader_batches, parse_with_biopython, random_dna, repeat_flags, reverse_complement,
                      tiny_config, write_fasta)
from plant_lm_train import BASES_PER_TOKEN

TAIR10_BASES = 30_427_671
ACGT_RUN = re.compile("[ACGTacgt]+")


# ----------------------------------------------------------------------------- helpers

def codes_of(seq):
    return plm.BYTE_CODES[np.frombuffer(seq.encode(), dtype=np.uint8)]


def kmer_index(kmer):
    """The spec's formula, in plain Python: sum b_i * 4^(5-i) with A=0 C=1 G=2 T=3."""
    return sum("ACGT".index(b) * 4 ** (BASES_PER_TOKEN - 1 - i) for i, b in enumerate(kmer.upper()))


def tokens_of(seq):
    return plm.tokenize(codes_of(seq))


def read_records(path, block_size=1 << 22):
    """read_fasta's output regrouped: [(record_index, record_id, sequence str)] in file order."""
    records = []
    for index, record_id, piece in plm.read_fasta(path, block_size=block_size):
        if not records or records[-1][0] != index:
            records.append((index, record_id, []))
        records[-1][2].append(piece)
    return [(i, rid, b"".join(pieces).decode()) for i, rid, pieces in records]


def chunks_of(path, cfg, species="s", label="f", wanted=None, stats=None):
    return list(plm.chunk_file(str(path), species, label, cfg, wanted=wanted, stats=stats))


def reference_chunks(sequences, cfg, species="s", label="f"):
    """What chunk_file must produce, computed independently with a regex over whole record sequences:
    [(key, tokens list, repeat list)] for records given as a list of sequence strings (index = record index)."""
    expected = []
    for record_index, seq in enumerate(sequences):
        for run in ACGT_RUN.finditer(seq):
            start, length = run.start(), len(run.group())
            chunk_index = 0
            for offset in range(0, length, cfg.chunk_size):
                bases = seq[start + offset:start + min(offset + cfg.chunk_size, length)]
                if len(bases) < cfg.window_bases:
                    continue
                bases = bases[:len(bases) // BASES_PER_TOKEN * BASES_PER_TOKEN]
                lower = np.array([b.islower() for b in bases]).reshape(-1, BASES_PER_TOKEN).sum(1) >= 3
                expected.append(((species, label, record_index, start, chunk_index), tokens_of(bases).tolist(),
                                 lower.tolist()))
                chunk_index += 1
    return expected


def window_rows(tokens, cfg):
    """Every window of one chunk's tokens, as tuples."""
    span = cfg.context_size + 1
    return [tuple(int(t) for t in tokens[s:s + span])
            for s in plm.window_starts(len(tokens), cfg.context_size, cfg.window_stride)]


def full_chunks(index, species, cfg):
    """key -> Chunk with tokens for every chunk of a species, read directly with chunk_file(wanted=None)."""
    out = {}
    for path, label in index.files[species]:
        for chunk in plm.chunk_file(path, species, label, cfg, wanted=None):
            out[chunk.key] = chunk
    return out


# ----------------------------------------------------------------------------- tokenize / detokenize

@pytest.mark.parametrize("kmer, expected", [
    ("AAAAAA", 0), ("AAAAAC", 1), ("AAAAAG", 2), ("AAAAAT", 3), ("AAAACA", 4), ("CAAAAA", 1024),
    ("TTTTTT", 4095), ("ACGTAC", 433), ("GATTCA", 2 * 1024 + 0 * 256 + 3 * 64 + 3 * 16 + 1 * 4 + 0),
])
def test_tokenize_known_6mer_ids(kmer, expected):
    assert kmer_index(kmer) == expected
    assert tokens_of(kmer).tolist() == [expected]


def test_tokenize_is_the_place_value_formula_on_a_long_sequence():
    seq = random_dna(6 * 2000, seed=1)
    tokens = tokens_of(seq)
    assert tokens.shape == (2000,)
    assert tokens.tolist() == [kmer_index(seq[i:i + BASES_PER_TOKEN]) for i in range(0, len(seq), BASES_PER_TOKEN)]
    assert int(tokens.max()) < plm.VOCAB_SIZE


@pytest.mark.parametrize("extra", range(BASES_PER_TOKEN))
def test_tokenize_drops_trailing_partial_kmer(extra):
    seq = random_dna(6 * 5 + extra, seed=2)
    assert tokens_of(seq).tolist() == tokens_of(seq[:30]).tolist()
    assert len(tokens_of(seq[:extra])) == 0


def test_detokenize_round_trips_tokenize():
    seq = random_dna(6 * 50, seed=3)
    assert detokenize(tokens_of(seq)) == seq
    assert detokenize(np.array([0, 1, 433, 4095])) == "AAAAAA" + "AAAAAC" + "ACGTAC" + "TTTTTT"


def test_lowercase_bases_tokenize_like_uppercase():
    seq = random_dna(6 * 40, seed=4)
    assert tokens_of(seq.lower()).tolist() == tokens_of(seq).tolist()
    mixed = "".join(c.lower() if i % 3 else c for i, c in enumerate(seq))
    assert tokens_of(mixed).tolist() == tokens_of(seq).tolist()


def test_repeat_flag_marks_kmers_with_at_least_3_lowercase_bases(tmp_path):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    lowercase_counts = [6, 5, 4, 3, 2, 1, 0, 3, 0, 6, 2]  # 11 tokens >= one 9-token window
    rng = np.random.default_rng(5)
    seq = ""
    for i, n_lower in enumerate(lowercase_counts):
        kmer = list(random_dna(BASES_PER_TOKEN, seed=100 + i))
        for at in rng.choice(BASES_PER_TOKEN, size=n_lower, replace=False):
            kmer[at] = kmer[at].lower()
        seq += "".join(kmer)
    path = write_fasta(tmp_path / "r.fa", [("r", seq)])
    (chunk,) = chunks_of(path, cfg)
    assert repeat_flags(chunk).tolist() == [n >= 3 for n in lowercase_counts]
    assert chunk.tokens.tolist() == tokens_of(seq.upper()).tolist()


# ----------------------------------------------------------------------------- splitting at non-ACGT

def test_acgt_segments_are_maximal_acgt_runs_of_any_case():
    assert plm.acgt_segments(codes_of("ACGTNNacgRYT")).tolist() == [[0, 4], [6, 9], [11, 12]]
    assert plm.acgt_segments(codes_of("NNN")).shape == (0, 2)
    assert plm.acgt_segments(codes_of("")).shape == (0, 2)
    assert plm.acgt_segments(codes_of("acgtACGT")).tolist() == [[0, 8]]


@pytest.mark.parametrize("gap", ["N", "n", "NNNNN", "R", "Y", "k", "-", "*", "7", ".", "X"])
def test_non_acgt_character_splits_the_sequence(tmp_path, gap):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    left, right = random_dna(203, seed=6), random_dna(300, seed=7)
    path = write_fasta(tmp_path / "g.fa", [("r", left + gap + right)], line_width=None)
    stats = plm.FileStats()
    chunks = chunks_of(path, cfg, stats=stats)
    right_start = len(left) + len(gap)
    assert [c.key for c in chunks] == [("s", "f", 0, 0, 0), ("s", "f", 0, right_start, 0)]
    assert chunks[0].tokens.tolist() == tokens_of(left[:198]).tolist()
    assert chunks[1].tokens.tolist() == tokens_of(right).tolist()
    assert stats.non_acgt == len(gap)
    assert stats.dropped_short == 203 - 198


def test_no_chunk_contains_bases_from_both_sides_of_a_gap(tmp_path):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    p = [0.22] * 4 + [0.03, 0.03, 0.02, 0.02, 0.02, 0.02]
    seq = random_dna(30_000, seed=8, alphabet="ACGTNRY-n*", p=np.array(p) / sum(p))
    seq = seq[:5000] + random_dna(2000, seed=9) + seq[5000:]  # at least one run longer than a chunk
    path = write_fasta(tmp_path / "g.fa", [("r", seq)], line_width=61)
    runs = {m.start(): m.end() for m in ACGT_RUN.finditer(seq)}
    chunks = chunks_of(path, cfg)
    assert chunks
    for chunk in chunks:
        _, _, _, segment_start, chunk_index = chunk.key
        first = segment_start + chunk_index * cfg.chunk_size
        last = first + chunk.n_tokens * BASES_PER_TOKEN
        assert segment_start in runs, f"{chunk.key} does not start at an A/C/G/T run"
        assert last <= runs[segment_start], f"{chunk.key} runs past the end of its A/C/G/T run"
        assert chunk.tokens.tolist() == tokens_of(seq[first:last]).tolist()


def test_segments_shorter_than_a_window_are_dropped_and_counted(tmp_path):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    assert cfg.window_bases == 54
    parts = [random_dna(300, seed=10), random_dna(48, seed=11), random_dna(53, seed=12), random_dna(54, seed=13)]
    path = write_fasta(tmp_path / "g.fa", [("r", "N".join(parts))])
    stats = plm.FileStats()
    chunks = chunks_of(path, cfg, stats=stats)
    assert [c.key[3] for c in chunks] == [0, 300 + 1 + 48 + 1 + 53 + 1]
    assert [c.n_tokens for c in chunks] == [50, 9]
    assert stats.dropped_short == 48 + 53
    assert stats.acgt_bases == stats.used_bases + stats.dropped_short
    assert stats.non_acgt == 3


@pytest.mark.parametrize("length, n_tokens", [(1530, [100, 100, 55]), (1230, [100, 100]), (1200, [100, 100])])
def test_chunks_hold_chunk_size_bases_and_start_at_their_first_base(tmp_path, length, n_tokens):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    seq = "NN" + random_dna(length, seed=14) + "N"
    path = write_fasta(tmp_path / "g.fa", [("r", seq)], line_width=50)
    stats = plm.FileStats()
    chunks = chunks_of(path, cfg, stats=stats)
    assert [c.key for c in chunks] == [("s", "f", 0, 2, k) for k in range(len(n_tokens))]
    assert [c.n_tokens for c in chunks] == n_tokens
    for k, chunk in enumerate(chunks):
        first = 2 + k * cfg.chunk_size
        assert chunk.tokens.tolist() == tokens_of(seq[first:first + BASES_PER_TOKEN * chunk.n_tokens]).tolist()
        assert len(repeat_flags(chunk)) == chunk.n_tokens
    assert stats.dropped_short == length - BASES_PER_TOKEN * sum(n_tokens)


@pytest.mark.parametrize("block_size", [3, 7, 64, 1 << 22])
def test_chunk_file_matches_a_regex_reference_at_any_read_block_size(tmp_path, monkeypatch, block_size):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    p = np.array([0.2] * 4 + [0.04] * 4 + [0.02, 0.01, 0.01, 0.01, 0.01])
    records = [random_dna(n, seed=20 + i, alphabet="ACGTacgtNRY-n", p=p / p.sum())
               for i, n in enumerate([4000, 0, 1800])]
    records[0] = records[0][:1000] + random_dna(1500, seed=30) + records[0][1000:]
    records.append(random_dna(1300, seed=31))  # a clean record: one segment across many lines and blocks
    path = write_fasta(tmp_path / "g.fa.gz", [(f"r{i}", s) for i, s in enumerate(records)], line_width=59)
    monkeypatch.setattr(plm, "read_fasta", functools.partial(plm.read_fasta, block_size=block_size))
    stats = plm.FileStats()
    got = [(c.key, c.tokens.tolist(), repeat_flags(c).tolist()) for c in chunks_of(path, cfg, stats=stats)]
    assert got == reference_chunks(records, cfg)
    assert stats.bases == sum(map(len, records))
    assert stats.acgt_bases == sum(len(m.group()) for s in records for m in ACGT_RUN.finditer(s))
    assert stats.acgt_bases == stats.used_bases + stats.dropped_short


def test_wanted_chunks_carry_tokens_and_others_are_bare_keys(tmp_path):
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    path = write_fasta(tmp_path / "g.fa", [("r", random_dna(3000, seed=32))])
    everything = chunks_of(path, cfg)
    wanted = {everything[1].key, everything[3].key}
    partial = chunks_of(path, cfg, wanted=wanted)
    assert [c.key for c in partial] == [c.key for c in everything]
    assert [c.n_tokens for c in partial] == [c.n_tokens for c in everything]
    for full, part in zip(everything, partial):
        if part.key in wanted:
            assert part.tokens.tolist() == full.tokens.tolist()
        else:
            assert part.tokens is None and repeat_flags(part) is None


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize("context, overlap, stride", [(8, 0.5, 4), (64, 0.5, 32), (64, 0.0, 64), (64, 0.75, 16)])
def test_window_stride_is_context_times_one_minus_overlap(context, overlap, stride):
    assert plm.Config(context_size=context, overlap_ratio=overlap).window_stride == stride


@pytest.mark.parametrize("context, stride", [(8, 4), (8, 1), (8, 9), (64, 32)])
def test_window_starts_agree_with_windows_per_chunk(context, stride):
    span = context + 1
    for n_tokens in range(0, 3 * span + 5):
        starts = plm.window_starts(n_tokens, context, stride)
        assert len(starts) == plm.windows_per_chunk(n_tokens, context, stride)
        if n_tokens < span:
            assert len(starts) == 0
            continue
        assert starts[0] == 0
        assert (np.diff(starts) == stride).all()
        assert starts[-1] + span <= n_tokens  # never crosses the chunk end
        assert starts[-1] + stride + span > n_tokens  # and no further window fits


def test_windows_never_cross_chunks(multi_species_index):
    cfg, index = multi_species_index
    windows_of = {}
    for species in index.species:
        for key, chunk in full_chunks(index, species, cfg).items():
            windows_of[key] = set(window_rows(chunk.tokens, cfg))
    sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1)
    for _ in range(40):
        tokens, species_ids, keys, _ = sampler.next_batch(16)
        assert tokens.shape == (16, cfg.context_size + 1)
        for row, species_id, key in zip(tokens, species_ids, keys):
            assert key[0] == index.species[species_id]
            assert tuple(int(t) for t in row) in windows_of[key], f"window not inside chunk {key}"


# ----------------------------------------------------------------------------- read_fasta vs Biopython

def _fasta_cases():
    multi = [("chr1 first chromosome", random_dna(500, 40)), ("chr2", random_dna(61, 41)),
             ("chr3\tdesc", random_dna(1, 42)), ("scaffold_4", random_dna(240, 43))]
    mixed = [("m1", random_dna(400, 44, "ACGTacgtNn")), ("m2 soft-masked", random_dna(130, 45, "acgtn"))]
    return {
        "multi_record": dict(records=multi),
        "crlf": dict(records=multi, newline="\r\n"),
        "blank_lines": dict(records=multi, blank_lines=True),
        "lowercase": dict(records=mixed),
        "gzipped": dict(records=multi + mixed, gz=True),
        "one_long_line": dict(records=[("long", random_dna(5000, 46)), ("short", random_dna(10, 47))],
                              line_width=None),
        "one_long_line_crlf_gz": dict(records=[("long", random_dna(3333, 48))], line_width=None, newline="\r\n",
                                      gz=True),
        "record_multiple_of_block": dict(records=[("r448", random_dna(448, 49)), ("r64", random_dna(64, 50))],
                                         line_width=64),
        "record_multiple_of_block_one_line": dict(records=[("r448", random_dna(448, 51)), ("r7", random_dna(7, 52))],
                                                  line_width=None),
    }


@pytest.mark.parametrize("block_size", [7, 64, 1 << 22])
@pytest.mark.parametrize("case", ["multi_record", "crlf", "blank_lines", "lowercase", "gzipped", "one_long_line",
                                  "one_long_line_crlf_gz", "record_multiple_of_block",
                                  "record_multiple_of_block_one_line"])
def test_read_fasta_matches_biopython(tmp_path, case, block_size):
    spec = dict(_fasta_cases()[case])
    name = "genome.fa.gz" if spec.pop("gz", False) else "genome.fa"
    path = write_fasta(tmp_path / name, spec.pop("records"), **spec)
    expected = parse_with_biopython(path)
    got = read_records(path, block_size=block_size)
    assert [i for i, _, _ in got] == list(range(len(expected)))
    assert [(rid, seq) for _, rid, seq in got] == expected


def test_read_fasta_handles_a_file_without_final_newline(tmp_path):
    path = tmp_path / "g.fa"
    seq = random_dna(100, 53)
    path.write_text(">a x\n" + seq[:60] + "\n" + seq[60:])
    for block_size in (7, 64, 1 << 22):
        assert read_records(str(path), block_size) == [(0, "a", seq)]


def test_spaces_and_tabs_in_sequence_lines_are_removed_not_gaps(tmp_path):
    """Some exporters pad sequence lines with spaces; Biopython drops them, and a gap there would split (and, with
    short lines, drop) the whole genome."""
    seq = random_dna(1200, 55)
    lines = [seq[i:i + 60] for i in range(0, len(seq), 60)]
    padded, plain = tmp_path / "padded.fa", tmp_path / "plain.fa"
    padded.write_text(">a\n" + "".join(f"{line[:30]}\t{line[30:]} \n" for line in lines))
    plain.write_text(">a\n" + "\n".join(lines) + "\n")
    cfg = tiny_config(**DATA_SHAPE, data_dir=tmp_path)
    for block_size in (7, 1 << 22):
        assert read_records(str(padded), block_size) == [(0, "a", seq)]
    got, want = plm.FileStats(), plm.FileStats()
    assert [c.key for c in chunks_of(str(padded), cfg, stats=got)] == [c.key for c in chunks_of(str(plain), cfg)]
    chunks_of(str(plain), cfg, stats=want)
    assert got == want and got.non_acgt == 0


@pytest.mark.parametrize("marker", [">", ";"])
def test_a_header_character_inside_a_long_line_at_a_block_edge_is_sequence(tmp_path, marker):
    """A block that ends inside a line hands its rest to the next block: that rest must not be read as a new
    line, whatever its first character is (it is a malformed base, so it splits the sequence)."""
    block = 64
    head = random_dna(2 * block - 3, 56)  # '>a\n' + head fills exactly two blocks, so the marker opens the third
    tail = random_dna(300, 57)
    path = tmp_path / "g.fa"
    path.write_text(">a\n" + head + marker + tail + "\n>b\n" + tail + "\n")
    assert read_records(str(path), block) == read_records(str(path), 1 << 22) == \
        [(0, "a", head + marker + tail), (1, "b", tail)]


def test_read_fasta_streams_a_one_line_record_in_bounded_pieces(tmp_path):
    seq = random_dna(20_000, 54)
    path = write_fasta(tmp_path / "g.fa", [("chr", seq)], line_width=None)
    pieces = [piece for _, _, piece in plm.read_fasta(path, block_size=64)]
    assert b"".join(pieces).decode() == seq
    assert max(map(len, pieces)) <= 2 * 64  # the record is never held whole


def test_read_fasta_rejects_text_that_is_not_fasta(tmp_path):
    path = tmp_path / "notes.fa"
    path.write_text("hello world\nACGT\n")
    with pytest.raises(plm.DataError, match=re.escape(str(path))):
        list(plm.read_fasta(str(path)))


def test_gz_name_without_gzip_content_is_a_data_error(tmp_path):
    path = tmp_path / "g.fa.gz"
    path.write_text(">r\nACGT\n")
    with pytest.raises(plm.DataError, match="not gzip"):
        list(plm.read_fasta(str(path)))


def test_gzip_content_is_detected_whatever_the_name(tmp_path):
    path = tmp_path / "g.fa"
    seq = random_dna(90, 55)
    path.write_bytes(gzip.compress(f">r\n{seq}\n".encode()))
    assert read_records(str(path)) == [(0, "r", seq)]


# ----------------------------------------------------------------------------- Config

def test_config_validate_rejects_chunk_size_not_multiple_of_6():
    with pytest.raises(ValueError, match=r"Config\.chunk_size = 601: must be a multiple of 6"):
        plm.Config(chunk_size=601).check()


def test_config_validate_accepts_the_defaults_and_small_test_config(tmp_path):
    assert plm.Config().check().chunk_size % BASES_PER_TOKEN == 0
    assert tiny_config(**DATA_SHAPE, data_dir=tmp_path).window_bases == (8 + 1) * BASES_PER_TOKEN


# ----------------------------------------------------------------------------- discover_genomes

def _discover(cfg):
    warnings = []
    genomes, weights = plm.discover_genomes(cfg, warn=warnings.append)
    return genomes, weights, warnings


def test_discover_fails_on_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(plm.DataError, match=re.escape(str(missing))):
        plm.discover_genomes(tiny_config(**DATA_SHAPE, data_dir=missing), warn=lambda m: None)


def test_discover_fails_on_empty_data_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(plm.DataError, match=re.escape(str(empty)) + ".*no species directories"):
        plm.discover_genomes(tiny_config(**DATA_SHAPE, data_dir=empty), warn=lambda m: None)


def test_discover_fails_on_fasta_directly_in_data_dir(make_genomes):
    root = make_genomes({"a": {"a.fa": [("r", random_dna(100, 1))]}})
    write_fasta(os.path.join(root, "loose.fna.gz"), [("r", random_dna(100, 2))])
    with pytest.raises(plm.DataError, match=re.escape(root) + ".*loose.fna.gz"):
        plm.discover_genomes(tiny_config(**DATA_SHAPE, data_dir=root), warn=lambda m: None)


def test_discover_warns_about_species_dir_without_fasta(make_genomes):
    root = make_genomes({"a": {"a.fa": [("r", random_dna(100, 1))]}})
    os.makedirs(os.path.join(root, "b"))
    with open(os.path.join(root, "b", "README.md"), "w") as f:
        f.write("not a genome")
    genomes, weights, warnings = _discover(tiny_config(**DATA_SHAPE, data_dir=root, species_distribution={"a": 1.0}))
    assert list(genomes) == ["a"]
    assert any(os.path.join(root, "b") in w and "no FASTA" in w for w in warnings), warnings


def test_discover_gives_unconfigured_species_the_default_weight_and_the_table_says_so(make_genomes):
    root = make_genomes({"a": {"a.fa": [("r", random_dna(100, 1))]}, "x": {"x.FNA": [("r", random_dna(100, 2))]}})
    cfg = tiny_config(**DATA_SHAPE, data_dir=root, species_distribution={"a": 3.0}, default_species_weight=0.5)
    genomes, weights, warnings = _discover(cfg)
    assert weights == {"a": 3.0, "x": 0.5}
    assert genomes["x"] == [os.path.join(root, "x", "x.FNA")]
    assert not warnings, warnings  # no warning per species: the start-up table shows where each weight came from
    index = plm.GenomeCatalog(species=["a", "x"], weights=[3.0, 0.5], files={}, train_chunks=[], val_chunks=[],
                              stats={}, skipped=[])
    table = plm.species_table(index, cfg).splitlines()
    assert re.search(r"0 a\s+3 species_distribution\s+85.7%", table[1]), table
    assert re.search(r"1 x\s+0.5 default_species_weight\s+14.3%", table[2]), table


def test_discover_excludes_species_of_weight_zero(make_genomes):
    root = make_genomes({"a": {"a.fa": [("r", random_dna(100, 1))]}, "b": {"b.fa.gz": [("r", random_dna(100, 2))]}})
    genomes, weights, _ = _discover(tiny_config(**DATA_SHAPE, data_dir=root, species_distribution={"a": 1.0, "b": 0}))
    assert list(genomes) == ["a"] and list(weights) == ["a"]


def test_discover_names_all_configured_species_without_data_in_one_line(make_genomes):
    root = make_genomes({"a": {"a.fa": [("r", random_dna(100, 1))]}})
    genomes, _, warnings = _discover(tiny_config(**DATA_SHAPE, data_dir=root, species_distribution={
        "a": 1.0, "ghost": 2.0, "gone": 1.0, "off": 0.0}))
    assert list(genomes) == ["a"]
    assert warnings == [f"note: configured species with no FASTA under {root}/: ghost, gone"], warnings


def test_default_species_weights_are_the_specs():
    assert plm.Config().species_distribution == {"glycine_max": 1.0, "arabidopsis": 0.8, "oryza_sativa": 0.7,
                                                 "zea_mays": 0.6, "vitis_vinifera": 0.5}
    assert plm.Config().default_species_weight == 1.0  # the bundled relatives (lyrata, arenosa) get this


def test_discover_lists_every_fasta_file_of_a_species(make_genomes):
    root = make_genomes({"a": {"one.fa": [("r", random_dna(60, 1))], "two.fasta.gz": [("r", random_dna(60, 2))],
                               "three.fna": [("r", random_dna(60, 3))]}})
    genomes, _, _ = _discover(tiny_config(**DATA_SHAPE, data_dir=root, species_distribution={"a": 1.0}))
    assert sorted(os.path.basename(p) for p in genomes["a"]) == ["one.fa", "three.fna", "two.fasta.gz"]


# ----------------------------------------------------------------------------- sampling

def test_multi_species_fixture_has_enough_chunks(multi_species_index):
    cfg, index = multi_species_index
    assert index.species == ["a", "b", "c"]
    assert index.weights == [1.0, 2.0, 1.0]
    counts = collections.Counter(c.key[0] for c in index.train_chunks)
    assert all(counts[s] >= 16 for s in "abc"), counts
    assert len({c.key[1] for c in index.train_chunks if c.key[0] == "a"}) == 2  # species a: two files


def test_species_mix_matches_weights_within_2_points(multi_species_index):
    cfg, index = multi_species_index
    sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1)
    ids = np.concatenate([sampler.next_batch(16)[1] for _ in range(10_000 // 16)])
    assert len(ids) == 10_000
    mix = np.bincount(ids, minlength=3) / len(ids)
    target = np.array([0.25, 0.5, 0.25])
    assert np.abs(mix - target).max() <= 0.02, mix


def test_a_finished_epoch_sampler_is_freed_at_once_without_the_cycle_collector(multi_species_index):
    """A reference cycle here kept every finished epoch's open chunks and gzip readers alive in the DataLoader
    workers until the cycle collector ran: gigabytes over tens of epochs, seen in the 20-minute GPU soak."""
    cfg, index = multi_species_index
    gc.collect()
    gc.disable()
    try:
        sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1)
        sampler.next_batch(64)
        streams = [weakref.ref(stream) for stream in sampler.streams]
        chunks = [weakref.ref(o.chunk) for stream in sampler.streams for o in stream.open]
        assert streams and chunks
        del sampler
        assert all(ref() is None for ref in streams + chunks)
    finally:
        gc.enable()


def test_batch_mixes_windows_from_at_least_8_chunks(make_genomes):
    root = make_genomes({"a": {"a.fa": [("r", random_dna(600 * 40, 60))]}})
    cfg = tiny_config(**DATA_SHAPE, data_dir=root, species_distribution={"a": 1.0})
    index = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    assert len(index.train_chunks) >= 16
    sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1)
    distinct = [len(set(sampler.next_batch(16)[2])) for _ in range(20)]
    assert distinct[0] >= 8, distinct
    assert np.median(distinct) >= 8 and min(distinct) >= 4, distinct


def test_windows_of_a_chunk_are_drawn_in_random_order(multi_species_index):
    cfg, index = multi_species_index
    cfg = dataclasses.replace(cfg, open_chunks_per_species=1)  # one chunk at a time: draws follow its window order
    species = "b"
    chunks = [c for c in index.train_chunks if c.key[0] == species]
    start_of = {}
    for key, chunk in full_chunks(index, species, cfg).items():
        for i, row in enumerate(window_rows(chunk.tokens, cfg)):
            start_of[key, row] = i
    stream = plm.SpeciesStream(chunks, index.files[species], cfg, np.random.default_rng(0), index.stores)
    total = index.windows(chunks, cfg)
    tokens, keys, _ = stream.draw(total)
    order = collections.defaultdict(list)
    for row, key in zip(tokens, keys):
        order[key].append(start_of[key, tuple(int(t) for t in row)])
    assert set(order) == {c.key for c in chunks}
    for key, starts in order.items():
        assert sorted(starts) == list(range(len(starts))), key  # every window of the chunk, once
    long_chunks = [starts for starts in order.values() if len(starts) >= 8]
    assert len(long_chunks) >= 10
    assert all(starts != sorted(starts) for starts in long_chunks)  # sorted by chance: p = 1/8! each


@pytest.mark.parametrize("n_chunks", [4, 7, 50])
@pytest.mark.parametrize("epoch", [0, 3])
def test_assign_chunks_puts_every_chunk_in_exactly_one_shard(n_chunks, epoch):
    n_shards = 4  # world 2 x 2 workers
    shards = [plm.assign_chunks(n_chunks, shard, n_shards, epoch, seed=7, species_id=1) for shard in range(n_shards)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(n_chunks))
    assert all(len(s) >= n_chunks // n_shards for s in shards)


def test_assign_chunks_gives_every_shard_a_chunk_when_fewer_chunks_than_shards():
    shards = [plm.assign_chunks(3, shard, 4, 0, seed=7, species_id=0) for shard in range(4)]
    assert all(len(s) == 1 for s in shards)
    assert {i for s in shards for i in s} == {0, 1, 2}


def test_sharded_species_streams_draw_every_training_window_exactly_once(multi_species_index):
    cfg, index = multi_species_index
    species = "a"
    species_id = index.species.index(species)
    train_keys = {c.key for c in index.train_chunks if c.key[0] == species}
    expected = collections.Counter()
    for key, chunk in full_chunks(index, species, cfg).items():
        if key in train_keys:
            expected.update(window_rows(chunk.tokens, cfg))
    assert max(expected.values()) == 1, "synthetic windows should be unique"

    n_tokens = {c.key: c.n_tokens for c in index.train_chunks}
    drawn, owned_by = collections.Counter(), collections.Counter()
    for shard in range(4):
        sampler = plm.EpochSampler(index, cfg, epoch=1, shard=shard, n_shards=4)
        stream = sampler.streams[species_id]
        owned_by.update(stream.owned)
        remaining = sum(plm.windows_per_chunk(n_tokens[k], cfg.context_size, cfg.window_stride) for k in stream.owned)
        while remaining:
            tokens, keys, _ = stream.draw(min(16, remaining))
            assert all(k in stream.owned for k in keys)
            drawn.update(tuple(int(t) for t in row) for row in tokens)
            remaining -= len(tokens)
    assert set(owned_by) == train_keys and max(owned_by.values()) == 1
    assert drawn == expected


def test_same_seed_epoch_and_shard_give_identical_batches(multi_species_index):
    cfg, index = multi_species_index

    def batches(epoch, shard):
        sampler = plm.EpochSampler(index, cfg, epoch=epoch, shard=shard, n_shards=2)
        return [sampler.next_batch(16) for _ in range(30)]

    first, again = batches(0, 0), batches(0, 0)
    for (t1, s1, k1, _), (t2, s2, k2, _) in zip(first, again):
        assert np.array_equal(t1, t2) and np.array_equal(s1, s2) and k1 == k2
    other_epoch = batches(1, 0)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other_epoch))
    other_shard = batches(0, 1)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other_shard))


def test_genome_stream_ranks_yield_equal_full_batches(multi_species_index):
    cfg, index = multi_species_index
    per_epoch = 6
    out = {}
    for rank in (0, 1):
        stream = plm.GenomeStream(index, cfg, rank=rank, world_size=2, steps_per_epoch=per_epoch)
        out[rank] = loader_batches(stream, num_workers=2, n=per_epoch)
    for rank, batches in out.items():
        assert len(batches) == per_epoch
        for tokens, species, repeat, chunks in batches:
            assert tokens.shape == (cfg.accumulation_steps, cfg.batch_size, cfg.context_size + 1)
            assert species.shape == chunks.shape == (cfg.accumulation_steps, cfg.batch_size)
            assert int(chunks.min()) >= 0 and int(chunks.max()) < len(index.train_chunks)
            assert repeat.shape == tokens.shape and repeat.dtype == torch.bool
            assert int(tokens.min()) >= 0 and int(tokens.max()) < plm.VOCAB_SIZE
            assert set(species.flatten().tolist()) <= {0, 1, 2}
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(out[0], out[1])), "ranks must read different shards"


_FRESH = {}


@pytest.mark.parametrize("num_workers, start", [(0, 3), (0, 7), (2, 2), (2, 4), (2, 3), (2, 7)])
def test_genome_stream_resumes_at_the_exact_step(multi_species_index, num_workers, start):
    """GenomeStream(start_step=k) yields the items of steps k, k+1, ... of a fresh stream (5 steps per epoch,
    so start=7 resumes inside epoch 1)."""
    cfg, index = multi_species_index
    total = 12

    def stream(k):
        return plm.GenomeStream(index, cfg, rank=1, world_size=2, steps_per_epoch=5, start_step=k)

    if num_workers not in _FRESH:
        _FRESH[num_workers] = loader_batches(stream(0), num_workers, total)
    fresh = _FRESH[num_workers]
    resumed = loader_batches(stream(start), num_workers, total - start)
    matches = [all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(resumed, fresh[start:])]
    assert all(matches), f"resumed batch i == fresh batch {start}+i: {matches}"


@pytest.mark.parametrize("start", [9, 17, 23])
def test_genome_stream_resumes_exactly_across_many_step_groups(multi_species_index, start):
    """Three workers, 7 steps per epoch, 40 steps: the groups of STEPS_PER_ITEM steps cross epochs and workers, and a
    resume inside a group still yields the fresh stream's steps."""
    cfg, index = multi_species_index
    total = 40

    def stream(k):
        return plm.GenomeStream(index, cfg, rank=0, world_size=1, steps_per_epoch=7, start_step=k)

    fresh = loader_batches(stream(0), 3, total)
    resumed = loader_batches(stream(start), 3, total - start)
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(resumed, fresh[start:]))


def test_shard_steps_before_counts_a_roles_steps_of_the_epoch():
    k = plm.STEPS_PER_ITEM
    for n_workers in (1, 2, 3):
        for epoch_start in (0, 5, 3 * k + 1):
            for step in range(epoch_start, epoch_start + 5 * k):
                for role in range(n_workers):
                    brute = sum((t // k) % n_workers == role for t in range(epoch_start, step))
                    assert plm.shard_steps_before(step, epoch_start, role, n_workers) == brute


# ----------------------------------------------------------------------------- augmentation: frames and strands

def chunk_bases(chunk):
    """A chunk's bases as str, lowercase where soft-masked (from its tokens and soft_mask bits)."""
    lower = np.unpackbits(chunk.soft_mask[:, None], axis=1)[:, 8 - BASES_PER_TOKEN:].reshape(-1)
    return "".join(b.lower() if m else b for b, m in zip(detokenize(chunk.tokens), lower))


def expected_window(strand, first, cfg):
    """(token ids, repeat flags) of the window that reads strand[first:first + 6 * (context + 1)] with its
    cfg.prefix_tokens tokens in front, computed from the bases: -1 and False where the strand has no 6 bases."""
    tokens, flags = [], []
    for j in range(-cfg.prefix_tokens, cfg.context_size + 1):
        at = first + BASES_PER_TOKEN * j
        inside = 0 <= at and at + BASES_PER_TOKEN <= len(strand)
        kmer = strand[at:at + BASES_PER_TOKEN] if inside else ""
        tokens.append(kmer_index(kmer) if inside else -1)
        flags.append(inside and sum(c.islower() for c in kmer) >= 3)
    return tokens, flags


def test_soft_mask_bits_mark_exactly_the_lowercase_bases():
    seq = random_dna(6 * 300, seed=70, alphabet="ACGTacgt")
    bits = plm.soft_mask_bits(codes_of(seq))
    assert bits.dtype == np.uint8 and bits.shape == (300,)
    assert [bool(b >> (BASES_PER_TOKEN - 1 - i) & 1) for b in bits for i in range(BASES_PER_TOKEN)] == \
        [c.islower() for c in seq]
    assert plm.IS_REPEAT[bits].tolist() == [sum(c.islower() for c in seq[i:i + 6]) >= 3 for i in range(0, 1800, 6)]


def test_reverse_complement_tokens_reverse_the_order_and_complement_every_6mer():
    spelled = detokenize(plm.REVERSE_COMPLEMENT)
    assert [spelled[6 * i:6 * i + 6] for i in range(plm.VOCAB_SIZE)] == \
        [reverse_complement(detokenize([i])) for i in range(plm.VOCAB_SIZE)]
    rc = plm.REVERSE_COMPLEMENT
    assert plm.reverse_complement_tokens(np.array([[-1, 5, 433, 4095]])).tolist() == \
        [[rc[4095], rc[433], rc[5], -1]]


def test_shifted_and_reverse_strand_windows_are_the_tokens_of_the_bases_they_read():
    """Every window of a chunk, in every frame, on both strands, in one call (per-window shifts and strands), with
    the retrieval memory's 4 prefix tokens: each is the tokenization of the bases it reads and its prefix that of the
    bases in front of it on its own strand (after it on the forward strand), -1 past the chunk; the repeat flags
    count the soft-masked bases of each shifted 6-mer."""
    cfg = tiny_config(**DATA_SHAPE, global_memory="retrieval")
    span = cfg.context_size + 1
    seq = random_dna(6 * 40, seed=71, alphabet="ACGTacgt")
    codes = codes_of(seq)
    tokens, soft_mask = plm.tokenize(codes), plm.soft_mask_bits(codes)
    # a window of frame s > 0 fits where start + span <= 39: the frame's last 6 - s bases make no 6-mer
    cases = [(t, s, r) for s in range(6) for t in range(40 - span - (s > 0) + 1) for r in (False, True)]
    starts, shifts, reverse = (np.array(column) for column in zip(*cases))
    windows = plm.window_tokens(tokens, starts, cfg, shifts, reverse)
    repeats = plm.window_repeats(soft_mask, starts, cfg, shifts, reverse)
    assert windows.dtype == np.int16 and windows.shape == repeats.shape == (len(cases), cfg.prefix_tokens + span)
    for (t, s, r), row, flags in zip(cases, windows.tolist(), repeats.tolist()):
        first = 6 * t + s
        strand = reverse_complement(seq) if r else seq
        if r:
            first = len(seq) - first - 6 * span  # the same bases, counted from the other strand's start
        assert (row, flags) == expected_window(strand, first, cfg), (t, s, r)
    assert (windows[:, 0] == -1).any() and (windows[reverse, 0] == -1).any()  # both chunk ends were met
    assert repeats.any() and not repeats.all()


def test_the_augmented_sampler_draws_every_frame_and_both_strands_from_inside_each_chunk(multi_species_index):
    cfg, index = multi_species_index
    cfg = dataclasses.replace(cfg, global_memory="retrieval", frame_shift=True, reverse_complement=0.5)
    strands = {}
    for species in index.species:
        for key, chunk in full_chunks(index, species, cfg).items():
            strands[key] = (chunk_bases(chunk), reverse_complement(chunk_bases(chunk)))
    sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1)
    seen = collections.Counter()
    for _ in range(20):
        tokens, _, keys, repeats = sampler.next_batch(16)
        for row, flags, key in zip(tokens.tolist(), repeats.tolist(), keys):
            read = detokenize(row[cfg.prefix_tokens:])  # 54 bases of random sequence: found at one place only
            found = [(r, strand.upper().find(read)) for r, strand in enumerate(strands[key])]
            (r, first), = [(r, first) for r, first in found if first >= 0]
            assert (row, flags) == expected_window(strands[key][r], first, cfg), key
            seen[r, first % 6] += 1
    assert len(seen) == 12, seen  # every frame on both strands
    reverse_share = sum(n for (r, _), n in seen.items() if r) / sum(seen.values())
    assert 0.35 < reverse_share < 0.65, reverse_share


def test_validation_windows_ignore_the_training_augmentation(multi_species_index):
    cfg, index = multi_species_index
    plain = plm.load_validation(index, cfg)
    augmented = plm.load_validation(index, dataclasses.replace(cfg, frame_shift=True, reverse_complement=1.0,
                                                                repeat_loss_weight=0.1))
    assert all(torch.equal(a, b) for a, b in zip(plain, augmented))


# ----------------------------------------------------------------------------- validation split

def _fake_chunks(spec):
    """{species: n_chunks} -> bare Chunks with distinct keys."""
    return [plm.Chunk(key=(s, f"{s}/g.fa", i % 3, 1000 * i, i // 3), n_tokens=100)
            for s, n in spec.items() for i in range(n)]


def test_split_chunks_is_deterministic_and_disjoint():
    chunks = _fake_chunks({"a": 200, "b": 37, "c": 2})
    train, val = plm.split_chunks(chunks, 0.1)
    train2, val2 = plm.split_chunks(list(reversed(chunks)), 0.1)
    assert {c.key for c in train} == {c.key for c in train2}
    assert {c.key for c in val} == {c.key for c in val2}
    assert not {c.key for c in train} & {c.key for c in val}
    assert len(train) + len(val) == len(chunks)
    assert 5 <= sum(c.key[0] == "a" for c in val) <= 40  # about 10% of 200


@pytest.mark.parametrize("val_fraction", [1e-9, 0.02, 0.999])
def test_split_gives_every_species_with_two_chunks_train_and_val(val_fraction):
    chunks = _fake_chunks({"a": 2, "b": 3, "c": 50, "d": 1})
    train, val = plm.split_chunks(chunks, val_fraction)
    for species in "abc":
        assert any(c.key[0] == species for c in train), species
        assert any(c.key[0] == species for c in val), species
    assert sum(c.key[0] == "d" for c in train + val) == 1


def test_scan_split_is_disjoint_and_covers_all_chunks(multi_species_index, multi_species_dir):
    cfg, index = multi_species_index
    train, val = {c.key for c in index.train_chunks}, {c.key for c in index.val_chunks}
    assert not train & val
    all_keys = set()
    for species in index.species:
        for path, label in index.files[species]:
            all_keys.update(c.key for c in plm.chunk_file(path, species, label, cfg, wanted=set()))
    assert train | val == all_keys
    for species in index.species:
        assert any(k[0] == species for k in val), species
    again = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    assert [c.key for c in again.val_chunks] == [c.key for c in index.val_chunks]


def test_load_validation_returns_the_same_tensors_twice(multi_species_index):
    cfg, index = multi_species_index
    tokens, ids, repeat = plm.load_validation(index, cfg)
    tokens2, ids2, repeat2 = plm.load_validation(index, cfg)
    assert len(tokens) > 0
    assert torch.equal(tokens, tokens2) and torch.equal(ids, ids2) and torch.equal(repeat, repeat2)


def test_load_validation_holds_every_window_of_the_val_chunks(multi_species_index):
    cfg, index = multi_species_index  # eval_windows = 0: all of them, in val order
    chunks = {}
    for species in index.species:
        chunks.update(full_chunks(index, species, cfg))
    expected = [row for c in index.val_chunks for row in window_rows(chunks[c.key].tokens, cfg)]
    expected_flags = [row for c in index.val_chunks for row in window_rows(repeat_flags(chunks[c.key]), cfg)]
    expected_ids = [index.species.index(c.key[0]) for c in index.val_chunks
                    for _ in range(plm.windows_per_chunk(c.n_tokens, cfg.context_size, cfg.window_stride))]
    tokens, ids, repeat = plm.load_validation(index, cfg)
    assert [tuple(r) for r in tokens.tolist()] == expected
    assert [tuple(r) for r in repeat.tolist()] == expected_flags and repeat.any()
    assert ids.tolist() == expected_ids
    assert len(tokens) == index.windows(index.val_chunks, cfg)


def test_load_validation_subsamples_to_eval_windows(multi_species_index):
    cfg, index = multi_species_index
    total = index.windows(index.val_chunks, cfg)
    small = dataclasses.replace(cfg, eval_windows=total // 3)
    tokens, ids, _ = plm.load_validation(index, small)
    assert tokens.shape == (total // 3, cfg.context_size + 1)
    everything, _, _ = plm.load_validation(index, cfg)
    rows = {tuple(r) for r in everything.tolist()}
    assert all(tuple(r) in rows for r in tokens.tolist())


# ----------------------------------------------------------------------------- real genomes

def test_real_tair10_record_has_30427671_bases(tair10):
    path, record_id, seq = tair10
    assert len(seq) == TAIR10_BASES
    records = read_records(path)
    assert [(i, rid) for i, rid, _ in records] == [(0, record_id)]
    assert len(records[0][2]) == TAIR10_BASES


@pytest.mark.parametrize("species", ["arabidopsis", "arenosa", "lyrata"])
def test_real_read_fasta_matches_biopython(real_genome, biopython_records, species):
    path = real_genome(species)
    expected = biopython_records(species)
    got = [(rid, seq) for _, rid, seq in read_records(path)]
    assert [rid for rid, _ in got] == [rid for rid, _ in expected]
    for (rid, seq), (_, bio_seq) in zip(got, expected):
        assert len(seq) == len(bio_seq), rid
        assert seq == bio_seq, rid


def test_real_tair10_acgt_segments_match_biopython_regex(tair10):
    path, _, seq = tair10
    segments, position = [], 0  # runs of each piece, joined where one piece's run meets the next piece's
    for _, _, piece in plm.read_fasta(path):
        codes = plm.BYTE_CODES[np.frombuffer(piece, dtype=np.uint8)]
        for start, end in (plm.acgt_segments(codes) + position).tolist():
            if segments and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], end)
            else:
                segments.append((start, end))
        position += len(codes)
    expected = [(m.start(), m.end()) for m in ACGT_RUN.finditer(seq)]
    assert len(expected) > 100
    assert [e - s for s, e in segments] == [e - s for s, e in expected]
    assert segments == expected


def test_real_tair10_chunks_match_biopython_sequence(tair10):
    path, _, seq = tair10
    cfg = plm.Config()
    runs = {m.start(): m.end() for m in ACGT_RUN.finditer(seq)}
    stats = plm.FileStats()
    chunks = chunks_of(path, cfg, species="arabidopsis", label="tair10", stats=stats)
    assert stats.bases == TAIR10_BASES
    assert stats.acgt_bases == sum(e - s for s, e in runs.items())
    assert stats.acgt_bases == stats.used_bases + stats.dropped_short
    assert len(chunks) >= TAIR10_BASES // cfg.chunk_size
    for chunk in chunks:
        _, _, record_index, segment_start, chunk_index = chunk.key
        first = segment_start + chunk_index * cfg.chunk_size
        last = first + BASES_PER_TOKEN * chunk.n_tokens
        assert record_index == 0 and segment_start in runs and last <= runs[segment_start], chunk.key
        assert chunk.n_tokens * BASES_PER_TOKEN <= cfg.chunk_size
        bases = seq[first:last]
        assert np.array_equal(chunk.tokens, tokens_of(bases)), chunk.key
        lower = np.frombuffer(bases.encode(), dtype=np.uint8) >= ord("a")
        assert np.array_equal(repeat_flags(chunk), lower.reshape(-1, BASES_PER_TOKEN).sum(1) >= 3), chunk.key
    long_runs = [s for s, e in runs.items() if e - s >= cfg.window_bases]
    assert sorted({c.key[3] for c in chunks}) == long_runs


def test_real_scan_finds_three_species_with_disjoint_splits(real_index):
    cfg, index, warnings = real_index
    assert index.species == ["arabidopsis", "arenosa", "lyrata"]
    assert not index.skipped, index.skipped
    assert not [w for w in warnings if w.startswith("warning")], warnings
    train, val = {c.key for c in index.train_chunks}, {c.key for c in index.val_chunks}
    assert train and val and not train & val
    for species in index.species:
        assert any(k[0] == species for k in train), species
        assert any(k[0] == species for k in val), species
    assert index.windows(index.val_chunks, cfg) > 0
    assert index.stats["arabidopsis"].bases == TAIR10_BASES


def test_real_validation_windows_are_tokens_of_all_species(real_index):
    cfg, index, _ = real_index
    tokens, ids, _ = plm.load_validation(index, cfg)
    total = index.windows(index.val_chunks, cfg)
    # the default memory, retrieval, gives each window the 4 tokens before it (-1 where the chunk starts)
    assert tokens.shape == (min(cfg.eval_windows, total), cfg.prefix_tokens + cfg.context_size + 1)
    assert cfg.prefix_tokens == 4 and int(tokens.min()) >= -1 and int(tokens.max()) < plm.VOCAB_SIZE
    window = tokens[:, cfg.prefix_tokens:]
    assert tokens.dtype == torch.long and int(window.min()) >= 0
    assert set(ids.tolist()) == {0, 1, 2}

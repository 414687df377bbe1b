"""Tests of the inference subcommands: eval (any sequence of 7+ bases, base by base, the bedGraph track), variants
(the LLR of SNVs from a VCF) and embed (hidden states of FASTA records or BED regions).

The checkpoints are untrained tiny models with wide random weights, one per global memory (conftest.py's
scoring_checkpoints): the properties checked are exact arithmetic, which needs no training. Every check compares the
subcommand with an independent route to the same number: the model's own training loss, a brute-force sum over all
4,096 next 6-mers, or full-sequence scores of the regions written out as FASTA.
"""

import functools
import gzip
import json
import math

import numpy as np
import pytest
import torch

import plant_lm_infer as infer
import plant_lm_train as plm
from _helpers import (armed_checkpoint, assert_armed, parse_with_biopython, random_dna, reverse_complement,
                      write_fasta)

MEMORIES = (*plm.GLOBAL_MEMORIES, "dirichlet")  # conftest's scoring_checkpoints: "dirichlet" is retrieval mixed so


def inference(scoring_checkpoints, memory):
    return infer.load_for_inference(scoring_checkpoints[memory][0], "s", "cpu", warn=lambda message: None)


def genome_record(scoring_checkpoints, name="chr1"):
    path = scoring_checkpoints["none"][1]
    return next(seq for record_id, seq in parse_with_biopython(path) if record_id == name)


def codes_of(seq):
    return plm.BYTE_CODES[np.frombuffer(seq.encode(), dtype=np.uint8)] & 3


def per_base(scorer, seq):
    ((_, _, log_probs),) = infer.score_pieces(scorer, [("x", codes_of(seq))])
    return log_probs


def forward_nats(scorer, token_rows):
    """The model's training-path loss per target (nats), with the retrieval counts and neighbours training would give
    it."""
    cfg = scorer.cfg
    rows = torch.cat([torch.full((len(token_rows), cfg.prefix_tokens), -1), torch.as_tensor(token_rows)], 1).long()
    memory = {} if scorer.retrieval_index is None else {
        "retrieval": scorer.retrieval_index.counts(rows, cfg.prefix_tokens, exclude_self=False)}
    if cfg.global_memory == "neighbours":
        memory["neighbours"] = scorer.retrieval_index.neighbours(rows, cfg.prefix_tokens)
    species = torch.zeros(len(rows), dtype=torch.long)
    with torch.no_grad():
        nats, _ = scorer.model(rows[:, cfg.prefix_tokens:-1], species, rows[:, cfg.prefix_tokens + 1:],
                               reduction="none", **memory)
    return nats.double().numpy()


# ----------------------------------------------------------------------------- per-base scores

@pytest.mark.parametrize("memory", MEMORIES)
def test_per_base_log_likelihoods_multiply_to_each_6mer_and_marginalize_the_full_distribution(
        scoring_checkpoints, memory):
    """The bases of a 6-mer sum to the 6-mer's log-probability as training computes it; the bases of a last partial
    6-mer equal the brute-force log of the summed probability of every 6-mer that begins with them."""
    scorer = inference(scoring_checkpoints, memory)
    seq = genome_record(scoring_checkpoints)[600:645]  # 7 whole 6-mers and 3 bases: one window of the tiny model
    log_probs = per_base(scorer, seq)
    assert np.isnan(log_probs[:6]).all() and not np.isnan(log_probs[6:]).any()
    tokens = plm.tokenize(codes_of(seq)).astype(np.int64)
    nats = forward_nats(scorer, tokens[None])[0]
    assert log_probs[6:42].reshape(6, 6).sum(1) == pytest.approx(-nats, abs=1e-4)

    # every possible last 6-mer after the 7 whole ones: the full, mixed distribution of the 8th token
    candidates = np.repeat(np.append(tokens, 0)[None], plm.VOCAB_SIZE, 0)
    candidates[:, -1] = np.arange(plm.VOCAB_SIZE)
    probabilities = np.exp(-forward_nats(scorer, candidates)[:, -1])
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
    tail = codes_of(seq[42:])
    for j in range(1, 4):
        prefix = int(sum(int(b) << 2 * (j - 1 - i) for i, b in enumerate(tail[:j])))
        begins = (np.arange(plm.VOCAB_SIZE) >> 2 * (6 - j)) == prefix
        assert log_probs[42:42 + j].sum() == pytest.approx(math.log(probabilities[begins].sum()), abs=1e-4)


def test_a_6mer_far_below_the_most_likely_one_keeps_a_finite_log_probability():
    logits = torch.zeros(1, 1, plm.VOCAB_SIZE)
    logits[..., 5] = 150.0  # one 6-mer e^150 times likelier than each other
    log_p = plm.prefix_log_probs(logits, torch.tensor([[7]]), infer.TARGET_PREFIXES)  # 7 shares 5 bases with 5
    assert torch.isfinite(log_p).all() and log_p[0, 0, -1].item() == pytest.approx(-150.0)


def test_eval_scores_every_run_of_seven_bases_and_its_track_sums_to_each_record(scoring_checkpoints, tmp_path):
    """Runs between Ns, short records and partial last 6-mers are scored with the context they have; the bedGraph
    track holds one line per scored base, at its place in the record, and sums to the record's log-likelihood."""
    checkpoint, _ = scoring_checkpoints["retrieval"]
    long = genome_record(scoring_checkpoints)[:700]  # windows of 17 tokens; cut at chunk_size (600), as in training
    gapped = random_dna(40, 1) + "NNN" + random_dna(9, 2) + "N" + random_dna(5, 3)  # runs of 40, 9, 5 bases
    records = [("long", long), ("gapped", gapped), ("twelve", random_dna(12, 4)), ("seven", random_dna(7, 5)),
               ("six", random_dna(6, 6))]
    fasta = write_fasta(tmp_path / "q.fa", records)
    track, result = tmp_path / "q.bedGraph", tmp_path / "q.json"
    assert infer.main(["eval", "--checkpoint", checkpoint, "--species", "s", "--per-base", str(track),
                     "--json", str(result), fasta]) == 0
    scored = {name: r for name, r in json.loads(result.read_text())["files"][0]["records"].items()}
    assert {name: r["bases_scored"] for name, r in scored.items()} == {
        "long": 594 + 94, "gapped": 34 + 3, "twelve": 6, "seven": 1}  # each piece of n >= 7 bases: n - 6
    lines = [line.split("\t") for line in track.read_text().splitlines()[1:]]
    positions = {name: [int(start) for chrom, start, end, _ in lines if chrom == name] for name in scored}
    assert positions["gapped"] == list(range(6, 40)) + list(range(49, 52))  # runs start at 0 and 43
    assert positions["long"] == list(range(6, 600)) + list(range(606, 700))
    for name, figures in scored.items():
        total = sum(float(value) for chrom, _, _, value in lines if chrom == name)
        assert total == pytest.approx(figures["log_likelihood"], abs=1e-3)
        assert figures["bits_per_base"] == pytest.approx(-figures["log_likelihood"] / figures["bases_scored"]
                                                         / math.log(2))


def test_eval_of_a_long_sequence_sums_the_training_loss_of_its_windows(scoring_checkpoints):
    """Whole 6-mers of a sequence longer than a window: each target is scored once, in the window where it has the
    most context, as the model's training loss on that window scores it."""
    scorer = inference(scoring_checkpoints, "retrieval")
    cfg = scorer.cfg
    seq = genome_record(scoring_checkpoints)[:600]  # 100 tokens, windows of 17 at stride 8
    tokens = plm.tokenize(codes_of(seq)).astype(np.int64)
    expected = 0.0
    for start, length, owned in infer.covering_windows(len(tokens), cfg.context_size + 1, cfg.window_stride):
        before = tokens[max(0, start - cfg.prefix_tokens):start]  # the retrieval memory's prefix tokens
        row = np.concatenate([np.full(cfg.prefix_tokens - len(before), -1), before, tokens[start:start + length]])
        rows = torch.as_tensor(row[None]).long()
        memory = {"retrieval": scorer.retrieval_index.counts(rows, cfg.prefix_tokens, exclude_self=False)}
        with torch.no_grad():
            nats, _ = scorer.model(rows[:, cfg.prefix_tokens:-1], torch.zeros(1, dtype=torch.long),
                                   rows[:, cfg.prefix_tokens + 1:], reduction="none", **memory)
        expected -= nats[0].double().numpy()[owned[1:]].sum()
    assert np.nansum(per_base(scorer, seq)) == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------- variants

def write_vcf(path, rows, contigs=("chr1", "chr2")):
    text = "##fileformat=VCFv4.2\n" + "".join(f"##contig=<ID={c}>\n" for c in contigs) + \
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + \
        "".join("\t".join(map(str, row)) + "\t.\t.\t.\n" for row in rows)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def read_table(path):
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(header, row)) for row in rows]


@pytest.mark.parametrize("memory", MEMORIES)
def test_variant_llr_is_the_mean_over_frames_and_strands_of_two_full_sequence_scores(
        scoring_checkpoints, memory, tmp_path):
    """The subcommand's LLR equals, computed apart: the 6 regions with the variant at each offset of its 6-mer (half
    a context of 6-mers before it, a window in all), on both strands, each written as a FASTA record with the
    reference and with the ALT base, scored whole by eval, alt minus ref, averaged over the 12."""
    checkpoint, _ = scoring_checkpoints[memory]
    seq = genome_record(scoring_checkpoints)
    # not the training genome: one base changed in the site's 600-base chunk (1,200 to 1,800) but outside its
    # windows, so that the piece is no training chunk and neighbours leave nothing out
    # (test_a_training_genome_is_scored_without_its_own_chunks_homologs)
    seq = seq[:1210] + ("A" if seq[1210] != "A" else "C") + seq[1211:]
    genome = write_fasta(tmp_path / "reference.fa", [("chr1", seq)])
    pos = 1500  # 1-based, far from every edge
    ref = seq[pos - 1]
    alt = "A" if ref != "A" else "G"
    vcf = write_vcf(tmp_path / "v.vcf", [("chr1", pos, "site", ref, alt)])
    out = tmp_path / "scores.tsv"
    assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", genome, "--vcf", vcf,
                     "--out", str(out)]) == 0
    (row,) = read_table(out)

    context = 16  # the tiny config's context_size
    records = []
    for frame in range(6):
        start = pos - 1 - frame - context // 2 * 6
        region = seq[start:start + (context + 1) * 6]
        at = pos - 1 - start
        changed = region[:at] + alt + region[at + 1:]
        records += [(f"f{frame}_ref", region), (f"f{frame}_alt", changed),
                    (f"r{frame}_ref", reverse_complement(region)), (f"r{frame}_alt", reverse_complement(changed))]
    fasta = write_fasta(tmp_path / "regions.fa", records)
    scores = tmp_path / "regions.json"
    assert infer.main(["eval", "--checkpoint", checkpoint, "--species", "s", "--json", str(scores), fasta]) == 0
    ll = {name: r["log_likelihood"] for name, r in json.loads(scores.read_text())["files"][0]["records"].items()}
    expected = np.mean([ll[f"{s}{f}_alt"] - ll[f"{s}{f}_ref"] for s in "fr" for f in range(6)])
    assert float(row["llr"]) == pytest.approx(expected, abs=2e-4)
    assert row["note"] == "." and abs(expected) > 1e-3  # a real difference, not two zeros


def test_a_training_genome_is_scored_without_its_own_chunks_homologs(scoring_checkpoints):
    """Training leaves each window's own chunk out of its neighbours; eval and variants find the training chunk a
    piece is (by its bases, wherever the file lies) and leave it out too, so that a genome the model was trained on
    is not scored by copying itself. Validation chunks and other sequence are in no chunk."""
    scorer = inference(scoring_checkpoints, "neighbours")
    cfg = scorer.cfg
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    numbers = plm.text_chunk_numbers(catalog)
    train = list(plm.tokenized_chunks(catalog, cfg, catalog.train_chunks))
    assert train and [infer.training_chunk(scorer, plm.token_bases(c.tokens)) for c in train] == \
        [numbers[c.key] for c in train]
    val = list(plm.tokenized_chunks(catalog, cfg, catalog.val_chunks))
    assert val and all(infer.training_chunk(scorer, plm.token_bases(c.tokens)) == -1 for c in val)
    assert infer.training_chunk(scorer, plm.token_bases(train[0].tokens)[6:]) == -1  # a part of a chunk: none
    # chr2 is random DNA: its windows find themselves only, and with their chunk left out nothing
    chunk = next(c for c in train if c.record_id == "chr2")
    width = cfg.prefix_tokens + cfg.context_size + 1
    rows = torch.from_numpy(np.stack([chunk.tokens[i:i + width].astype(np.int64)
                                      for i in range(0, chunk.n_tokens - width, 8)]))
    number = infer.training_chunk(scorer, plm.token_bases(chunk.tokens))
    own = scorer.retrieval_index.neighbours(rows, cfg.prefix_tokens)[1]
    left_out = infer.window_neighbours(scorer, rows, [number] * len(rows))[1]
    assert torch.equal(left_out, scorer.retrieval_index.neighbours(rows, cfg.prefix_tokens,
                                                                   torch.full((len(rows),), number))[1])
    assert (own[..., 0] == 0).float().mean() > 0.9 and (left_out == -1).all()  # age 0: found by the last lookup
    # eval's pieces (the genome cut as training cuts it) and variants' sites find the chunk
    piece = np.concatenate([plm.token_bases(chunk.tokens), chunk.tail])
    ((_, _, left), (_, _, kept)) = (*infer.score_pieces(scorer, [("x", piece)]),
                                    *infer.score_pieces(scorer, [("x", piece)], chunk_of=lambda key, codes: -1))
    assert not np.allclose(left[6:], kept[6:])
    record = next(seq for name, seq in parse_with_biopython(scoring_checkpoints["neighbours"][1]) if name == "chr2")
    start = plm.chunk_start(chunk.key, cfg)
    assert infer.site_chunks(scorer, codes_of(record), [start, start + 300]) == {start: number, start + 300: number}


def frames(pieces, reverse):
    return sorted(variant % 6 for _, variant, r in pieces if r == reverse)


def test_site_pieces_place_the_variant_at_each_frame_on_both_strands_near_gaps_and_ends(scoring_checkpoints):
    cfg = inference(scoring_checkpoints, "none").cfg
    seq = genome_record(scoring_checkpoints)
    codes = plm.BYTE_CODES[np.frombuffer(seq.encode(), dtype=np.uint8)]
    span = (cfg.context_size + 1) * 6
    pieces = infer.site_pieces(codes, 1499, cfg)  # far from any edge: 6 frames a strand, whole windows
    assert frames(pieces, False) == frames(pieces, True) == list(range(6)) and len(pieces) == 12
    assert all(len(piece) == span and variant // 6 == cfg.context_size // 2 for piece, variant, _ in pieces)
    for piece, variant, reverse in pieces:
        text = "".join("ACGT"[b] for b in piece)
        assert (reverse_complement(text) if reverse else text) in seq
        assert text[variant] == (reverse_complement(seq[1499]) if reverse else seq[1499])

    gapped = codes.copy()
    gapped[1480] = plm.BYTE_CODES[ord("N")]  # 18 bases of the run before the site
    near_gap = infer.site_pieces(gapped, 1499, cfg)
    assert frames(near_gap, False) == frames(near_gap, True) == list(range(6))
    assert all(1499 - (len(p) - 1 - v if r else v) >= 1481 for p, v, r in near_gap)  # none reaches past the gap
    near_end = infer.site_pieces(codes, 2970, cfg)  # 29 bases before the contig's end
    assert frames(near_end, False) == frames(near_end, True) == list(range(6))
    after_gap = infer.site_pieces(gapped, 1481, cfg)  # the run's first base: one placement forward, six reverse
    assert frames(after_gap, False) == [0] and frames(after_gap, True) == list(range(6))
    tiny = plm.BYTE_CODES[np.frombuffer(b"NNNACGTAGNNN", dtype=np.uint8)]  # a run of 6: nothing to score
    assert infer.site_pieces(tiny, 5, cfg) == []


def test_variant_scores_do_not_depend_on_where_the_6mer_grid_falls(scoring_checkpoints, tmp_path):
    """Bases added at the start of the chromosome, far from the site, move the record's 6-mer grid by 1..5 bases; the
    score averages the 6 frames, each placed relative to the variant, so it does not move."""
    checkpoint, _ = scoring_checkpoints["retrieval"]
    seq = genome_record(scoring_checkpoints)
    ref = seq[1999]
    alt = "C" if ref != "C" else "T"
    llrs = []
    for added in range(6):
        genome = write_fasta(tmp_path / f"g{added}.fa", [("chr1", random_dna(added, 9) + seq)])
        vcf = write_vcf(tmp_path / f"v{added}.vcf", [("chr1", 2000 + added, ".", ref, alt)])
        out = tmp_path / f"s{added}.tsv"
        assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", genome, "--vcf", vcf,
                         "--out", str(out)]) == 0
        llrs.append(float(read_table(out)[0]["llr"]))
    assert llrs == pytest.approx([llrs[0]] * 6, abs=1e-5)


@pytest.mark.parametrize("vcf_name", ["v.vcf", "v.vcf.gz"])
def test_vcf_edge_cases_each_get_their_stated_result(scoring_checkpoints, tmp_path, vcf_name):
    checkpoint, _ = scoring_checkpoints["none"]
    seq = genome_record(scoring_checkpoints)
    genome = write_fasta(tmp_path / "ref.fa.gz", [("chr1", seq[:1000] + "NNNN" + seq[1004:]),
                                                  ("chr2", random_dna(500, 8))])
    base = seq[99]
    others = [b for b in "ACGT" if b != base]
    wrong = others[0]
    rows = [("chr1", 100, "multi", base, f"{others[0]},{others[1]}"),
            ("chr1", 200, "indel", seq[199] + seq[200], seq[199]),
            ("chr1", 300, "mismatch", wrong if wrong != seq[299] else others[1], "T" if seq[299] != "T" else "G"),
            ("chr9", 10, "no_contig", "A", "C"),
            ("chr1", 1002, "gap", "N", "A"),
            ("chr1", 400, "symbolic", seq[399], "<DEL>"),
            ("chr1", 410, "star", seq[409], "*"),
            ("chr1", 420, "no_alt", seq[419], "."),
            ("chr2", 501, "past_end", "A", "C"),
            ("chr1", 1001, "n_ref", "A", "C"),
            ("chr2", 1, "first_base", "ACGT"[0], "C")]
    vcf = write_vcf(tmp_path / vcf_name, rows)
    out = tmp_path / "out.tsv"
    assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", genome, "--vcf", vcf,
                     "--out", str(out)]) == 0
    table = read_table(out)
    assert [r["id"] for r in table] == ["multi", "multi", "indel", "mismatch", "no_contig", "gap", "symbolic", "star",
                                       "no_alt", "past_end", "n_ref", "first_base"]
    notes = {(r["id"], r["alt"]): r["note"] for r in table}
    llrs = {(r["id"], r["alt"]): r["llr"] for r in table}
    assert notes[("multi", others[0])] == notes[("multi", others[1])] == "."
    assert llrs[("multi", others[0])] != llrs[("multi", others[1])]
    float(llrs[("multi", others[0])])
    assert notes[("indel", seq[199])] == "indel or multi-base substitution: only SNVs are scored"
    mismatch = next(r for r in table if r["id"] == "mismatch")
    assert mismatch["note"] == f"REF {mismatch['ref']} does not match the reference base {seq[299]}"
    assert notes[("no_contig", "C")] == "contig chr9 is not in ref.fa.gz"
    assert notes[("gap", "A")] == "non-ACGT allele"
    assert notes[("symbolic", "<DEL>")] == "symbolic or breakend ALT allele"
    assert notes[("star", "*")] == "non-ACGT allele"
    assert notes[("no_alt", ".")] == "no ALT allele"
    assert notes[("past_end", "C")] == "position 501 is outside chr2 (500 bases)"
    assert notes[("n_ref", "C")] == "the reference base is not A/C/G/T"
    chr2_first = parse_with_biopython(genome)[1][1][0]
    first = next(r for r in table if r["id"] == "first_base")
    expected_note = "." if chr2_first == "A" else f"REF A does not match the reference base {chr2_first}"
    assert first["note"] == expected_note
    assert all((r["llr"] == "NA") == (r["note"] != ".") for r in table)


def test_vcf_and_gzipped_vcf_give_the_same_scores(scoring_checkpoints, tmp_path):
    checkpoint, genome = scoring_checkpoints["buckets"]
    seq = genome_record(scoring_checkpoints)
    rows = [("chr1", p, ".", seq[p - 1], "A" if seq[p - 1] != "A" else "T") for p in (5, 700, 2999)]
    tables = []
    for name in ("v.vcf", "v.vcf.gz"):
        out = tmp_path / f"{name}.tsv"
        assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", genome,
                         "--vcf", write_vcf(tmp_path / name, rows), "--out", str(out)]) == 0
        tables.append(out.read_text())
    assert tables[0] == tables[1] and "NA" not in tables[0]


@pytest.mark.parametrize("record, line", [
    ("chr1\tx\t.\tA\tC\t.\t.\t.\n", 5),  # POS not a number (htslib's own error)
    ("chr1 5 . A C . . .\n", 5),  # spaces for tabs: htslib crashed the process on this one
    ("chr1\t5\t.\tA\tC\n", 5),  # columns missing
])
def test_a_broken_vcf_record_is_one_error_naming_the_file_and_line(scoring_checkpoints, tmp_path, capsys, record,
                                                                   line):
    checkpoint, genome = scoring_checkpoints["none"]
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chr1>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   "chr1\t5\t.\tA\tC\t.\t.\t.\n" + record)
    assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", genome, "--vcf", str(vcf),
                     "--out", str(tmp_path / "o.tsv")]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {vcf}: line {line}: not a VCF record"), errors


def test_a_file_that_is_no_vcf_is_one_error_naming_it(scoring_checkpoints, tmp_path, capsys):
    checkpoint, genome = scoring_checkpoints["none"]
    text, truncated = tmp_path / "t.vcf", tmp_path / "t.vcf.gz"
    text.write_text("hello\n")
    truncated.write_bytes(gzip.compress(b"##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")[:30])
    for path in (text, truncated):
        assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", genome, "--vcf",
                         str(path), "--out", str(tmp_path / "o.tsv")]) == 2
        errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), errors


def test_a_reference_record_is_read_whole_whatever_the_read_blocks(tmp_path, monkeypatch):
    """read_fasta streams a record in blocks; read_records joins them into one record per id."""
    records = [("chr1", random_dna(1000, 1)), ("chr2", random_dna(333, 2) + "NNN" + random_dna(50, 3))]
    fasta = write_fasta(tmp_path / "g.fa.gz", records)
    monkeypatch.setattr(plm, "read_fasta", functools.partial(plm.read_fasta, block_size=64))
    found = [(record_id, "".join("ACGTacgtN"[c] for c in codes)) for record_id, codes in infer.read_records(fasta, None)]
    assert found == records
    assert [r for r, _ in infer.read_records(fasta, {"chr2"})] == ["chr2"]


def test_a_reference_with_two_records_of_one_name_or_of_protein_is_an_error(scoring_checkpoints, tmp_path, capsys):
    checkpoint, _ = scoring_checkpoints["none"]
    vcf = write_vcf(tmp_path / "v.vcf", [("chr1", 5, ".", "A", "C")])
    twice = write_fasta(tmp_path / "twice.fa", [("chr1", random_dna(100, 1)), ("chr1", random_dna(100, 2))])
    protein = write_fasta(tmp_path / "p.fa", [("chr1", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF" * 5)])
    for reference, message in ((twice, "two records are named chr1"), (protein, "record chr1: ")):
        assert infer.main(["variants", "--checkpoint", checkpoint, "--species", "s", "--fasta", reference, "--vcf", vcf,
                         "--out", str(tmp_path / "o.tsv")]) == 2
        assert f"error: {reference}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["eval", "variants", "embed"])
def test_an_output_in_a_missing_folder_is_an_error_before_any_work(scoring_checkpoints, tmp_path, capsys,
                                                                   subcommand):
    checkpoint, genome = scoring_checkpoints["none"]
    out = str(tmp_path / "missing" / "out")
    vcf = write_vcf(tmp_path / "v.vcf", [("chr1", 5, ".", "A", "C")])
    inputs = {"eval": ["--json", out, genome], "variants": ["--fasta", genome, "--vcf", vcf, "--out", out],
              "embed": ["--out", out, genome]}[subcommand]
    assert infer.main([subcommand, "--checkpoint", checkpoint, "--species", "s", *inputs]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: cannot write here: {tmp_path / 'missing'} does not exist" in err
    assert "memory:" not in err and "model" not in err.lower()  # nothing was loaded
    assert infer.main([subcommand, "--checkpoint", checkpoint, "--species", "s",
                     *[str(tmp_path) if a == out else a for a in inputs]]) == 2
    assert f"error: {tmp_path}: cannot write here: a directory" in capsys.readouterr().err
    assert infer.main([subcommand, "--checkpoint", checkpoint, "--species", "s", "--device", "gpu0",
                     *[str(tmp_path / "o") if a == out else a for a in inputs]]) == 2
    assert "error: --device gpu0: not a device" in capsys.readouterr().err


# ----------------------------------------------------------------------------- embeddings

def embed(checkpoint, tmp_path, *args, name="e.npz"):
    out = tmp_path / name
    assert infer.main(["embed", "--checkpoint", checkpoint, "--species", "s", "--out", str(out), *args]) == 0
    with np.load(out) as saved:  # no allow_pickle: nothing in it needs it
        return {key: saved[key] for key in saved.files}


def test_embeddings_are_deterministic_with_the_stated_shapes(scoring_checkpoints, tmp_path, capsys):
    checkpoint, _ = scoring_checkpoints["retrieval"]
    records = [("r1", random_dna(500, 1)), ("gapped", random_dna(40, 2) + "NN" + random_dna(31, 3)),
               ("empty", "NNNNACG")]
    fasta = write_fasta(tmp_path / "r.fa", records)
    first = embed(checkpoint, tmp_path, "--per-token", fasta, name="a.npz")
    again = embed(checkpoint, tmp_path, "--per-token", fasta, name="b.npz")
    assert set(first) == {"names", "embeddings", "n_tokens", "token_embeddings", "token_offsets", "token_starts"}
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    d = 32  # the tiny config's d_model
    assert list(first["names"]) == ["r1", "gapped", "empty"]
    assert first["embeddings"].shape == (3, d) and first["embeddings"].dtype == np.float32
    assert list(first["n_tokens"]) == [83, 6 + 5, 0]  # each run tokenized from its start; a last partial 6-mer dropped
    assert first["token_embeddings"].shape == (94, d) and list(first["token_offsets"]) == [0, 83, 94, 94]
    assert list(first["token_starts"][83:]) == [0, 6, 12, 18, 24, 30, 42, 48, 54, 60, 66]
    means = [first["token_embeddings"][a:b].mean(0) for a, b in zip(first["token_offsets"][:2],
                                                                      first["token_offsets"][1:3])]
    np.testing.assert_allclose(first["embeddings"][:2], np.stack(means), rtol=1e-5, atol=1e-6)
    assert np.isnan(first["embeddings"][2]).all()
    assert "1 region(s) hold no 6-mer of A/C/G/T (empty)" in capsys.readouterr().err
    pooled_only = embed(checkpoint, tmp_path, fasta, name="c.npz")
    assert set(pooled_only) == {"names", "embeddings", "n_tokens"}
    np.testing.assert_array_equal(pooled_only["embeddings"], first["embeddings"])


def test_an_embedding_is_the_models_final_hidden_state_and_minus_strand_regions_read_the_other_strand(
        scoring_checkpoints, tmp_path):
    checkpoint, genome = scoring_checkpoints["buckets"]
    seq = genome_record(scoring_checkpoints)
    bed = tmp_path / "r.bed"
    bed.write_text("# regions\nchr1\t100\t190\tplus\t0\t+\nchr1\t100\t190\tminus\t0\t-\nchr2\t0\t60\n")
    found = embed(checkpoint, tmp_path, "--per-token", "--bed", str(bed), "--fasta", genome)
    assert list(found["names"]) == ["plus", "minus", "chr2:0-60"]
    scorer = inference(scoring_checkpoints, "buckets")
    for name, region in (("plus", seq[100:190]), ("minus", reverse_complement(seq[100:190]))):
        tokens = torch.as_tensor(plm.tokenize(codes_of(region)).astype(np.int64))[None]
        with torch.no_grad():
            _, hidden = scorer.model(tokens, torch.zeros(1, dtype=torch.long))
        i = list(found["names"]).index(name)
        np.testing.assert_allclose(found["embeddings"][i], hidden[0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
        a, b = found["token_offsets"][i:i + 2]
        np.testing.assert_allclose(found["token_embeddings"][a:b], hidden[0].numpy(), rtol=1e-5, atol=1e-6)


def test_embed_keeps_records_of_one_name_apart_and_refuses_an_empty_input(scoring_checkpoints, tmp_path, capsys):
    checkpoint, _ = scoring_checkpoints["none"]
    fasta = write_fasta(tmp_path / "dup.fa", [("x", random_dna(60, 1)), ("x", random_dna(90, 2)),
                                              ("y", random_dna(30, 3))])
    found = embed(checkpoint, tmp_path, fasta)
    assert list(found["names"]) == ["x (record 1)", "x (record 2)", "y"] and list(found["n_tokens"]) == [10, 15, 5]
    for empty in (write_fasta(tmp_path / "none.fa", []), tmp_path / "comments.bed"):
        args = [str(empty)]
        if str(empty).endswith(".bed"):
            empty.write_text("# nothing\n")
            args = ["--bed", str(empty), "--fasta", fasta]
        assert infer.main(["embed", "--checkpoint", checkpoint, "--species", "s", "--out", str(tmp_path / "e.npz"),
                         *args]) == 2
        assert f"error: {empty}: no regions" in capsys.readouterr().err


def test_embedding_a_region_longer_than_a_chunk_reads_it_in_chunk_size_pieces(scoring_checkpoints, tmp_path):
    """A region is cut where training cuts a genome (chunk_size, 600 bases in the tiny config), so memory holds one
    piece at a time; the pooled embedding is the mean over all pieces' 6-mers."""
    checkpoint, _ = scoring_checkpoints["none"]
    seq = genome_record(scoring_checkpoints)[:1500]
    whole = embed(checkpoint, tmp_path, "--per-token", write_fasta(tmp_path / "w.fa", [("w", seq)]), name="w.npz")
    parts = embed(checkpoint, tmp_path, "--per-token",
                  write_fasta(tmp_path / "p.fa", [("a", seq[:600]), ("b", seq[600:1200]), ("c", seq[1200:])]),
                  name="p.npz")
    np.testing.assert_array_equal(whole["token_embeddings"], parts["token_embeddings"])
    assert list(whole["token_starts"]) == list(range(0, 1500, 6))
    np.testing.assert_allclose(whole["embeddings"][0], parts["token_embeddings"].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("line, message", [
    ("chr1\t10\n", "line 1: a BED line needs chrom, start and end"),
    ("chr1\tten\t20\n", "line 1: start and end must be whole numbers"),
    ("chr1\t30\t20\n", "line 1: needs 0 <= start < end"),
    ("chr1\t0\t20\tx\t0\t*\n", "line 1: strand must be +, - or ."),
    ("chr1\t0\t20\nchrZ\t0\t20\n", "line 2: chrZ is not a record of"),
    ("chr2\t900\t1001\n", "line 1: end 1,001 is past the end of chr2 (1,000 bases)"),
])
def test_bed_mistakes_are_one_error_naming_the_line(scoring_checkpoints, tmp_path, capsys, line, message):
    checkpoint, genome = scoring_checkpoints["none"]
    bed = tmp_path / "r.bed"
    bed.write_text(line)
    assert infer.main(["embed", "--checkpoint", checkpoint, "--species", "s", "--out", str(tmp_path / "e.npz"),
                     "--bed", str(bed), "--fasta", genome]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bed}: {message}"), errors
    assert not (tmp_path / "e.npz").exists()


# ----------------------------------------------------------------------------- every subcommand

@pytest.mark.parametrize("subcommand", ["eval", "variants", "embed"])
def test_inference_subcommands_refuse_a_checkpoint_that_would_run_code(scoring_checkpoints, tmp_path, capsys,
                                                                       subcommand):
    marker = tmp_path / "PWNED"
    checkpoint = armed_checkpoint(tmp_path / "model.pt", marker)
    _, genome = scoring_checkpoints["none"]
    vcf = write_vcf(tmp_path / "v.vcf", [("chr1", 5, ".", "A", "C")])
    inputs = {"eval": [genome], "variants": ["--fasta", genome, "--vcf", vcf, "--out", str(tmp_path / "o.tsv")],
              "embed": ["--out", str(tmp_path / "o.npz"), genome]}[subcommand]
    assert infer.main([subcommand, "--checkpoint", checkpoint, "--species", "s", *inputs]) == 2
    assert f"error: {checkpoint}: not a loadable Plant LM checkpoint" in capsys.readouterr().err
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert_armed(checkpoint, marker)


@pytest.mark.parametrize("subcommand", ["eval", "variants", "embed"])
def test_inference_subcommands_document_themselves(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main([subcommand, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"plant_lm_infer.py {subcommand}" in text and "--checkpoint" in text and "--device" in text

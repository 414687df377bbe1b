"""The retrieval memory (global_memory = retrieval): the index counts what a brute-force count finds, a training
window never retrieves itself, the cache follows the training split, the mixture is the formula it claims, and
every global_memory value trains, resumes and evaluates.
"""

import collections
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

import plant_lm_train as plm
from _helpers import (INFER_SCRIPT, TESTS, TINY_ARGS, all_windows, describe, detokenize, loader_batches,
                      random_dna, read_jsonl, reverse_complement, run_train, tiny_config, write_fasta)

def retrieval_config(data_dir, tmp_path, **overrides):
    return tiny_config(**{"data_dir": data_dir, "global_memory": "retrieval", "index_layout": "tables",
                          "checkpoint_dir": str(tmp_path / "ckpt"), **overrides})


@pytest.fixture(scope="module")
def repeats_dir(tmp_path_factory):
    """Two species of random DNA that share planted copies of two 60-base segments (one also reverse-complemented)
    and hold one 30-base palindrome: counts of 1, 2 and more, on both strands."""
    rng = np.random.default_rng(5)
    shared, other = random_dna(60, rng), random_dna(60, rng)
    half = random_dna(15, rng)
    palindrome = half + reverse_complement(half)
    a = random_dna(1500, rng) + shared + random_dna(900, rng) + palindrome + random_dna(1200, rng) + other
    b = random_dna(800, rng) + reverse_complement(shared) + random_dna(1400, rng) + shared + random_dna(1000, rng)
    root = tmp_path_factory.mktemp("repeats") / "data"
    write_fasta(root / "a" / "a.fa", [("a1", a + random_dna(1200, rng))])
    write_fasta(root / "b" / "b.fa", [("b1", b + other + random_dna(1100, rng))])
    return str(root)


def built_index(data_dir, tmp_path, **overrides):
    """(cfg, catalog, the retrieval index of its training chunks, built on the CPU) for retrieval_config(...)."""
    cfg = retrieval_config(data_dir, tmp_path, **overrides)
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    return cfg, catalog, plm.build_retrieval_index(catalog, cfg, torch.device("cpu"), "test")


def training_sequences(index, cfg):
    """The bases of every training chunk, as str."""
    return [detokenize(chunk.tokens) for chunk in plm.tokenized_chunks(index, cfg, index.train_chunks)]


def brute_force_counts(seqs, n_bases):
    counts = collections.Counter()
    for seq in seqs:
        for strand in (seq, reverse_complement(seq)):
            counts.update(strand[i:i + n_bases] for i in range(len(strand) - n_bases + 1))
    return counts


def test_index_counts_agree_with_a_brute_force_count_on_both_strands_and_every_offset(repeats_dir, tmp_path):
    cfg, index, memory = built_index(repeats_dir, tmp_path)
    seqs = training_sequences(index, cfg)
    windows = all_windows(index, cfg, index.train_chunks + index.val_chunks)
    counts = memory.counts(windows, cfg.prefix_tokens, exclude_self=False)
    assert counts.shape == (len(windows), cfg.context_size, len(plm.RETRIEVAL_CONTEXT_TOKENS), 2)
    checked = collections.Counter()
    for o, k in enumerate(plm.RETRIEVAL_CONTEXT_TOKENS):
        truth = brute_force_counts(seqs, 6 * (k + 1))
        by_context = collections.Counter()
        for key, n in truth.items():
            by_context[key[:-6]] += n
        for w, row in enumerate(windows.tolist()):
            for t in range(cfg.context_size):
                target = cfg.prefix_tokens + 1 + t
                if min(row[target - k:target + 1]) < 0:  # the context reaches before the chunk
                    assert counts[w, t, o].tolist() == [0, 0]
                    continue
                context = detokenize(row[target - k:target])
                expected = [by_context[context], truth[context + detokenize(row[target:target + 1])]]
                assert counts[w, t, o].tolist() == expected, (k, w, t)
                checked[(k, min(expected[1], 3))] += 1
    for k in plm.RETRIEVAL_CONTEXT_TOKENS:  # the planted copies give targets seen 2 and 3+ times at every length
        assert checked[(k, 2)] > 0 and checked[(k, 3)] > 0, checked


@pytest.mark.parametrize("layout", plm.INDEX_LAYOUTS)
def test_a_training_window_never_retrieves_its_own_target(layout, repeats_dir, tmp_path):
    cfg, index, memory = built_index(repeats_dir, tmp_path, index_layout=layout)
    windows = all_windows(index, cfg, index.train_chunks)
    kept = memory.counts(windows, cfg.prefix_tokens, exclude_self=False)
    left_out = memory.counts(windows, cfg.prefix_tokens, exclude_self=True)
    known = kept[..., 0] > 0
    # every training target is in the index, once, or twice where its string is its own reverse complement
    own = kept - left_out
    assert torch.equal(own[..., 0][known], own[..., 1][known])
    assert set(own[..., 1][known].unique().tolist()) == {1.0, 2.0}
    assert (kept[..., 1][known] >= own[..., 1][known]).all()
    # in unique random sequence the longest contexts are seen only at their own place: nothing is left
    longest = left_out[:, :, -1, 1]
    copies = kept[:, :, -1, 1] > own[:, :, -1, 1]
    assert (longest[~copies] == 0).all() and (longest[copies] >= 1).all() and copies.any()


def every_frame_and_strand(index, cfg):
    """Every training window (with its prefix) in each of the 6 frames on both strands, as augmented training draws
    them: one int64 tensor."""
    span = cfg.context_size + 1
    rows = []
    for chunk in plm.tokenized_chunks(index, cfg, index.train_chunks):
        for shift in range(6):
            starts = plm.window_starts(chunk.n_tokens - (shift > 0), cfg.context_size, cfg.window_stride)
            assert (starts + span <= chunk.n_tokens - (shift > 0)).all()
            for reverse in (False, True):
                rows.append(plm.window_tokens(chunk.tokens, starts, cfg, shift, reverse))
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


@pytest.mark.parametrize("layout", plm.INDEX_LAYOUTS)
def test_shifted_and_reverse_strand_training_windows_leave_out_exactly_their_own_occurrence(layout, repeats_dir,
                                                                                           tmp_path):
    """A frame-shifted or reverse-strand window is in the index too, at its own place (the index holds both strands
    at every base offset): each of its (context, target) strings, prefix included, is counted as often as a brute
    force count finds it, at least once, and leave-one-out takes out 1, or 2 for a string that is its own reverse
    complement, leaving exactly what the other copies add."""
    cfg, index, memory = built_index(repeats_dir, tmp_path, index_layout=layout)
    windows = every_frame_and_strand(index, cfg)
    kept = memory.counts(windows, cfg.prefix_tokens, exclude_self=False)
    left_out = memory.counts(windows, cfg.prefix_tokens, exclude_self=True)
    seqs = training_sequences(index, cfg)
    owns = collections.Counter()
    for o, k in enumerate(plm.RETRIEVAL_CONTEXT_TOKENS):
        truth = brute_force_counts(seqs, 6 * (k + 1))
        for w, row in enumerate(windows.tolist()):
            for t in range(cfg.context_size):
                target = cfg.prefix_tokens + 1 + t
                if min(row[target - k:target + 1]) < 0:  # the context reaches past the chunk
                    assert kept[w, t, o].tolist() == [0, 0] == left_out[w, t, o].tolist()
                    continue
                string = detokenize(row[target - k:target + 1])
                own = 1 + (string == reverse_complement(string))
                assert kept[w, t, o, 1].item() == truth[string] >= own, (k, w, t)
                assert (kept[w, t, o] - left_out[w, t, o]).tolist() == [own, own], (k, w, t)
                owns[own] += 1
    assert set(owns) == {1, 2}, owns  # the planted palindrome is met


def whole_occurrences(seqs, n_bases):
    """Occurrences of each n_bases string lying wholly inside one of seqs, on either strand."""
    return brute_force_counts(seqs, n_bases)


def near_the_end(seqs, n_bases):
    """Occurrences of each n_bases string, on either strand, with fewer than 6 bases after it on that strand."""
    counts = collections.Counter()
    for seq in seqs:
        for strand in (seq, reverse_complement(seq)):
            counts.update(strand[i:i + n_bases] for i in range(max(len(strand) - n_bases - 5, 0),
                                                                len(strand) - n_bases + 1))
    return counts


def test_suffix_array_counts_every_whole_occurrence_of_a_context_and_each_prefix_of_its_target(repeats_dir,
                                                                                               tmp_path):
    """index_layout = suffix_array against a brute-force count on both strands, for every window of the training
    and validation chunks, each context length, and the target's first j = 0..6 bases (what scoring asks for)."""
    cfg, index, memory = built_index(repeats_dir, tmp_path, index_layout="suffix_array")
    assert isinstance(memory, plm.SuffixIndex)
    seqs = training_sequences(index, cfg)
    windows = all_windows(index, cfg, index.train_chunks + index.val_chunks)
    counts = memory.counts(windows, cfg.prefix_tokens, exclude_self=False, target_bases=range(7))
    truth = {n: whole_occurrences(seqs, n) for n in range(12, 31)}
    checked = collections.Counter()
    for o, k in enumerate(plm.RETRIEVAL_CONTEXT_TOKENS):
        for w, row in enumerate(windows.tolist()):
            for t in range(cfg.context_size):
                target = cfg.prefix_tokens + 1 + t
                if min(row[target - k:target + 1]) < 0:
                    assert counts[w, t, o].tolist() == [0] * 7
                    continue
                string = detokenize(row[target - k:target + 1])
                expected = [truth[6 * k + j][string[:6 * k + j]] for j in range(7)]
                assert counts[w, t, o].tolist() == expected, (k, w, t)
                checked[min(expected[-1], 3)] += 1
    assert checked[2] > 0 and checked[3] > 0 and checked[0] > 0, checked


def test_suffix_array_and_tables_differ_only_by_contexts_next_to_a_chunk_end(repeats_dir, tmp_path):
    """The tables count a context only where its next 6 bases fit in the chunk too; the suffix array counts every
    whole occurrence. So a (context, target) count is the same in both, and a context's count differs by exactly
    its occurrences with fewer than 6 bases after them, on either strand. Besides every window, the queries hold
    each training chunk's last tokens followed by one more, whose context is the chunk's last bases."""
    tables_cfg = retrieval_config(repeats_dir, tmp_path)
    index = plm.scan_genomes(tables_cfg, warn=lambda m: None, progress=False)
    tables = plm.build_retrieval_index(index, tables_cfg, torch.device("cpu"), "test")
    suffixes = plm.build_retrieval_index(index, retrieval_config(repeats_dir, tmp_path, index_layout="suffix_array"),
                                         torch.device("cpu"), "test")
    span = tables_cfg.prefix_tokens + tables_cfg.context_size + 1
    past_the_end = [np.append(chunk.tokens[1 - span:], 0).astype(np.int64)
                    for chunk in plm.tokenized_chunks(index, tables_cfg, index.train_chunks)]
    windows = torch.cat([all_windows(index, tables_cfg, index.train_chunks + index.val_chunks),
                         torch.from_numpy(np.stack(past_the_end))])
    by_tables = tables.counts(windows, tables_cfg.prefix_tokens, exclude_self=False)
    by_suffixes = suffixes.counts(windows, tables_cfg.prefix_tokens, exclude_self=False)
    assert torch.equal(by_tables[..., 1], by_suffixes[..., 1])
    seqs = training_sequences(index, tables_cfg)
    differs = 0
    for o, k in enumerate(plm.RETRIEVAL_CONTEXT_TOKENS):
        edge = near_the_end(seqs, 6 * k)
        for w, row in enumerate(windows.tolist()):
            for t in range(tables_cfg.context_size):
                target = tables_cfg.prefix_tokens + 1 + t
                if min(row[target - k:target + 1]) >= 0:
                    extra = edge[detokenize(row[target - k:target])]
                    assert by_suffixes[w, t, o, 0] - by_tables[w, t, o, 0] == extra, (k, w, t)
                    differs += extra > 0
    assert differs > 0  # the data hold such contexts: the difference is exercised


@pytest.mark.parametrize("ranks", [2, 4])
def test_a_suffix_array_shared_out_over_gloo_ranks_counts_what_the_whole_one_does(ranks, repeats_dir, tmp_path):
    """Each rank holds 1/ranks of the array's rows and counts its own windows: every count, kept and left out, is
    bit-equal to the unsharded index's (tests/shard_worker.py)."""
    proc = run_train([], cwd=tmp_path, nproc=ranks, timeout=120, script=os.path.join(TESTS, "shard_worker.py"),
                     script_args=[str(tmp_path), repeats_dir])
    assert proc.returncode == 0, describe(proc)
    cfg = retrieval_config(repeats_dir, tmp_path, index_layout="suffix_array")
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    whole = plm.build_retrieval_index(catalog, cfg, torch.device("cpu"), "test")
    windows = all_windows(catalog, cfg, catalog.train_chunks + catalog.val_chunks)
    kept = whole.counts(windows, cfg.prefix_tokens, exclude_self=False, target_bases=range(7))
    left_out = whole.counts(windows, cfg.prefix_tokens, exclude_self=True)
    rows = set()
    for rank in range(ranks):
        part = torch.load(tmp_path / f"counts_rank{rank}.pt", weights_only=True)
        assert torch.equal(part["kept"], kept[part["rows"]]) and torch.equal(part["left_out"], left_out[part["rows"]])
        assert abs(part["slice_rows"] - whole.n / ranks) <= 1
        rows.update(part["rows"].tolist())
    assert len(rows) > len(windows) - ranks  # between them the ranks asked for nearly every window


def test_validation_windows_are_not_in_the_index(repeats_dir, tmp_path):
    cfg, index, memory = built_index(repeats_dir, tmp_path, val_fraction=0.2)
    train_strings = brute_force_counts(training_sequences(index, cfg), 30)
    windows = all_windows(index, cfg, index.val_chunks)
    counts = memory.counts(windows, cfg.prefix_tokens, exclude_self=False)
    for w, row in enumerate(windows.tolist()):
        for t in range(cfg.context_size):
            target = cfg.prefix_tokens + 1 + t
            if min(row[target - 4:target + 1]) >= 0:
                string = detokenize(row[target - 4:target + 1])
                assert counts[w, t, -1, 1].item() == train_strings[string]  # 0 unless a training chunk holds it


def test_the_index_cache_follows_the_training_split_and_the_files(repeats_dir, tmp_path, monkeypatch):
    cfg = retrieval_config(repeats_dir, tmp_path)
    rt = plm.Runtime(0, 0, 1, torch.device("cpu"))
    index = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    first = plm.load_or_build_retrieval_index(index, cfg, rt, warn=lambda m: None)
    cached = tmp_path / "ckpt" / f"retrieval_index_{first.digest}.pt"
    assert cached.exists()

    def no_build(*args):
        raise AssertionError("rebuilt an index that is cached")
    monkeypatch.setattr(plm, "build_retrieval_index", no_build)
    again = plm.load_or_build_retrieval_index(index, cfg, rt, warn=lambda m: None)
    assert again.digest == first.digest and all(torch.equal(a, b) for a, b in zip(again.keys, first.keys))
    monkeypatch.undo()
    other_split = retrieval_config(repeats_dir, tmp_path, val_fraction=0.3)
    other_index = plm.scan_genomes(other_split, warn=lambda m: None, progress=False)
    assert {c.key for c in other_index.train_chunks} != {c.key for c in index.train_chunks}
    rebuilt = plm.load_or_build_retrieval_index(other_index, other_split, rt, warn=lambda m: None)
    assert rebuilt.digest != first.digest
    assert (tmp_path / "ckpt" / f"retrieval_index_{rebuilt.digest}.pt").exists()
    assert sum(len(k) for k in rebuilt.keys) < sum(len(k) for k in first.keys)  # fewer training chunks


def test_a_changed_genome_file_changes_the_index_digest(tmp_path):
    root = tmp_path / "data"
    write_fasta(root / "s" / "s.fa", [("s1", random_dna(3000, 1))])
    cfg = retrieval_config(root, tmp_path)
    before = plm.training_chunks_digest(plm.scan_genomes(cfg, warn=lambda m: None, progress=False))
    write_fasta(root / "s" / "s.fa", [("s1", random_dna(3000, 2)), ("s2", "A")])
    after = plm.training_chunks_digest(plm.scan_genomes(cfg, warn=lambda m: None, progress=False))
    assert before != after
    path = root / "s" / "s.fa"  # one base substituted in place: same length, same chunks, new content
    text = path.read_text()
    path.write_text(text.replace("A", "C", 1))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    polished = plm.training_chunks_digest(plm.scan_genomes(cfg, warn=lambda m: None, progress=False))
    assert polished != after


def test_a_rank_that_finds_no_index_after_the_build_names_the_shared_folder(repeats_dir, tmp_path, monkeypatch):
    cfg = retrieval_config(repeats_dir, tmp_path)
    index = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    other_node = plm.Runtime(rank=1, local_rank=0, world_size=1, device=torch.device("cpu"))  # not rank 0: no build
    with pytest.raises(plm.ConfigError, match="every node must share"):
        plm.load_or_build_retrieval_index(index, cfg, other_node, warn=lambda m: None)


# ----------------------------------------------------------------------------- the mixture

def mixture_case(mixing, seed=0):
    cfg = tiny_config(global_memory="retrieval", retrieval_mixing=mixing, dropout=0.0)
    torch.manual_seed(seed)
    model = plm.PlantLM(cfg, 2).eval()
    with torch.no_grad():
        model.retrieval_head.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, plm.VOCAB_SIZE, (3, cfg.context_size + 1), generator=g)
    species = torch.tensor([0, 1, 0])
    n = torch.randint(0, 6, (3, cfg.context_size, 3), generator=g).float()
    c = torch.minimum(torch.randint(0, 4, n.shape, generator=g).float(), n)
    return cfg, model, tokens, species, torch.stack([n, c], -1)


@pytest.mark.parametrize("mixing", ["dirichlet", "gate"])
def test_with_no_context_found_the_mixture_is_the_plain_model(mixing):
    cfg, model, tokens, species, _ = mixture_case(mixing)
    nothing = torch.zeros(3, cfg.context_size, 3, 2)
    nats, _ = model(tokens[:, :-1], species, tokens[:, 1:], retrieval=nothing, reduction="none")
    logits, _ = model(tokens[:, :-1], species)
    plain = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    assert torch.allclose(nats, plain, atol=1e-5)


def test_dirichlet_smoothing_is_the_stated_recursion():
    cfg, model, tokens, species, counts = mixture_case("dirichlet")
    nats, _ = model(tokens[:, :-1], species, tokens[:, 1:], retrieval=counts, reduction="none")
    logits, hidden = model(tokens[:, :-1], species)
    p = torch.softmax(logits.double(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    alpha = model.retrieval_head(hidden).double().exp()
    for i in range(3):  # 12, then 18, then 24 bases: p <- (c + a p) / (n + a)
        n, c = counts[..., i, 0].double(), counts[..., i, 1].double()
        p = (c + alpha[..., i] * p) / (n + alpha[..., i])
    assert torch.allclose(nats.double(), -p.log(), atol=1e-5)


def test_the_gate_mixes_in_the_longest_context_that_occurs():
    cfg, model, tokens, species, counts = mixture_case("gate")
    nats, _ = model(tokens[:, :-1], species, tokens[:, 1:], retrieval=counts, reduction="none")
    logits, hidden = model(tokens[:, :-1], species)
    p = torch.softmax(logits.double(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    gates = torch.sigmoid(model.retrieval_head(hidden).double())
    expected = p.clone()
    for b in range(3):
        for t in range(cfg.context_size):
            found = [i for i in range(3) if counts[b, t, i, 0] > 0]
            if found:
                i = found[-1]
                g = gates[b, t, i]
                expected[b, t] = (1 - g) * p[b, t] + g * counts[b, t, i, 1] / counts[b, t, i, 0]
    assert torch.allclose(nats.double(), -expected.log(), atol=1e-5)


def test_each_homolog_slot_is_an_expert_that_copies_its_bases_through_substitutions():
    """The counts' gate, then a softmax over the model and each slot that has a homolog: a slot puts
    (1 - r)^matches (r / 3)^mismatches on the target, r and the weights read from its features and the hidden state."""
    _, _, tokens, species, counts = mixture_case("gate")
    cfg = tiny_config(global_memory="neighbours", index_layout="suffix_array", dropout=0.0)
    torch.manual_seed(0)
    model = plm.PlantLM(cfg, 2).eval()
    with torch.no_grad():
        model.retrieval_head.weight.normal_(0, 0.5)
        model.copy_head.weight.normal_(0, 0.5)
        model.copy_from_hidden.weight.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    targets = tokens[:, 1:]
    target_bases = (targets[..., None] >> (2 * torch.arange(5, -1, -1))) & 3
    # slot 0 holds the target, slot 1 the target with its base 2 changed, slot 2 random bases, slot 3 nothing
    bases = torch.randint(0, 4, (3, cfg.context_size, plm.NEIGHBOUR_SLOTS, 12), generator=g)
    bases[:, :, 0, 6:] = target_bases
    bases[:, :, 1, 6:] = target_bases
    bases[:, :, 1, 8] = (target_bases[..., 2] + 1) % 4
    bases[:, :, 3] = 4
    age = torch.randint(0, 20, (3, cfg.context_size, plm.NEIGHBOUR_SLOTS), generator=g)
    age[:, :, 3] = -1
    nats, _ = model(tokens[:, :-1], species, targets, retrieval=counts, neighbours=(bases, age), reduction="none")
    logits, hidden = model(tokens[:, :-1], species, neighbours=(bases, age))
    p_lm = torch.exp(model.mixed_log_probs(plm.prefix_log_probs(logits, targets, (6,)), hidden, counts))[..., 0]
    values = (model.copy_head(plm.slot_features(tokens[:, :-1], bases, age).float()) +
              model.copy_from_hidden(hidden)[:, :, None, :]).double()
    r = torch.sigmoid(values[..., 1])
    copies = torch.stack([(1 - r[..., 0]) ** 6, (1 - r[..., 1]) ** 5 * r[..., 1] / 3,
                          torch.zeros_like(r[..., 2]), torch.zeros_like(r[..., 3])], -1)
    matches = (bases[:, :, 2, 6:] == target_bases).sum(-1)
    copies[..., 2] = (1 - r[..., 2]) ** matches * (r[..., 2] / 3) ** (6 - matches)
    weights = torch.softmax(torch.cat([torch.zeros_like(values[..., :1, 0]), values[..., :3, 0]], -1), -1)
    expected = weights[..., 0] * p_lm + (weights[..., 1:] * copies[..., :3]).sum(-1)
    assert torch.allclose(nats.double(), -expected.log(), atol=1e-5)
    assert (expected > p_lm).any() and (expected < p_lm).any()


def test_the_homolog_experts_stay_finite_under_bf16_autocast():
    """A substitution rate near 1 (its logit 8): a bf16 sigmoid rounds it to 1, and log(1 - r) was -inf, so the loss
    was infinite and every gradient NaN, even where no slot matched."""
    cfg = tiny_config(global_memory="neighbours", index_layout="suffix_array")
    torch.manual_seed(0)
    model = plm.PlantLM(cfg, 2)
    with torch.no_grad():
        model.copy_head.bias.copy_(torch.tensor([0.0, 8.0]))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, plm.VOCAB_SIZE, (2, cfg.context_size + 1), generator=g)
    targets = tokens[:, 1:]
    bases = torch.zeros(2, cfg.context_size, plm.NEIGHBOUR_SLOTS, 12, dtype=torch.long)
    bases[..., 6:] = (targets[..., None, None] >> (2 * torch.arange(5, -1, -1))) & 3  # every slot copies the target
    age = torch.zeros(bases.shape[:-1], dtype=torch.long)
    counts = torch.zeros(2, cfg.context_size, 3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(tokens[:, :-1], torch.tensor([0, 1]), targets, retrieval=counts, neighbours=(bases, age))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mixing", ["dirichlet", "gate"])
def test_padding_targets_are_ignored_by_the_mixture(mixing):
    cfg, model, tokens, species, counts = mixture_case(mixing)
    targets = tokens[:, 1:].clone()
    targets[2] = -100
    mean, _ = model(tokens[:, :-1], species, targets, retrieval=counts)
    per_target, _ = model(tokens[:2, :-1], species[:2], tokens[:2, 1:], retrieval=counts[:2], reduction="none")
    assert mean.item() == pytest.approx(per_target.mean().item(), rel=1e-6)


def test_windows_carry_the_chunk_tokens_before_them_and_minus_one_before_the_chunk():
    cfg = tiny_config(global_memory="retrieval")
    tokens = np.arange(100, dtype=np.uint16)
    windows = plm.window_tokens(tokens, [0, 2, 8], cfg)
    assert windows.shape == (3, 4 + cfg.context_size + 1)
    assert windows[0, :4].tolist() == [-1, -1, -1, -1] and windows[1, :4].tolist() == [-1, -1, 0, 1]
    assert windows[2].tolist() == list(range(4, 8 + cfg.context_size + 1))
    plain = plm.window_tokens(tokens, [8], tiny_config(global_memory="none"))
    assert plain[0].tolist() == windows[2, 4:].tolist()


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def unique_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("unique") / "data"
    write_fasta(root / "s" / "s.fa.gz", [("s1", random_dna(9_000, 21))])
    return str(root)


def test_training_on_unique_sequence_learns_nothing_from_its_own_occurrence(unique_dir, tmp_path):
    """Each target is in the index once, at its own place. Were it not left out, the first step's loss would be
    far below the uniform 8.3 nats: the mixture would put half its mass on the one occurrence."""
    proc = run_train([f"--data_dir={unique_dir}", *TINY_ARGS, "--species_distribution=s:1", "--global_memory=retrieval",
                      "--max_steps=1", f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}"],
                     cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    first = next(r for r in read_jsonl(tmp_path / "logs") if "loss" in r)
    assert first["loss"] > 8.0, first


@pytest.mark.parametrize("memory,layout", [(memory, "suffix_array" if memory == "neighbours" else "tables")
                                           for memory in plm.GLOBAL_MEMORIES] + [("retrieval", "suffix_array")])
def test_every_global_memory_trains_resumes_and_evaluates(memory, layout, unique_dir, tmp_path):
    args = [f"--data_dir={unique_dir}", *TINY_ARGS, "--species_distribution=s:1", f"--global_memory={memory}",
            f"--index_layout={layout}",
            f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}", "--val_fraction=0.2"]
    first = run_train([*args, "--max_steps=2"], cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    resumed = run_train([*args, "--max_steps=3", "--resume_with_new_settings=true"], cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert ("retrieval index: " in first.stdout) == (memory in ("retrieval", "neighbours"))  # the build line
    assert "retrieval index: " not in resumed.stdout  # cached, not rebuilt
    ckpt = plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))
    assert ckpt["step"] == 3 and ckpt["config"]["global_memory"] == memory
    novel = write_fasta(tmp_path / "novel.fa", [("n1", random_dna(700, 99)), ("short", random_dna(200, 98))])
    scored = run_train(["eval", "--checkpoint", str(tmp_path / "ckpt" / "model_latest.pt"), "--species", "s", novel],
                       cwd=tmp_path, script=INFER_SCRIPT)
    assert scored.returncode == 0, describe(scored)
    overall = re.search(r"^overall\s+([\d,]+)\s+(-[\d.]+)\s+([\d.]+)$", scored.stdout, flags=re.M)
    assert overall and 1.5 < float(overall.group(3)) < 2.5, scored.stdout
    assert ("retrieval index " + str(ckpt["retrieval_index"]) in scored.stderr) == (memory in ("retrieval",
                                                                                            "neighbours"))
    embedded = run_train(["embed", "--checkpoint", str(tmp_path / "ckpt" / "model_latest.pt"), "--species", "s",
                          "--out", str(tmp_path / "embeddings.npz"), novel], cwd=tmp_path, script=INFER_SCRIPT)
    assert embedded.returncode == 0, describe(embedded)
    assert np.isfinite(np.load(tmp_path / "embeddings.npz")["embeddings"]).all()


# ----------------------------------------------------------------------------- checked before it is built

GB = 10**9


def test_index_fit_problem_names_the_shortfall_and_the_ways_out():
    """4.5 Gbp on one H200 (139 GB free): the build needs INDEX_BUILD_BYTES_PER_BASE a base on the GPU."""
    problem = plm.index_fit_problem(int(4.5e9), None, 139 * GB, 128 * GB, 64 * GB, "tables", 1)
    assert problem.startswith("the retrieval index of 4.50 Gbp of training sequence does not fit: it needs ")
    assert f"{4.5 * plm.INDEX_BUILD_BYTES_PER_BASE:,.1f} GB on each GPU (139.0 GB free)" in problem
    assert f"{4.5 * plm.INDEX_BYTES_PER_BASE:,.1f} GB on disk in checkpoint_dir (64.0 GB free)" in problem
    assert "--global_memory=none" in problem and "fewer species" in problem and "\n" not in problem


def test_index_fit_problem_is_none_where_it_fits_and_counts_a_cached_index_by_its_size():
    bundled = 117_000_000
    assert plm.index_fit_problem(bundled, None, 139 * GB, 128 * GB, 64 * GB, "tables", 1) is None
    # cached: only its own size must fit on the device, and nothing on disk
    assert plm.index_fit_problem(bundled, 8 * GB, 9 * GB, 128 * GB, 0, "tables", 1) is None
    assert "8.0 GB on each GPU (7.0 GB free)" in plm.index_fit_problem(bundled, 8 * GB, 7 * GB, 128 * GB, 0, "tables",
                                                                        1)
    # on the CPU (no device figure) host memory is what counts
    assert "in host memory" in plm.index_fit_problem(bundled, None, None, 1 * GB, 64 * GB, "tables", 1)


def test_training_stops_before_building_an_index_that_does_not_fit(unique_dir, tmp_path, monkeypatch):
    """The check runs before the build, with the real scan's figures: one line, a ConfigError, nothing built."""
    cfg = retrieval_config(unique_dir, tmp_path)
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    monkeypatch.setattr(plm, "available_host_bytes", lambda: 1000)
    rt = plm.Runtime(0, 0, 1, torch.device("cpu"))
    with pytest.raises(plm.ConfigError, match=r"does not fit: it needs .* in host memory \(0\.0 GB free\)"):
        plm.load_or_build_retrieval_index(catalog, cfg, rt, warn=lambda m: None)
    assert not os.path.exists(cfg.checkpoint_dir)  # nothing was built or written


def test_a_suffix_array_fits_where_the_tables_do_not_and_is_built_on_the_host():
    """4.5 Gbp on one H200 box: the tables' 387 GB do not fit the GPU; a suffix array's 24 GB do, and its build
    fits the host's 128 GB. At 10 Gbp the build does not, and the message says so and nothing about the GPU."""
    tables = plm.index_fit_problem(int(4.5e9), None, 139 * GB, 128 * GB, 64 * GB, "tables", 1)
    assert "--index_layout=suffix_array" in tables
    assert plm.index_fit_problem(int(4.5e9), None, 139 * GB, 128 * GB, 64 * GB, "suffix_array", 1) is None
    problem = plm.index_fit_problem(int(10e9), None, 139 * GB, 128 * GB, 64 * GB, "suffix_array", 1)
    assert f"{10 * plm.SUFFIX_INDEX_BUILD_BYTES_PER_BASE:,.1f} GB in host memory (128.0 GB free)" in problem
    assert "GPU (" not in problem and "--index_layout" not in problem and "(index_layout = suffix_array)" in problem


def test_a_suffix_array_is_sorted_on_a_gpu_with_room_for_a_group_and_on_the_host_without(monkeypatch):
    """4.5 Gbp: the text and block ends (1.2 GB), each position's group and a scan slice's mask (5.6 GB) and the
    largest group (about 4.4 % of the positions, TTT in A. thaliana: 200 M) fit an H200, not a card with 24 GB free;
    without a GPU the host sorts."""
    gpu = torch.device("cuda", 0)
    resident, largest = int(1.2 * GB) + int(4.5e9) + plm.GROUP_SCAN_SLICE, int(0.044 * 4.5e9)
    monkeypatch.setattr(plm, "free_device_bytes", lambda device: 139 * GB)
    assert plm.suffix_sort_device(gpu, resident, largest) == gpu
    monkeypatch.setattr(plm, "free_device_bytes", lambda device: 24 * GB)
    assert plm.suffix_sort_device(gpu, resident, largest) == torch.device("cpu")
    assert plm.suffix_sort_device(torch.device("cpu"), resident, largest) == torch.device("cpu")
    assert plm.suffix_sort_device(None, resident, largest) == torch.device("cpu")


def test_the_build_counts_the_groups_it_scans_on_the_gpu_in_what_the_gpu_must_hold(monkeypatch):
    """The build moves each position's group (a byte a base) to the sorting GPU for its 64 scans: the room it asks
    for holds the group and one scan slice's mask beside the 2-bit text and the block ends."""
    asked = []
    monkeypatch.setattr(plm, "suffix_sort_device", lambda device, *needs: asked.append(needs) or torch.device("cpu"))
    monkeypatch.setattr(plm, "GROUP_SCAN_SLICE", 3000)
    bases = [np.random.default_rng(0).integers(0, 4, n, dtype=np.uint8) for n in (5000, 3000)]
    index = plm.build_suffix_index(bases, "d", device=torch.device("cpu"))
    (resident, largest), = asked
    assert resident == (index.text.numel() + index.block_ends.numel()) * 8 + 8000 + 3000
    assert 8000 / plm.SUFFIX_GROUPS < largest < 8000


@pytest.mark.parametrize("scan_slice", [1 << 30, 7000])
def test_a_group_s_positions_are_the_same_from_a_host_array_and_from_a_tensor(scan_slice, monkeypatch):
    """build_suffix_index scans the groups with numpy on the host and with torch on a GPU, there a slice at a time:
    both give the positions of that group, in order, in one slice or across several."""
    monkeypatch.setattr(plm, "GROUP_SCAN_SLICE", scan_slice)
    group = np.random.default_rng(1).integers(0, plm.SUFFIX_GROUPS, 20_000, dtype=np.uint8)
    for code in (0, 17, plm.SUFFIX_GROUPS - 1):
        expected = [i for i, g in enumerate(group) if g == code]
        from_host, from_tensor = plm.group_positions(group, code), plm.group_positions(torch.from_numpy(group), code)
        assert from_host.dtype == from_tensor.dtype == torch.int64
        assert from_host.tolist() == from_tensor.tolist() == expected


def test_equal_suffixes_keep_their_text_order_in_the_array():
    """Suffixes equal in their first 30 bases and in their distance to the chunk's end tie in the build's sort; a
    stable sort keeps them in text order, so that every device builds the same rows (neighbours reads rows)."""
    rng = np.random.default_rng(2)
    repeat = rng.integers(0, 4, 40, dtype=np.uint8)
    chunk = np.concatenate([np.concatenate([repeat, rng.integers(0, 4, 7, dtype=np.uint8)]) for _ in range(300)])
    index = plm.build_suffix_index([chunk, chunk.copy()], "d")
    positions = index.positions(torch.arange(index.n))
    keys, left = plm.suffix_keys(index, positions)
    keys &= plm.top_bases_mask(left)
    tied = (keys[1:] == keys[:-1]) & (left[1:] == left[:-1])
    assert tied.sum() > 10_000  # the repeats make long runs of equal suffixes
    assert bool((positions[1:][tied] > positions[:-1][tied]).all())


def test_a_neighbours_index_that_does_not_fit_names_the_sharded_counts_not_more_gpus():
    """neighbours holds the whole suffix array on every GPU (ranks = 1): more GPUs would not help it, retrieval's
    sharded counts would. 50 Gbp on 80 GB cards."""
    problem = plm.index_fit_problem(int(50e9), None, 80 * GB, 560 * GB, 1000 * GB, "suffix_array", 1, "neighbours")
    assert "--global_memory=retrieval" in problem and "more GPUs" not in problem
    assert "more GPUs" in plm.index_fit_problem(int(50e9), None, 80 * GB, 560 * GB, 1000 * GB, "suffix_array", 8)


@pytest.mark.parametrize("layout", plm.INDEX_LAYOUTS)
def test_an_empty_batch_has_empty_counts_and_a_slice_without_rows_counts_nothing(layout, repeats_dir, tmp_path):
    """Validation's last pass can leave a rank without windows; more ranks than rows leave a slice empty."""
    cfg, catalog, memory = built_index(repeats_dir, tmp_path, index_layout=layout)
    windows = all_windows(catalog, cfg, catalog.train_chunks)
    empty = memory.counts(windows[:0], cfg.prefix_tokens, exclude_self=False)
    assert empty.shape == (0, cfg.context_size, len(plm.RETRIEVAL_CONTEXT_TOKENS), 2)
    if layout == "suffix_array":
        nothing = memory.slice_for(0, memory.n + 1)  # the first of n + 1 slices: no rows
        assert nothing.n == 0 and not nothing.in_slice(windows[0], torch.full_like(windows[0], 12)).any()


def test_each_rank_needs_room_for_its_share_of_a_suffix_array_only():
    """A cached 50 Gbp suffix array (265 GB) on 80 GB cards: 8 ranks hold 33 GB of it each, plus the 12.5 GB text,
    and fit; one does not. The tables are held whole by every rank, however many."""
    cached = int(50e9 * plm.SUFFIX_INDEX_BYTES_PER_BASE)
    assert plm.index_fit_problem(int(50e9), cached, 80 * GB, 1000 * GB, 0, "suffix_array", 8) is None
    assert "GB on each GPU (80.0 GB free)" in plm.index_fit_problem(int(50e9), cached, 80 * GB, 1000 * GB, 0,
                                                                     "suffix_array", 1)
    assert plm.index_fit_problem(int(1e9), 86 * GB, 80 * GB, 1000 * GB, 0, "tables", 8) is not None


def test_a_suffix_array_index_is_cached_apart_from_the_tables_and_loaded_again(repeats_dir, tmp_path, monkeypatch):
    cfg = retrieval_config(repeats_dir, tmp_path, index_layout="suffix_array")
    rt = plm.Runtime(0, 0, 1, torch.device("cpu"))
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    lines = []
    built = plm.load_or_build_retrieval_index(catalog, cfg, rt, warn=lines.append)
    path = tmp_path / "ckpt" / f"retrieval_index_{built.digest}.suffix_array.pt"
    assert path.exists() and not (tmp_path / "ckpt" / f"retrieval_index_{built.digest}.pt").exists()
    per_base = float(re.search(r"([\d.]+) bytes per base", lines[0]).group(1))
    assert per_base < 8, lines  # 5.3 at scale; a small file's header weighs more

    def no_build(*args):
        raise AssertionError("rebuilt an index that is cached")
    monkeypatch.setattr(plm, "build_retrieval_index", no_build)
    again = plm.load_or_build_retrieval_index(catalog, cfg, rt, warn=lambda m: None)
    windows = all_windows(catalog, cfg, catalog.train_chunks)
    assert torch.equal(again.counts(windows, cfg.prefix_tokens, True), built.counts(windows, cfg.prefix_tokens, True))


# ----------------------------------------------------------------------------- neighbours

def substituted(seq, every, first=10):
    """seq with one base changed every `every` bases from `first` on."""
    bases = list(seq)
    for i in range(first, len(bases), every):
        bases[i] = "ACGT"[("ACGT".index(bases[i]) + 1) % 4]
    return "".join(bases)


@pytest.fixture(scope="module")
def homologs_dir(tmp_path_factory):
    """Species a: 6,000 random bases. b: a's first 3,000 with a substitution every 25 bases (no 25 bases in a row
    agree). c: a's last 3,000, reverse-complemented and unchanged. With 600-base chunks, the homolog of each chunk of
    a is the same chunk of b, or a chunk of c, read on the other strand."""
    rng = np.random.default_rng(11)
    a = random_dna(6000, rng)
    root = tmp_path_factory.mktemp("homologs") / "data"
    write_fasta(root / "a" / "a.fa", [("a1", a)])
    write_fasta(root / "b" / "b.fa", [("b1", substituted(a[:3000], 25))])
    write_fasta(root / "c" / "c.fa", [("c1", reverse_complement(a[3000:]))])
    return str(root), a


def neighbour_case(homologs_dir, tmp_path):
    """(cfg, catalog, the suffix array, each training chunk of a with its windows, their starts in a, and its number)."""
    data_dir, a = homologs_dir
    cfg = tiny_config(data_dir=data_dir, global_memory="neighbours", index_layout="suffix_array", val_fraction=0.3,
                      checkpoint_dir=str(tmp_path / "ckpt"))
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    index = plm.build_retrieval_index(catalog, cfg, torch.device("cpu"), "test")
    numbers = plm.text_chunk_numbers(catalog)
    cases = []
    for chunk in plm.tokenized_chunks(catalog, cfg, [c for c in catalog.train_chunks if c.key[0] == "a"]):
        starts = plm.window_starts(chunk.n_tokens, cfg.context_size, cfg.window_stride)
        windows = torch.from_numpy(plm.window_tokens(chunk.tokens, starts, cfg).astype(np.int64))
        cases.append((chunk, windows, plm.chunk_start(chunk.key, cfg) + 6 * starts, numbers[chunk.key]))
    return cfg, catalog, index, cases


def aligned_bases(seq, window_starts, context_size):
    """For windows starting at these bases of seq: each target's 12 bases (its input token's 6, then its own), as
    base codes [W, T, 12]."""
    codes = torch.tensor(["ACGT".index(x) for x in seq])
    at = torch.tensor(window_starts)[:, None, None] + 6 * torch.arange(context_size)[:, None] + torch.arange(12)
    return codes[at]


def test_neighbours_read_a_homolog_on_through_its_substitutions_and_a_copy_on_the_other_strand(homologs_dir,
                                                                                               tmp_path):
    cfg, catalog, index, cases = neighbour_case(homologs_dir, tmp_path)
    _, a = homologs_dir
    b = substituted(a[:3000], 25)
    # chunk i of a (its key's last field) has its homolog in chunk i of b, or chunk 9 - i of c
    homolog_chunks = {(c.key[0], c.key[4]) for c in catalog.train_chunks}
    checked = {"b": 0, "c": 0}
    for chunk, windows, starts, number in cases:
        bases, age = index.neighbours(windows, cfg.prefix_tokens, torch.full((len(windows),), number))
        assert bases.shape == (len(windows), cfg.context_size, plm.NEIGHBOUR_SLOTS, 12)
        own = aligned_bases(a, starts, cfg.context_size)
        has = lambda truth: (bases == truth[:, :, None]).all(-1).any(-1)  # noqa: E731  [W, T]
        homolog = ("b", chunk.key[4]) if starts[0] < 3000 else ("c", 9 - chunk.key[4])
        if homolog not in homolog_chunks:  # it went to validation: nothing else holds these bases
            assert (age == -1).all()
            continue
        if homolog[0] == "b":
            homolog = aligned_bases(b, starts, cfg.context_size)
            # the first lookup needs 18 bases after the last substitution; then b is read on through every one
            found = has(homolog)
            assert found[:, 8:].all(), found.float().mean()
            # the window's own bases, wherever they differ from b, are in a's own chunk only: left out
            differs = (own != homolog).any(-1)
            assert differs.any() and not has(own)[differs].any()
            checked["b"] += 1
        else:  # c holds these bases exactly, on the other strand: every lookup finds them, aged 0
            found = has(own) & (age == 0).any(-1)
            assert found[:, 3:].all(), found.float().mean()
            checked["c"] += 1
    assert checked["b"] and checked["c"], checked


def test_without_chunk_numbers_neighbours_find_the_windows_own_bases(homologs_dir, tmp_path):
    """Validation and inference read every training chunk: a training window given no chunk number finds itself."""
    cfg, catalog, index, cases = neighbour_case(homologs_dir, tmp_path)
    _, a = homologs_dir
    chunk, windows, starts, number = next(case for case in cases if case[2][0] < 3000)
    bases, age = index.neighbours(windows, cfg.prefix_tokens)
    found = (bases == aligned_bases(a, starts, cfg.context_size)[:, :, None]).all(-1).any(-1)
    assert found[:, 2:].all() and not found[0, :2].any()  # the chunk's first 2 targets have no 18 bases before them


def test_compiled_lookups_count_and_find_what_the_eager_searches_do(homologs_dir, tmp_path):
    """compile_lookups, which a CUDA run calls, here compiled on the CPU: the same counts and neighbours."""
    cfg, catalog, index, cases = neighbour_case(homologs_dir, tmp_path)
    windows = torch.cat([case[1] for case in cases])
    chunks = torch.cat([torch.full((len(case[1]),), case[3]) for case in cases])
    lookups = lambda: (index.counts(windows, cfg.prefix_tokens, exclude_self=True),  # noqa: E731
                       *index.neighbours(windows, cfg.prefix_tokens, chunks))
    eager = lookups()
    # training compiles them only where it compiles the model: with compile on, on CUDA
    assert plm.with_compiled_lookups(index, cfg, torch.device("cpu")).halving is plm.halve_ranges
    off = dataclasses.replace(cfg, compile=False)
    assert plm.with_compiled_lookups(index, off, torch.device("cuda")).halving is plm.halve_ranges
    index.compile_lookups()
    assert index.halving is not plm.halve_ranges
    compiled = lookups()
    assert eager[0].sum() > 0 and (eager[2] >= 0).any()  # the homologs are found: the comparison means something
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_counts_and_neighbours_from_one_search_equal_the_two_lookups_apart(homologs_dir, tmp_path):
    """The neighbours' 18-base seeds are the counts' 18-base contexts: searched once, with the same results, in
    training (leave-one-out, chunk numbers) and in validation (neither)."""
    cfg, catalog, index, cases = neighbour_case(homologs_dir, tmp_path)
    windows = torch.cat([case[1] for case in cases])
    chunks = torch.cat([torch.full((len(case[1]),), case[3]) for case in cases])
    searched = []  # how many strings each search step narrows
    index.halving = lambda *args: searched.append(args[1].shape[1]) or plm.halve_ranges(*args)
    for exclude_self, numbers in ((True, chunks), (False, None)):
        searched.clear()
        apart = (index.counts(windows, cfg.prefix_tokens, exclude_self),
                 index.neighbours(windows, cfg.prefix_tokens, numbers))
        strings_apart = sum(searched)
        searched.clear()
        together = index.counts_and_neighbours(windows, cfg.prefix_tokens, exclude_self, numbers)
        assert torch.equal(apart[0], together[0])
        assert all(torch.equal(x, y) for x, y in zip(apart[1], together[1]))
        assert (together[1][1] >= 0).any() and together[0].sum() > 0  # the homologs are found
        targets = windows.shape[0] * cfg.context_size
        assert strings_apart == sum(searched) * 14 // 12 and sum(searched) % (12 * targets) == 0


def test_the_loaders_chunk_numbers_name_the_chunk_each_window_comes_from(repeats_dir, tmp_path):
    """Augmented training windows (frame shifts, reverse strands), two ranks: each window's bases, or their reverse
    complement, lie in the chunk its number names in the suffix array's text."""
    cfg = tiny_config(data_dir=repeats_dir, global_memory="neighbours", index_layout="suffix_array",
                      frame_shift=True, reverse_complement=0.5, checkpoint_dir=str(tmp_path / "ckpt"))
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    index = plm.build_retrieval_index(catalog, cfg, torch.device("cpu"), "test")
    codes = (index.text[:, None] >> (62 - 2 * torch.arange(32))) & 3
    text = "".join("ACGT"[x] for x in codes.flatten()[:int(index.chunk_ends[-1])].tolist())
    ends = [0] + index.chunk_ends.tolist()
    per_epoch = plm.steps_per_epoch(catalog, cfg, 2)
    seen = set()
    for rank in (0, 1):
        stream = plm.GenomeStream(catalog, cfg, rank=rank, world_size=2, steps_per_epoch=per_epoch)
        for tokens, _, _, chunks in loader_batches(stream, 0, 3):
            for window, number in zip(tokens.flatten(0, 1).tolist(), chunks.flatten().tolist()):
                chunk_text = text[ends[number]:ends[number + 1]]
                bases = detokenize([token for token in window if token >= 0])  # -1 before the chunk's start
                assert bases in chunk_text or reverse_complement(bases) in chunk_text
                seen.add(number)
    assert len(seen) > 1


def test_neighbours_need_the_suffix_array():
    with pytest.raises(plm.ConfigError, match=r"global_memory.*--index_layout=suffix_array"):
        tiny_config(global_memory="neighbours", index_layout="tables")


def test_a_model_with_neighbours_learns_to_copy_a_homolog_through_its_substitutions(tmp_path):
    """b is a with a substitution every 25 bases, so 12-24-base contexts often miss and their counts help little (a
    retrieval model stays near 1.5 bits/base here), while a copy of b's base is right 96 % of the time. 100 steps
    of the tiny model must learn to read the homologs the index finds for a validation chunk of a in b."""
    a = random_dna(20_000, 3)
    data = tmp_path / "data"
    write_fasta(data / "a" / "a.fa", [("a1", a)])
    write_fasta(data / "b" / "b.fa", [("b1", substituted(a, 25))])
    args = [f"--data_dir={data}", *TINY_ARGS, "--species_distribution=a:1,b:1", "--global_memory=neighbours",
            "--index_layout=suffix_array", "--batch_size=8", "--learning_rate=1e-3", "--max_steps=100",
            "--eval_every=100", f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}"]
    proc = run_train(args, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    last = [r for r in read_jsonl(tmp_path / "logs") if "val_bits_per_base" in r][-1]
    assert last["val_bits_per_base"] < 0.9, last

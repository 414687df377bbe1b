"""The data cache (scan_genomes and cached_validation with a cache_dir, which the trainer keeps in
checkpoint_dir/data_cache): a warm start reads no FASTA and finds what a cold one finds, warnings included; a changed
file, a changed setting or a damaged entry costs a rescan of what changed, never a stale result or a crash."""

import errno
import glob
import os
import re

import numpy as np
import pytest

from _helpers import DATA_SHAPE, random_dna, run_train, describe, TINY_ARGS, tiny_config, write_fasta
import plant_lm_train as plm


def scan(data_dir, cache_dir, **overrides):
    """(GenomeCatalog, warnings) of a scan through cache_dir."""
    warnings = []
    cfg = tiny_config(**{**DATA_SHAPE, **overrides}, data_dir=data_dir)
    cache_dir = None if cache_dir is None else str(cache_dir)
    return plm.scan_genomes(cfg, warn=warnings.append, progress=False, cache_dir=cache_dir), warnings


@pytest.fixture
def genomes(make_genomes):
    """Two species, three files, with an N gap: a few dozen 600-base chunks."""
    return make_genomes({
        "a": {"one.fa": [("a1", random_dna(5000, 1) + "N" * 20 + random_dna(3000, 2))],
              "two.fa.gz": [("a2", random_dna(4000, 3))]},
        "b": {"b.fasta": [("b1", random_dna(6000, 4)), ("b2", random_dna(2000, 5))]},
    })


@pytest.fixture
def files_read(monkeypatch):
    """The paths chunk_file streams from now on, in order."""
    paths, real = [], plm.chunk_file

    def recording(path, *args, **kwargs):
        paths.append(os.path.basename(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(plm, "chunk_file", recording)
    return paths


def forbid_reading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a warm scan read a genome")
    for name in ("chunk_file", "read_fasta", "open_genome"):
        monkeypatch.setattr(plm, name, refuse)


def test_a_warm_scan_reads_no_genome_and_finds_the_same_index(genomes, tmp_path, monkeypatch):
    cold, cold_warnings = scan(genomes, tmp_path / "cache")
    assert cold == scan(genomes, tmp_path / "elsewhere")[0] == plm.scan_genomes(
        tiny_config(**DATA_SHAPE, data_dir=genomes), warn=lambda m: None, progress=False)
    forbid_reading(monkeypatch)
    warm, warm_warnings = scan(genomes, tmp_path / "cache")
    assert warm == cold and warm_warnings == cold_warnings
    assert all(type(c.key) is tuple for c in warm.train_chunks + warm.val_chunks)  # as hashable as a scanned key


def test_warnings_and_skipped_files_repeat_on_a_cached_start(make_genomes, tmp_path, monkeypatch):
    data_dir = make_genomes({
        "dup": {"d.fa": [("chr1", random_dna(3000, 1)), ("chr1", random_dna(3000, 2))]},
        "gappy": {"g.fa": [("g1", "ACGT" * 10 + "N" * 50 + "ACGT" * 10)]},  # no run long enough for one window
        "mixed": {"good.fa": [("m1", random_dna(3000, 3))],
                  "protein.fa": [("sp|P69905|HBA_HUMAN", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF" * 20)]},
    })
    cold, cold_warnings = scan(data_dir, tmp_path / "cache")
    assert any("repeat an earlier record id" in w for w in cold_warnings)
    assert any("nothing to train on" in w for w in cold_warnings)
    assert any("looks like protein" in w and "file skipped" in w for w in cold_warnings)
    assert any("'gappy' has no usable sequence" in w for w in cold_warnings)
    forbid_reading(monkeypatch)
    warm, warm_warnings = scan(data_dir, tmp_path / "cache")
    assert warm_warnings == cold_warnings and warm == cold and warm.skipped == cold.skipped


def test_a_changed_file_is_scanned_again_and_only_it(genomes, tmp_path, files_read):
    scan(genomes, tmp_path / "cache")
    assert sorted(files_read) == ["b.fasta", "one.fa", "two.fa.gz"]
    path = os.path.join(genomes, "a", "one.fa")
    with open(path, "r+b") as f:  # an assembly polished in place: same size, an N gap where there was sequence
        f.seek(1000)
        f.write(b"N" * 30)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse file systems: mtime moves on
    del files_read[:]
    warm, _ = scan(genomes, tmp_path / "cache")
    assert files_read == ["one.fa"]
    assert warm == scan(genomes, tmp_path / "fresh")[0]
    del files_read[:]
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000))  # touched: only the mtime is new
    scan(genomes, tmp_path / "cache")
    assert files_read == ["one.fa"]


def test_a_changed_chunking_setting_scans_again(genomes, tmp_path, files_read):
    scan(genomes, tmp_path / "cache")
    del files_read[:]
    scan(genomes, tmp_path / "cache", val_fraction=0.3, seed=1)  # the split is made from the cached chunks
    assert files_read == []
    for change in (dict(chunk_size=1200), dict(context_size=16, local_attn_window=4)):
        scan(genomes, tmp_path / "cache")  # each change from the same cached settings
        del files_read[:]
        changed, _ = scan(genomes, tmp_path / "cache", **change)
        assert len(files_read) == 3, change
        assert changed == scan(genomes, tmp_path / "fresh", **change)[0]


def fields_read(genomes, use, **overrides):
    """The Config fields that use(cfg) reads."""
    read = set()

    class Watched(plm.Config):
        def __getattribute__(self, name):
            read.add(name)
            return super().__getattribute__(name)
    cfg = Watched(**vars(tiny_config(**{**DATA_SHAPE, **overrides}, data_dir=genomes)))
    use(cfg)
    return read & {f.name for f in plm.dataclasses.fields(plm.Config)}


def test_the_cache_keys_hold_every_config_field_their_code_reads(genomes):
    """SCAN_FIELDS and VALIDATION_FIELDS must name each Config field their code reads, or a changed one would reuse a
    stale entry (the retrieval memory's prefix and the augmentation settings included)."""
    one = os.path.join(genomes, "a", "one.fa")
    scanned = fields_read(genomes, lambda cfg: plm.scan_file(one, "a", "a/one.fa", cfg))
    assert scanned and scanned <= set(plm.SCAN_FIELDS), scanned
    index = scan(genomes, None)[0]
    for memory in ("retrieval", "none"):
        validated = fields_read(genomes, lambda cfg: plm.load_validation(index, cfg), global_memory=memory,
                                frame_shift=True, reverse_complement=0.5)
        assert validated and validated <= set(plm.VALIDATION_FIELDS), validated


def validation(genomes, cache_dir, **overrides):
    index, _ = scan(genomes, cache_dir, **overrides)
    warnings = []
    cfg = tiny_config(**{**DATA_SHAPE, "eval_windows": 16, **overrides}, data_dir=genomes)
    return plm.cached_validation(index, cfg, str(cache_dir), warn=warnings.append), warnings


def same_tensors(a, b):
    return all(x.dtype == y.dtype and plm.torch.equal(x, y) for x, y in zip(a, b))


def test_validation_windows_are_cached_and_follow_the_files_and_settings(genomes, tmp_path, monkeypatch, files_read):
    cold, warnings = validation(genomes, tmp_path / "cache")
    assert not warnings and len(cold[0]) == 16
    del files_read[:]
    assert same_tensors(validation(genomes, tmp_path / "cache")[0], cold) and files_read == []
    changed = validation(genomes, tmp_path / "cache", eval_windows=8)[0]
    assert same_tensors(changed, validation(genomes, tmp_path / "fresh", eval_windows=8)[0]) and files_read
    path = os.path.join(genomes, "b", "b.fasta")
    text = open(path).read()
    open(path, "w").write(text.replace("A", "C", 200))  # same size, new content and mtime
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    edited = validation(genomes, tmp_path / "cache")[0]
    assert same_tensors(edited, validation(genomes, tmp_path / "fresh2")[0])
    forbid_reading(monkeypatch)
    assert same_tensors(validation(genomes, tmp_path / "cache")[0], edited)


@pytest.mark.parametrize("damage", [b"", b"not a torch file", None])
def test_a_damaged_entry_is_noted_and_rescanned_not_a_crash(genomes, tmp_path, files_read, damage):
    cold, _ = scan(genomes, tmp_path / "cache")
    (entry,) = glob.glob(os.path.join(tmp_path, "cache", "a__one.fa.*.pt"))
    if damage is None:  # a loadable file of the wrong shape
        plm.write_atomically(entry, {"something": "else"})
    else:
        with open(entry, "wb") as f:
            f.write(damage)
    del files_read[:]
    again, warnings = scan(genomes, tmp_path / "cache")
    assert again == cold and files_read == ["one.fa"]
    assert [w for w in warnings if "unreadable cache entry" in w and entry in w], warnings
    del files_read[:]
    assert scan(genomes, tmp_path / "cache")[1] == [] and files_read == []  # the entry was written again


def test_an_unwritable_cache_is_a_note_not_a_crash(genomes, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    index, warnings = scan(genomes, blocked)
    assert index == scan(genomes, tmp_path / "cache")[0]
    assert len([w for w in warnings if w.startswith("note: ") and "is not cached" in w]) == 3, warnings


def test_training_keeps_the_scan_cache_in_checkpoint_dir(tmp_path):
    data_dir = os.path.join(tmp_path, "data")
    write_fasta(os.path.join(data_dir, "s", "g.fa"), [("c1", random_dna(6000, 7))])
    ckpt = tmp_path / "ckpt"
    proc = run_train([*TINY_ARGS, f"--data_dir={data_dir}", "--max_steps=1", "--species_distribution={}",
                      f"--checkpoint_dir={ckpt}", f"--log_dir={tmp_path / 'logs'}"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert [re.sub(r"\.[0-9a-f]{8}\.", ".", name) for name in sorted(os.listdir(ckpt / "data_cache"))] == [
        "s__g.fa.pt", "s__g.fa.soft_mask", "s__g.fa.tokens", "validation.pt"]


def test_an_io_error_is_not_cached_so_the_file_is_read_again_once_it_is_readable(genomes, tmp_path, monkeypatch):
    """EIO on a network disk, or a permission fixed later, changes neither size nor mtime: the skip must not stick."""
    real = plm.open_genome

    def failing(path):
        if path.endswith("b.fasta"):
            raise OSError(errno.EIO, "Input/output error")
        return real(path)
    monkeypatch.setattr(plm, "open_genome", failing)
    first, warnings = scan(genomes, tmp_path / "cache")
    assert first.species == ["a"] and any("b.fasta" in w and "file skipped" in w for w in warnings)
    monkeypatch.setattr(plm, "open_genome", real)
    again, _ = scan(genomes, tmp_path / "cache")
    assert again.species == ["a", "b"]


def test_a_copy_that_keeps_size_and_mtime_is_scanned_again(genomes, tmp_path, files_read):
    """rsync -a and cp -p keep a file's size and mtime: a corrected assembly of the same length, copied over."""
    scan(genomes, tmp_path / "cache")
    path = os.path.join(genomes, "a", "one.fa")
    before = os.stat(path)
    replacement = tmp_path / "one.fa"
    replacement.write_bytes(open(path, "rb").read().replace(b"N" * 20, b"A" * 20))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    files_read.clear()
    index, _ = scan(genomes, tmp_path / "cache")
    assert files_read == ["one.fa"]
    assert index == scan(genomes, None)[0]


def test_files_whose_flattened_names_agree_keep_separate_entries(make_genomes, tmp_path, monkeypatch):
    data_dir = make_genomes({"x__y": {"g.fa": [("r1", random_dna(3000, 1))]},
                             "x": {"y__g.fa": [("r2", random_dna(3000, 2))]}})
    cold, _ = scan(data_dir, tmp_path / "cache")
    forbid_reading(monkeypatch)
    assert scan(data_dir, tmp_path / "cache")[0] == cold


# ----------------------------------------------------------------------------- token stores

def test_token_stores_hold_every_chunk_as_the_fasta_reads_it(genomes, tmp_path):
    """The loader maps chunks from the scan's token stores: the same tokens, soft masks, tails and record ids, in
    the same order, as reading the FASTA files again."""
    stored, _ = scan(genomes, tmp_path / "cache")
    fresh, _ = scan(genomes, None)
    assert stored.stores and not fresh.stores
    cfg = tiny_config(**DATA_SHAPE, data_dir=genomes)
    everything = stored.train_chunks + stored.val_chunks
    mapped = list(plm.tokenized_chunks(stored, cfg, everything))
    read = list(plm.tokenized_chunks(fresh, cfg, everything))
    assert [c.key for c in mapped] == [c.key for c in read] and len(mapped) == len(everything)
    for a, b in zip(mapped, read):
        assert isinstance(a.tokens, np.memmap)
        assert (a.record_id, a.n_tokens) == (b.record_id, b.n_tokens)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.soft_mask, b.soft_mask)
        assert np.array_equal(a.tail, b.tail)


def test_a_cut_short_token_store_is_scanned_again(genomes, tmp_path, monkeypatch):
    cold, _ = scan(genomes, tmp_path / "cache")
    store = next(iter(cold.stores.values()))
    with open(store["tokens"], "r+b") as f:
        f.truncate(10)
    warm, warnings = scan(genomes, tmp_path / "cache")
    assert warm == cold and any("token store is missing or cut short" in w for w in warnings), warnings
    assert plm.token_store_holds(next(iter(warm.stores.values())))

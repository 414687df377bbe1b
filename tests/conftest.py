"""Shared fixtures for the plant_lm_train tests: synthetic genome directories and the real genomes.

The plain helpers they are built on (tiny_config, random_dna, write_fasta, ...) live in tests/_helpers.py.
"""

import dataclasses
import glob
import os

import numpy as np
import pytest
import torch

from _helpers import DATA_SHAPE, REPO, motif_genome, parse_with_biopython, random_dna, tiny_config, write_fasta
import plant_lm_train as plm

REAL_SPECIES = ("arabidopsis", "arenosa", "lyrata")
TAIR10_GLOB = "AthaTAIR10_*.fna.gz"


# ----------------------------------------------------------------------------- synthetic data

@pytest.fixture
def make_genomes(tmp_path):
    """Write {species: {file name: [(header, seq), ...]}} under tmp_path/data/<species>/ and return the data dir."""
    def make(layout):
        root = tmp_path / "data"
        root.mkdir(exist_ok=True)
        for species, files in layout.items():
            for name, records in files.items():
                write_fasta(root / species / name, records)
        return str(root)
    return make


def _gapped_record(length, seed):
    """Random DNA of `length` bases with a few N / IUPAC gaps and soft-masked stretches."""
    seq = list(random_dna(length, seed))
    rng = np.random.default_rng(seed + 1000)
    for _ in range(3):
        at, n = int(rng.integers(0, length - 20)), int(rng.integers(1, 15))
        seq[at:at + n] = ["N"] * n
    at = int(rng.integers(0, length - 10))
    seq[at] = "R"
    lo = int(rng.integers(0, length - 400))
    seq[lo:lo + 300] = [c.lower() for c in seq[lo:lo + 300]]
    return "".join(seq)


MULTI_SPECIES_LAYOUT = {
    # species a: two files (one gzipped), three records, gaps: ~40 chunks
    "a": {"g1.fa": [("a_chr1 first", 9000), ("a_chr2", 4100)], "g2.fna.gz": [("a2_chr1", 11000)]},
    # species b: one file, two records: ~26 chunks
    "b": {"b.fasta": [("b_chr1", 8000), ("b_chr2", 7500)]},
    # species c: one gzipped file: ~20 chunks
    "c": {"c.fa.gz": [("c_chr1", 12000)]},
}


@pytest.fixture(scope="module")
def genome_dir(tmp_path_factory):
    """One synthetic species 's': 6 kbp of seeded random DNA in one gzipped file (12 steps per epoch at TINY)."""
    root = tmp_path_factory.mktemp("genome") / "data"
    write_fasta(root / "s" / "s.fa.gz", [("s_chr1", random_dna(6_000, seed=11))])
    return str(root)


@pytest.fixture(scope="session")
def multi_species_dir(tmp_path_factory):
    """A synthetic data dir with species a (2 files), b, c: random DNA with gaps, deterministic (seeded)."""
    root = tmp_path_factory.mktemp("multi") / "data"
    seed = 0
    for species, files in MULTI_SPECIES_LAYOUT.items():
        for name, records in files.items():
            recs = []
            for header, length in records:
                seed += 1
                recs.append((header, _gapped_record(length, seed)))
            write_fasta(root / species / name, recs, line_width=70)
    return str(root)


@pytest.fixture(scope="session")
def multi_species_index(multi_species_dir):
    """(cfg, GenomeCatalog) of multi_species_dir with weights a:1 b:2 c:1."""
    cfg = tiny_config(**DATA_SHAPE, data_dir=multi_species_dir, species_distribution={"a": 1.0, "b": 2.0, "c": 1.0})
    warnings = []
    index = plm.scan_genomes(cfg, warn=warnings.append, progress=False)
    assert not warnings, warnings
    return cfg, index


# ----------------------------------------------------------------------------- real data

@pytest.fixture(scope="session")
def real_data_dir():
    """The real genomes: $PLANT_LM_REAL_DATA, else <repo>/data (setup_env.sh puts them there). Fails if missing."""
    root = os.environ.get("PLANT_LM_REAL_DATA", os.path.join(REPO, "data"))
    missing = [s for s in REAL_SPECIES
               if not any(plm.is_fasta_name(n) for n in (os.listdir(os.path.join(root, s))
                                                         if os.path.isdir(os.path.join(root, s)) else []))]
    if not glob.glob(os.path.join(root, "arabidopsis", TAIR10_GLOB)):
        missing.append(f"arabidopsis/{TAIR10_GLOB}")
    if missing:
        pytest.fail(f"real genomes missing under {root}: {', '.join(missing)}. Run `bash setup_env.sh` "
                    f"(extracts them into <repo>/data) or set PLANT_LM_REAL_DATA to a directory holding "
                    f"<species>/<genome>.fna.gz for {', '.join(REAL_SPECIES)}", pytrace=False)
    return root


def real_genome_path(root, species):
    pattern = TAIR10_GLOB if species == "arabidopsis" else "*"
    paths = sorted(p for p in glob.glob(os.path.join(root, species, pattern)) if plm.is_fasta_name(p))
    assert len(paths) == 1, f"expected one genome in {os.path.join(root, species)}, found {paths}"
    return paths[0]


@pytest.fixture(scope="session")
def real_genome(real_data_dir):
    """species -> path of its one real genome file (for arabidopsis, the TAIR10 file)."""
    return lambda species: real_genome_path(real_data_dir, species)


@pytest.fixture(scope="session")
def biopython_records(real_data_dir):
    """species -> [(record id, sequence str)] of its real genome parsed by Biopython, each at most once a session."""
    cache = {}

    def get(species):
        if species not in cache:
            cache[species] = parse_with_biopython(real_genome_path(real_data_dir, species))
        return cache[species]
    return get


@pytest.fixture(scope="session")
def tair10(real_data_dir, biopython_records):
    """(path, record id, sequence) of the real TAIR10 chromosome 1, parsed once by Biopython."""
    records = biopython_records("arabidopsis")
    assert len(records) == 1, [r[0] for r in records]
    return real_genome_path(real_data_dir, "arabidopsis"), records[0][0], records[0][1]


@pytest.fixture(scope="session")
def real_index(real_data_dir):
    """(cfg, GenomeCatalog, warnings) of one scan of the real data dir with the default Config."""
    cfg = plm.Config(data_dir=real_data_dir).check()
    warnings = []
    index = plm.scan_genomes(cfg, warn=warnings.append, progress=False)
    return cfg, index, warnings


# ----------------------------------------------------------------------------- checkpoints to score with

@pytest.fixture(scope="session")
def scoring_checkpoints(tmp_path_factory):
    """global_memory (and "dirichlet": retrieval with Dirichlet mixing) -> (checkpoint path, its genome file): one
    untrained tiny model per memory, its weights drawn
    wide (std 0.3) so that its predictions are far from uniform, with the retrieval index of its training chunks
    beside it. Species 's' (and an unused 't'); chr1 a repeated motif (the index knows its contexts), chr2 random.
    Scoring tests need exact arithmetic, not a trained model: this costs no training run."""
    made = {}
    for name in (*plm.GLOBAL_MEMORIES, "dirichlet"):
        memory, mixing = ("retrieval", "dirichlet") if name == "dirichlet" else (name, "gate")
        root = tmp_path_factory.mktemp(f"scoring_{name}")
        genome = write_fasta(root / "data" / "s" / "g.fa", [("chr1", motif_genome(3000, seed=3)),
                                                             ("chr2", random_dna(1000, seed=5))])
        # dropout on (the default is off): a scorer that forgot eval() would then score at random and fail the tests
        cfg = tiny_config(global_memory=memory, retrieval_mixing=mixing, data_dir=root / "data",
                          species_distribution={"s": 1}, val_fraction=0.2, dropout=0.1,
                          index_layout="suffix_array" if memory == "neighbours" else "tables")
        torch.manual_seed(0)
        model = plm.PlantLM(cfg, 2)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        digest = None
        if cfg.retrieves:
            index = plm.scan_genomes(cfg, progress=False)
            digest = plm.training_chunks_digest(index)
            plm.save_retrieval_index(plm.build_retrieval_index(index, cfg, torch.device("cpu"), digest),
                                     plm.retrieval_index_path(str(root), digest, cfg.index_layout))
        torch.save({"config": dataclasses.asdict(cfg), "species": ["s", "t"], "model_state_dict": model.state_dict(),
                    "retrieval_index": digest}, str(root / "model.pt"))
        made[name] = (str(root / "model.pt"), genome)
    return made

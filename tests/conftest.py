"""Shared fixtures for the plant_lm_train tests: synthetic FASTA genomes, small configs, the real genomes."""

import glob
import gzip
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import plant_lm_train as plm  # noqa: E402

REAL_SPECIES = ("arabidopsis", "arenosa", "lyrata")
TAIR10_GLOB = "AthaTAIR10_*.fna.gz"


# ----------------------------------------------------------------------------- synthetic data

def random_dna(n, seed, alphabet="ACGT", p=None):
    """Deterministic random sequence of n characters drawn from alphabet (numpy, seeded)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(alphabet.encode(), dtype=np.uint8)
    return letters[rng.choice(len(letters), size=n, p=p)].tobytes().decode()


def write_fasta(path, records, line_width=60, newline="\n", blank_lines=False):
    """Write [(header, sequence), ...] as FASTA; gzip-compressed when the name ends in .gz.

    line_width=None puts each sequence on one line; blank_lines adds an empty line after each sequence line.
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


def small_config(data_dir, **overrides):
    """A Config small enough for fast tests: 600-base chunks (100 tokens), 8-token context (9-token windows)."""
    values = dict(data_dir=str(data_dir), chunk_size=6 * 100, context_size=8, overlap_ratio=0.5, val_fraction=0.1,
                  eval_windows=0, batch_size=16, open_chunks_per_species=16, num_workers=0, seed=1234,
                  local_attn_window=8, species_distribution={})
    values.update(overrides)
    return plm.Config(**values).validate()


@pytest.fixture
def dna():
    """random_dna(n, seed, alphabet="ACGT", p=None) -> str."""
    return random_dna


@pytest.fixture
def fasta_writer():
    """write_fasta(path, [(header, seq), ...], line_width=60, newline="\\n", blank_lines=False) -> path."""
    return write_fasta


@pytest.fixture
def make_config():
    """small_config(data_dir, **overrides) -> a validated small Config."""
    return small_config


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
    """(cfg, GenomeIndex) of multi_species_dir with weights a:1 b:2 c:1."""
    cfg = small_config(multi_species_dir, species_distribution={"a": 1.0, "b": 2.0, "c": 1.0})
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
    """species -> [(record id, sequence str)] parsed by Biopython, each file at most once per session."""
    from Bio import SeqIO
    cache = {}

    def get(species):
        if species not in cache:
            path = real_genome_path(real_data_dir, species)
            with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as handle:
                cache[species] = [(r.id, str(r.seq)) for r in SeqIO.parse(handle, "fasta")]
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
    """(cfg, GenomeIndex, warnings) of one scan of the real data dir with the default Config."""
    cfg = plm.Config(data_dir=real_data_dir).validate()
    warnings = []
    index = plm.scan_genomes(cfg, warn=warnings.append, progress=False)
    return cfg, index, warnings

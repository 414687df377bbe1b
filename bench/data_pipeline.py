"""Single-core data-pipeline speed and streaming memory, on a generated 300 Mbp single-record gzipped FASTA.

    python bench/data_pipeline.py [--mbp 300]  -> bench/results/data_pipeline.json
Prints (1) tokenize() alone in bases/s, (2) the whole stream (gunzip + parse + split at non-ACGT + chunk +
tokenize) in bases/s, and (3) the peak RSS of a fresh process that streams the whole file.
"""

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402


def write_genome(path, n_bases, seed=0):
    """One record, 60-column lines, soft-masked stretches and N runs, written block by block."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGTacgt", dtype=np.uint8)
    block = 6_000_000
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b">chr_synthetic generated for bench/data_pipeline.py\n")
        for start in range(0, n_bases, block):
            n = min(block, n_bases - start)
            codes = rng.integers(0, 4, n, dtype=np.uint8) + 4 * (rng.random(n) < 0.3).astype(np.uint8)
            seq = letters[codes]
            for gap in rng.integers(0, n - 1000, 3):
                seq[gap:gap + 500] = ord("N")
            lines = np.full((n + 59) // 60 * 61, ord("\n"), dtype=np.uint8)
            body = lines.reshape(-1, 61)
            flat = np.zeros(body.shape[0] * 60, dtype=np.uint8)
            flat[:n] = seq
            body[:, :60] = flat.reshape(-1, 60)
            out = body.tobytes()
            if n % 60:
                out = out[: len(out) - (60 - n % 60) - 1] + b"\n"
            f.write(out)


def stream(path):
    cfg = plm.Config()
    stats = plm.FileStats()
    started = time.time()
    tokens = sum(c.n_tokens for c in plm.chunk_file(path, "bench", "bench", cfg, stats=stats))
    seconds = time.time() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bases": stats.bases, "tokens": tokens, "seconds": seconds, "peak_rss_mb": peak_mb}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mbp", type=int, default=300)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream:
        return stream(args.stream)
    codes = np.random.default_rng(1).integers(0, 8, 60_000_000, dtype=np.uint8)
    started = time.time()
    for _ in range(3):
        plm.tokenize(codes)
    tokenize_rate = 3 * len(codes) / (time.time() - started)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "genome.fa.gz")
        started = time.time()
        write_genome(path, args.mbp * 1_000_000)
        written = time.time() - started
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        out = subprocess.run([sys.executable, __file__, "--stream", path], env=env, capture_output=True, text=True,
                             check=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        size = os.path.getsize(path)
    result = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "statistic": "one run",
              "numpy": np.__version__, "tokenize_bases_per_s": tokenize_rate,
              "stream_bases_per_s": measured["bases"] / measured["seconds"], "stream": measured,
              "gzip_file_mb": size / 2**20, "generation_s": written}
    write_result(os.path.join(RESULTS, "data_pipeline.json"), result)
    print(f"tokenize alone, one core:                     {tokenize_rate / 1e6:8.1f} Mbases/s")
    print(f"gunzip+parse+split+chunk+tokenize, one core:  {result['stream_bases_per_s'] / 1e6:8.1f} Mbases/s "
          f"({measured['bases'] / 1e6:.0f} Mbp in {measured['seconds']:.1f} s)")
    print(f"peak RSS of the streaming process:            {measured['peak_rss_mb']:8.0f} MB")


if __name__ == "__main__":
    main()

"""A crop-sized data set, and what Plant LM's start-up, loader and retrieval index do with it.

    python bench/scale.py --gbp 2 --index-gbp 0.2   -> bench/results/scale.json (rewritten after every stage)

1. generate: mutated copies of the bundled genomes (data/<species>/*.fna.gz) as the spec's five crops at their
   real relative sizes (soybean 1.1, rice 0.39, maize 2.2, grape 0.49, arabidopsis 0.135 Gbp), --gbp in all: SNPs
   and 1-10-base indels at --divergence, the sources' soft-masking (repeats) and N runs kept, one gzipped FASTA
   (level 1) per species under --out, written as one gzip member per chromosome by a process pool. A second,
   --index-gbp set (other seed) is what the retrieval index is measured on: at ~11 int64 entries per base
   (keys and cumulative counts, both strands, 3 context lengths) the whole set would not fit memory or disk.
2. scan: each file scanned cold (their sum is a cold scan; a pool over files could not beat the largest), writing
   the data cache; scan_genomes reading it back; the validation windows, cold and cached.
3. first_step: `bash run.sh` to the trainer's first step log line, global_memory=none, with a fresh checkpoint_dir
   (cold: no data cache) and again (warm). Peak RSS (VmHWM) of the trainer and each DataLoader worker, from /proc
   (psutil is not a dependency).
4. loader: windows/s of one worker's EpochSampler at batch 4096 (shard 0 of 4, and of 32 = 8 GPUs x 4 workers:
   every worker streams every file and keeps only its chunks), and a 4-worker DataLoader's windows/s and worker
   peak RSS and private memory on the bundled genomes and on the big set: should not depend on genome size.
5. retrieval: step 3 with global_memory=retrieval on the index set, cold (builds and saves the index; its log line
   has the build time and size) and warm; then that index's size, bytes per base and counts() calls/s on a batch.
   --index-layout picks the layout; with suffix_array (about 5.3 bytes a base) --index-gbp 0 measures the index of
   the --gbp set itself: python bench/scale.py --gbp 4.5 --index-gbp 0 --index-layout suffix_array
6. default (only when --stages names it): step 3 with the default Config as it is (today `neighbours` over a
   suffix array) on the --gbp set, cold (scans, builds the index) and warm, with the last step's tokens/s and GPU
   memory: python bench/scale.py --gbp 4.5 --index-gbp 0 --stages default --steps 300 --run-timeout-s 900
--stages picks steps 2-6 (default: scan,none,loader,retrieval); the generated data are kept under --out and reused.
Trainer arguments after the script's own (e.g. --d_model=128 --n_layers=2 on a CPU) go to every run.sh call.
"""

import argparse
import dataclasses
import gzip
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import plant_lm_train as plm  # noqa: E402
from _results import write_result  # noqa: E402
from soak import child_pids, memory_mb  # noqa: E402

# The spec's crops at their assembly sizes (Gbp) and chromosome counts; generated sizes are --gbp in these shares.
CROPS = {"glycine_max": (1.10, 20), "oryza_sativa": (0.39, 12), "zea_mays": (2.20, 10), "vitis_vinifera": (0.49, 19),
         "arabidopsis": (0.135, 5)}
LINE = 80  # FASTA line width
PIECE = 4_000_000  # bases mutated and compressed at once: bounds each generator process's memory
SOURCES = None  # [(name, uint8 sequence)] of the bundled records; loaded before the pool forks, shared read-only


# ----------------------------------------------------------------------------- generate

def load_sources(data_dir):
    """Every record of the bundled genomes, as raw bytes (case and N runs as they are)."""
    records = []
    for species in sorted(os.listdir(data_dir)):
        folder = os.path.join(data_dir, species)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if plm.is_fasta_name(name):
                with gzip.open(os.path.join(folder, name), "rb") as f:
                    for block in f.read().split(b">")[1:]:
                        header, _, body = block.partition(b"\n")
                        records.append((header.split()[0].decode(), np.frombuffer(
                            body.translate(None, b"\r\n"), dtype=np.uint8)))
    if not records:
        raise SystemExit(f"{data_dir}: no bundled genomes; run bash setup_env.sh")
    return records


def mutate(seq, rate, rng):
    """A copy of seq with SNPs at `rate` and 1-10-base indels at rate / 10 per base, on A/C/G/T (any case) only:
    N runs stay, a changed base keeps its case, and an insertion takes the case of the base it follows."""
    upper = seq & 0xDF
    is_base = np.isin(upper, np.frombuffer(b"ACGT", dtype=np.uint8))
    out = seq.copy()
    snp = np.flatnonzero(is_base & (rng.random(len(seq)) < rate))
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    code = np.searchsorted(letters, upper[snp])  # ACGT is sorted
    out[snp] = letters[(code + rng.integers(1, 4, len(snp))) % 4] | (seq[snp] & 0x20)
    n_indels = rng.binomial(len(seq), rate / 10)
    at = np.sort(rng.choice(len(seq), n_indels, replace=False))
    size = rng.integers(1, 11, n_indels)
    deletion = rng.random(n_indels) < 0.5
    keep = np.ones(len(seq), dtype=bool)
    for start, n in zip(at[deletion], size[deletion]):
        keep[start:start + n] = False
    inserted = [letters[rng.integers(0, 4, n)] | (out[start] & 0x20) for start, n in
                zip(at[~deletion], size[~deletion])]
    pieces, last = [], 0
    for start, bases in zip(at[~deletion].tolist(), inserted):
        pieces += [out[last:start + 1][keep[last:start + 1]], bases]
        last = start + 1
    pieces.append(out[last:][keep[last:]])
    return np.concatenate(pieces)


def write_chromosome(job):
    """One chromosome (a gzip member of its own): mutated pieces of the sources, from a random record and offset on."""
    path, header, length, rate, seed = job
    rng = np.random.default_rng(seed)
    record = int(rng.integers(len(SOURCES)))
    offset = int(rng.integers(len(SOURCES[record][1])))
    written, pending = 0, np.zeros(0, dtype=np.uint8)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(f">{header}\n".encode())
        while written < length:
            source = SOURCES[record][1]
            take = min(PIECE, len(source) - offset)
            piece = mutate(source[offset:offset + take], rate, rng)[:length - written]
            offset += take
            if offset >= len(source):
                record, offset = (record + 1) % len(SOURCES), 0
            written += len(piece)
            pending = np.concatenate([pending, piece])
            full = len(pending) // LINE * LINE
            lines = np.hstack([pending[:full].reshape(-1, LINE), np.full((full // LINE, 1), 10, dtype=np.uint8)])
            f.write(lines.tobytes())
            pending = pending[full:]
        if len(pending):
            f.write(pending.tobytes() + b"\n")
    return path


def generate(out, gbp, rate, seed, processes):
    """The data set under out/<species>/<species>.scaled.fna.gz; kept when a previous call made the same."""
    stamp = os.path.join(out, "generated.json")
    wanted = json.loads(json.dumps({"gbp": gbp, "divergence": rate, "seed": seed, "crops": CROPS}))  # as read back
    if os.path.exists(stamp) and json.load(open(stamp)) == wanted:
        return {"reused": True}
    shutil.rmtree(out, ignore_errors=True)
    total = sum(size for size, _ in CROPS.values())
    jobs, files = [], {}
    for s, (species, (size, n_chrom)) in enumerate(sorted(CROPS.items())):
        os.makedirs(os.path.join(out, ".parts", species))
        bases = int(gbp * 1e9 * size / total)
        parts = [os.path.join(out, ".parts", species, f"chr{c + 1}.fa.gz") for c in range(n_chrom)]
        jobs += [(part, f"{species}_chr{c + 1} mutated copy of the bundled genomes (bench/scale.py)",
                  bases // n_chrom, rate, [seed, s, c]) for c, part in enumerate(parts)]
        files[species] = parts
    started = time.time()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        list(pool.imap_unordered(write_chromosome, sorted(jobs, key=lambda j: -j[2])))  # longest first
    for species, parts in files.items():  # concatenated gzip members are one gzip file
        os.makedirs(os.path.join(out, species))
        with open(os.path.join(out, species, f"{species}.scaled.fna.gz"), "wb") as whole:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, whole, 1 << 24)
    shutil.rmtree(os.path.join(out, ".parts"))
    json.dump(wanted, open(stamp, "w"))
    size = sum(os.path.getsize(os.path.join(out, s, f"{s}.scaled.fna.gz")) for s in files)
    return {"reused": False, "seconds": time.time() - started, "processes": processes, "gzip_bytes": size,
            "bases": sum(j[2] for j in jobs)}


# ----------------------------------------------------------------------------- scan

def scan_stage(cfg, cache_dir):
    """Each file scanned cold, writing its cache entry (their sum is a cold scan; a pool over files could not beat
    the largest), then scan_genomes reading the cache, then the validation windows, cold and cached."""
    quiet = lambda message: None  # noqa: E731
    shutil.rmtree(cache_dir, ignore_errors=True)
    genomes, _ = plm.discover_genomes(cfg, warn=quiet)
    per_file = {}
    for species, paths in genomes.items():
        for path in paths:
            label = os.path.relpath(path, cfg.data_dir)
            started = time.time()
            plm.cached_scan_file(path, species, label, cfg, cache_dir, quiet)
            per_file[label] = time.time() - started
    timed = {"cold_s": sum(per_file.values()), "per_file_s": per_file,
             "pool_over_files_bound_s": max(per_file.values())}
    started = time.time()
    index = plm.scan_genomes(cfg, warn=quiet, progress=False, cache_dir=cache_dir)
    timed["warm_s"] = time.time() - started
    for label in ("cold", "warm"):
        started = time.time()
        val_tokens = plm.cached_validation(index, cfg, cache_dir, warn=quiet)[0]
        timed[f"validation_{label}_s"] = time.time() - started
    bases = sum(st.bases for st in index.stats.values())
    return index, {**timed, "validation_windows": len(val_tokens), "bases": bases,
                   "cold_s_per_gbp": timed["cold_s"] / (bases / 1e9), "chunks": len(index.train_chunks) + len(index.val_chunks),
                   "cache_bytes": sum(os.path.getsize(os.path.join(cache_dir, n)) for n in os.listdir(cache_dir))}


# ----------------------------------------------------------------------------- first step (run.sh) and memory

def status_kb(pid):
    """(VmRSS, VmHWM) in kB of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        found += children
        todo += children
    return found


def parent_pid(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class MemoryWatch:
    """Peak RSS (VmHWM) of the trainer (torchrun's child) and of its children, sampled every half second: the
    DataLoader workers are its forks, with its command line; other children (torch.compile's pool) are 'other'."""

    def __init__(self, root):
        self.root, self.peak_mb, self.kind, self.done = root, {}, {}, False
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def classify(self, pid):
        parent = parent_pid(pid)
        if "torch.distributed.run" in cmdline(parent):
            return "trainer"
        if self.kind.get(parent) == "trainer":
            return "worker" if cmdline(pid) == cmdline(parent) else "other"
        return None  # run.sh, torchrun, the launcher's checks

    def watch(self):
        while not self.done:
            for pid in descendants(self.root):
                if pid not in self.kind and (kind := self.classify(pid)):
                    self.kind[pid] = kind
                if pid in self.kind and (kb := status_kb(pid)):
                    self.peak_mb[pid] = max(self.peak_mb.get(pid, 0), kb[1] / 1024)
            time.sleep(0.5)

    def stop(self):
        self.done = True
        self.thread.join()
        by_kind = {}
        for pid, mb in self.peak_mb.items():
            by_kind.setdefault(self.kind[pid], []).append(round(mb))
        return {f"{kind}_peak_rss_mb": sorted(mbs) for kind, mbs in by_kind.items()}


MARKS = {"retrieval_index": "retrieval index: ", "config": "config: ", "first_step": "step 1 "}
STAGES = ("scan", "none", "loader", "retrieval", "default")


def time_run_sh(data_dir, ckpt, logs, steps, trainer_args, timeout):
    """Seconds from starting `bash run.sh` to each of MARKS in the trainer's output, and the processes' peak RSS."""
    env = dict(os.environ, WANDB_MODE="disabled", WORLD_SIZE="1", PYTHONUNBUFFERED="1", DATA_DIR=data_dir,
               PYTHON=os.environ.get("PYTHON", sys.executable))
    command = ["bash", os.path.join(REPO, "run.sh"), f"--max_steps={steps}", "--log_every=1", "--checkpoint_every=0",
               "--resume=none", f"--checkpoint_dir={ckpt}", f"--log_dir={logs}", *trainer_args]
    started = time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch, seen, tail = MemoryWatch(proc.pid), {}, []
    timer = threading.Timer(timeout, kill_tree, (proc.pid,))
    timer.start()
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        for mark, prefix in MARKS.items():
            if mark not in seen and line.startswith(prefix):
                seen[mark] = round(time.time() - started, 2)
                if mark == "retrieval_index":  # its build time and size
                    seen["retrieval_index_line"] = line.strip()
        if line.startswith("step ") and "tokens_per_s" in line:  # the last one: tokens/s and GPU memory at the end
            seen["last_step_line"] = line.strip()
    proc.wait()
    timer.cancel()
    marks = {k if k.endswith("_line") else f"to_{k}_s": v for k, v in seen.items()}
    result = {"command": " ".join(command[1:]), "exit": proc.returncode, **marks,
              "wall_s": round(time.time() - started, 2), **watch.stop()}
    if proc.returncode:
        result["output_tail"] = tail
    return result


def kill_tree(pid):
    """SIGKILL `pid` and every process below it, the deepest first: run.sh puts torchrun in a process group of its
    own and torchrun each trainer in a session of its own, so neither bash's group nor its session holds them."""
    for each in [*reversed(descendants(pid)), pid]:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:  # ended meanwhile
            pass


# ----------------------------------------------------------------------------- loader

def sampler_rate(index, cfg, n_shards, seconds):
    """Windows/s of one worker's EpochSampler (shard 0 of n_shards) at batch 4096, after its first batch."""
    sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=n_shards)
    started = time.time()
    sampler.next_batch(4096)
    first = time.time() - started
    batches, started = 0, time.time()
    while time.time() - started < seconds:
        sampler.next_batch(4096)
        batches += 1
    return {"shards": n_shards, "first_batch_s": first, "windows_per_s": batches * 4096 / (time.time() - started)}


def loader_rate(index, cfg, seconds, workers):
    """The trainer's DataLoader (GenomeStream, persistent workers, prefetch 4) at batch 4096 x 1: windows/s of all
    workers together, and each worker's peak RSS."""
    from torch.utils.data import DataLoader
    cfg = dataclasses.replace(cfg, batch_size=4096, accumulation_steps=1)
    per_epoch = plm.steps_per_epoch(index, cfg, 1)
    loader = DataLoader(plm.GenomeStream(index, cfg, 0, 1, per_epoch), batch_size=None, num_workers=workers,
                        persistent_workers=True, prefetch_factor=4)
    batches, started, peak, private = 0, time.time(), {}, {}
    for batch in plm.loader_steps(iter(loader)):
        batches += 1
        if batches == workers * 5:  # each worker has made its first batch and the prefetched ones are taken
            started, counted = time.time(), batches
        for pid in child_pids(os.getpid()):
            if (kb := status_kb(pid)):
                peak[pid] = max(peak.get(pid, 0), kb[1] / 1024)
                private[pid] = max(private.get(pid, 0), memory_mb(pid)[1])
        if batches > workers * 5 and time.time() - started > seconds:
            break
    rate = (batches - counted) * cfg.batch_size / (time.time() - started)
    del loader
    return {"workers": workers, "windows_per_s": rate, "windows_per_s_per_worker": rate / workers,
            "worker_peak_rss_mb": sorted(round(mb) for mb in peak.values()),
            "worker_peak_private_mb": sorted(round(mb) for mb in private.values())}


# ----------------------------------------------------------------------------- retrieval index

def retrieval_stage(index_dir, ckpt, seconds, layout):
    """The index the cold retrieval run built (its log line gives the build time): size on disk, bytes per base
    and counts() calls/s on a batch of 4096 training windows, on the GPU if there is one."""
    import torch
    cfg = plm.Config(data_dir=index_dir, index_layout=layout).check()
    index = plm.scan_genomes(cfg, warn=lambda m: None, progress=False, cache_dir=os.path.join(ckpt, "data_cache"))
    path = plm.retrieval_index_path(ckpt, plm.training_chunks_digest(index), layout)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    memory = plm.load_retrieval_index(path, device)
    loaded = time.time() - started
    tokens = plm.EpochSampler(index, cfg, 0, 0, 1).next_batch(4096)[0]
    windows = torch.from_numpy(tokens.astype(np.int64)).to(device)
    calls, started = 0, time.time()
    while time.time() - started < seconds:
        memory.counts(windows, cfg.prefix_tokens, exclude_self=True)
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    rate = calls / (time.time() - started)
    train_bases = sum(c.n_tokens for c in index.train_chunks) * plm.BASES_PER_TOKEN
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "index_layout": layout, "index": memory.summary(), "train_bases": train_bases,
            "bytes_on_disk": os.path.getsize(path), "bytes_per_base": os.path.getsize(path) / train_bases,
            "load_s": loaded, "counts_calls_per_s": rate, "batch_windows": 4096,
            "lookups_per_s": rate * 4096 * cfg.context_size * len(plm.RETRIEVAL_CONTEXT_TOKENS)}


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gbp", type=float, default=3.0)
    parser.add_argument("--index-gbp", type=float, default=0.5, help="0: the index of the --gbp set itself")
    parser.add_argument("--index-layout", default="tables", choices=plm.INDEX_LAYOUTS)
    parser.add_argument("--divergence", type=float, default=0.03, help="SNP rate per base (indels a tenth of it)")
    parser.add_argument("--out", default="/tmp/plant_lm_scale")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "scale.json"))
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each run.sh call")
    parser.add_argument("--loader-s", type=float, default=20, help="seconds of each loader measurement")
    parser.add_argument("--run-timeout-s", type=float, default=300, help="a run.sh call is killed after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="scan,none,loader,retrieval",
                        help=f"which of {','.join(STAGES)} to run after generating the data (kept if there already)")
    args, trainer_args = parser.parse_known_args()
    stages = set(args.stages.split(","))
    if stages - set(STAGES):
        parser.error(f"--stages: {','.join(sorted(stages - set(STAGES)))} not among {','.join(STAGES)}")
    import torch
    results = {"meta": {"device": "cuda" if torch.cuda.is_available() else "cpu",  # named in retrieval: no CUDA
                        # context before the generator's pool forks
                        "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                        "command": " ".join(sys.argv), "statistic": "one run of each"}}

    def save(stage, value):
        results[stage] = value
        print(f"{stage}: {json.dumps(value)}", flush=True)
        write_result(args.results, results, atomic=True)  # rewritten after every stage: never left half-written

    global SOURCES
    SOURCES = load_sources(os.path.join(REPO, "data"))
    big = os.path.join(args.out, "data")
    index_dir = os.path.join(args.out, "index_data") if args.index_gbp else big
    data = generate(big, args.gbp, args.divergence, args.seed, args.processes)
    index_data = "not needed" if "retrieval" not in stages else "the --gbp set" if not args.index_gbp else \
        generate(index_dir, args.index_gbp, args.divergence, args.seed + 1, args.processes)
    save("generate", {"data": data, "index_data": index_data})
    SOURCES = None
    cfg = plm.Config(data_dir=big).check()
    if stages & {"scan", "loader"}:  # the loader stage measures the scan's catalog
        index, scanned = scan_stage(cfg, os.path.join(args.out, "scan_cache"))
        save("scan", scanned)

    runs = {}

    def time_runs(label, data_dir, ckpt, memory_args):
        shutil.rmtree(ckpt, ignore_errors=True)
        for start in ("cold", "warm"):  # cold: no data cache (nor retrieval index) in checkpoint_dir yet
            runs[f"{label}_{start}"] = time_run_sh(data_dir, ckpt, os.path.join(args.out, "logs"), args.steps,
                                                   [*memory_args, *trainer_args], args.run_timeout_s)
            save("first_step", runs)

    if "default" in stages:  # the default Config as it is (its memory and index layout) on the --gbp set
        time_runs("default", big, os.path.join(args.out, "ckpt_default"), [])
    if "none" in stages:
        time_runs("none", big, os.path.join(args.out, "ckpt_none"), ["--global_memory=none"])
    if "loader" in stages:
        loader_stage(index, cfg, args.loader_s, save)
    if "retrieval" in stages:
        ckpt = os.path.join(args.out, "ckpt_retrieval")
        time_runs("retrieval_on_index_data", index_dir, ckpt,
                  ["--global_memory=retrieval", f"--index_layout={args.index_layout}"])
        save("retrieval", retrieval_stage(index_dir, ckpt, args.loader_s, args.index_layout))


def loader_stage(index, cfg, seconds, save):
    """Step 4: one worker's EpochSampler on 4 and 32 shards; a 4-worker DataLoader on the bundled and the big set."""
    loader = {"one_worker_sampler": [sampler_rate(index, cfg, n, seconds) for n in (4, 32)]}
    save("loader", loader)
    bundled_cfg = plm.Config(data_dir=os.path.join(REPO, "data")).check()
    bundled = plm.scan_genomes(bundled_cfg, warn=lambda m: None, progress=False)
    for label, (i, c) in (("bundled", (bundled, bundled_cfg)), ("scaled", (index, cfg))):
        loader[f"dataloader_{label}"] = loader_rate(i, c, seconds, workers=4)
        save("loader", loader)


if __name__ == "__main__":
    main()

"""Which retrieval index, and how fast it builds on a CPU: per-phase profile of the module's builder (the sorted
(context, next 6-mer) tables of build_retrieval_index), their queries, and suffix arrays (pydivsufsort,
infini-gram) as the alternative.

    python bench/index_choice.py [--subset-mbp 12] [--full-best] [--skip-infinigram]
        -> bench/results/index_choice.json

The subset is the first training chunks of the arabidopsis genome (about 10 % of the bundled training bases).
Each builder runs in a fresh child process so its peak RSS (ru_maxrss) is its own: "proposed" is the module's
build (longest_keys + key_tables, timed apart), the reference whose tables the queries use, and is checked
bitwise against plm.build_retrieval_index run end to end; "proposed_no_numpy_hugepage" is the same with numpy's
huge-page madvise off. The builders once compared with it are gone: "current" (per length, kmer_keys + torch.unique
+ merge_counts) called module functions that no longer exist, and the numpy one-sort and per-length builders
copied what the module now does; their figures stay in bench/results/index_choice.json and BENCHMARKS.md.
The suffix-array packages are not project requirements: install them outside the venv, e.g.
    pip install --target /tmp/ixpkgs pydivsufsort   # and /tmp/igpkgs for infini-gram (prebuilt wheel)
and pass --extra-path /tmp/ixpkgs:/tmp/igpkgs.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import write_result  # noqa: E402

LENGTHS = plm.INDEX_KEY_BASES  # 18, 24, 30 bases: each context length with its next 6-mer
MAXLEN = max(LENGTHS)
REFERENCE = "proposed"  # the builder whose saved tables the others, the module's end-to-end build and the queries use


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


# ----------------------------------------------------------------------------- data

def subset_index(data_dir, species, subset_mbp):
    """The GenomeCatalog of the full data, and one restricted to the first training chunks of `species`."""
    cfg = plm.Config(data_dir=data_dir)
    t = time.time()
    index = plm.scan_genomes(cfg, warn=lambda *_: None, progress=False)
    scan_s = time.time() - t
    chosen, total = [], 0
    for chunk in index.train_chunks:
        if chunk.key[0] == species and (subset_mbp <= 0 or total < subset_mbp * 1e6):
            chosen.append(chunk)
            total += chunk.n_tokens * plm.BASES_PER_TOKEN
    sub = dataclasses.replace(index, species=[species], weights=[1.0], files={species: index.files[species]},
                              train_chunks=chosen, val_chunks=[])
    full_train_bases = sum(c.n_tokens for c in index.train_chunks) * plm.BASES_PER_TOKEN
    file_bases = {s: index.stats[s].bases for s in index.species}
    return cfg, index, sub, scan_s, full_train_bases, file_bases


def read_bases(index, cfg):
    """The module's read phase (chunk_file + token_bases), timed apart."""
    bases, lengths, t_tb = [], [], 0.0
    t0 = time.time()
    for chunk in plm.tokenized_chunks(index, cfg, index.train_chunks):
        t = time.time()
        bases.append(plm.token_bases(chunk.tokens))
        t_tb += time.time() - t
        lengths.append(len(bases[-1]))
    t = time.time()
    out = np.concatenate(bases)
    t_cat = time.time() - t
    total = time.time() - t0
    return out, lengths, {"chunk_file_s": total - t_tb - t_cat, "token_bases_s": t_tb, "concatenate_s": t_cat}


# ----------------------------------------------------------------------------- builders

def proposed_build(bases, lengths):
    """The module's builder: build_retrieval_index after its read (longest_keys of both strands, then key_tables),
    its two phases timed apart. build_retrieval_index itself reads the genome files, so it runs once in the parent
    (module_build_retrieval_index_subset), and its tables are checked against these."""
    phases = {}
    t = time.time()
    forward = torch.from_numpy(bases)
    reverse = 3 - forward.flip(0)
    packed = torch.cat([plm.longest_keys(forward, lengths, plm.INDEX_KEY_BASES),
                        plm.longest_keys(reverse, lengths[::-1], plm.INDEX_KEY_BASES)])
    del forward, reverse
    phases["longest_keys_s"] = time.time() - t
    t = time.time()
    keys, cumulative = plm.key_tables(packed)
    phases["sort_and_run_starts_s"] = time.time() - t
    return keys, cumulative, phases


BUILDERS = {
    "proposed": proposed_build,
    "proposed_no_numpy_hugepage": lambda b, l: (np._core.multiarray._set_madvise_hugepage(False), proposed_build(b, l))[1],
}


def child_build(args):
    """One builder in this (fresh) process, on the bases cached by the parent; compares with the reference."""
    torch.set_num_threads(args.threads)
    data = np.load(args.bases_file)
    bases, lengths = data["bases"], data["lengths"].tolist()
    base_rss = plm.host_rss_mb() / 1024
    t = time.time()
    keys, cumulative, phases = BUILDERS[args.child](bases, lengths)
    build_s = time.time() - t
    result = {"builder": args.child, "threads": args.threads, "build_s": build_s, "phases": phases,
              "peak_rss_gb": peak_rss_gb(), "rss_before_build_gb": base_rss,
              "entries": [len(k) for k in keys], "table_gb": sum(k.numel() * 8 + c.numel() * 8
                                                                  for k, c in zip(keys, cumulative)) / 1e9}
    if args.save_to:
        t = time.time()
        plm.save_retrieval_index(plm.RetrievalIndex(keys, cumulative, "bench"), args.save_to)
        result["save_s"] = time.time() - t
        result["file_gb"] = os.path.getsize(args.save_to) / 1e9
    if args.reference and os.path.exists(args.reference):
        ref = torch.load(args.reference, weights_only=True, mmap=True)
        result["bitwise_equal_to_reference"] = all(
            a.dtype == b.dtype and torch.equal(a, b) for a, b in
            zip(ref["keys"] + ref["cumulative"], keys + cumulative))
    print("RESULT " + json.dumps(result), flush=True)


def run_child(name, bases_file, threads=2, save_to=None, reference=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--bases-file", bases_file,
           "--threads", str(threads)]
    if save_to:
        cmd += ["--save-to", save_to]
    if reference:
        cmd += ["--reference", reference]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            print(f"  {name:28s} {result['build_s']:7.1f} s  peak {result['peak_rss_gb']:.2f} GB  "
                  f"equal={result.get('bitwise_equal_to_reference')}  {result['phases']}", flush=True)
            return result
    print(out.stdout[-2000:], out.stderr[-4000:])
    return {"builder": name, "error": out.stderr[-1000:]}


# ----------------------------------------------------------------------------- queries

def query_windows(bases, lengths, n_windows, rng):
    """[n_windows, 4 + 64 + 1] token windows from the training pieces (the model's batch shape), all known."""
    tokens = []
    offset = 0
    for n in lengths:
        tokens.append(plm.tokenize((bases[offset:offset + n]).astype(np.uint8)))
        offset += n
    width = max(plm.RETRIEVAL_CONTEXT_TOKENS) + 64 + 1
    pick = rng.integers(0, len(tokens), n_windows)
    out = np.empty((n_windows, width), dtype=np.int64)
    for i, p in enumerate(pick):
        s = rng.integers(0, len(tokens[p]) - width)
        out[i] = tokens[p][s:s + width]
    return torch.from_numpy(out)


def table_queries(index_path, windows, repeats=3):
    saved = torch.load(index_path, weights_only=True)
    memory = plm.RetrievalIndex(saved["keys"], saved["cumulative"], "bench")
    prefix = max(plm.RETRIEVAL_CONTEXT_TOKENS)
    times = []
    for _ in range(repeats):
        t = time.time()
        counts = memory.counts(windows, prefix, exclude_self=False)
        times.append(time.time() - t)
    return counts, float(np.median(times)), times


def sa_text(bases, lengths):
    """Both strands as bytes 0..3, a separator 4 after every piece, MAXLEN + 8 bytes of 4 at the end."""
    reverse = (3 - bases[::-1]).astype(np.uint8)
    pieces = []
    for strand, lens in ((bases, lengths), (reverse, lengths[::-1])):
        ends = np.cumsum(lens)
        seps = np.full(len(lens), 4, dtype=np.uint8)
        pieces.append(np.insert(strand.astype(np.uint8), ends, seps))
    return np.concatenate(pieces + [np.full(MAXLEN + 8, 4, dtype=np.uint8)])


def sa_count(sa, words_view, patterns, m, pad_value):
    """For each pattern (Q x 32 uint8, first m bytes used): how many suffixes are < pattern padded with pad_value
    (0 -> lower bound, 255 -> past the last suffix starting with it). Vectorized binary search, 8 bytes a gather."""
    q = len(patterns)
    padded = patterns.copy()
    padded[:, m:] = pad_value
    nw = m // 8 + 1  # at least one pad byte, so that the 255-padding sorts after every suffix equal on m
    target = padded.view(">u8")[:, :nw].astype(np.uint64)  # Q x nw, big-endian words = lexicographic order
    lo = np.zeros(q, dtype=np.int64)
    hi = np.full(q, len(sa), dtype=np.int64)
    for _ in range(int(np.ceil(np.log2(len(sa) + 1)))):
        mid = (lo + hi) >> 1
        pos = sa[np.minimum(mid, len(sa) - 1)].astype(np.int64)
        less = np.zeros(q, dtype=bool)
        equal = np.ones(q, dtype=bool)
        for w in range(nw):
            word = words_view[pos + 8 * w].astype(np.uint64)
            less |= equal & (word < target[:, w])
            equal &= word == target[:, w]
        active = lo < hi
        go_right = active & less
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)
    return lo


def sa_queries(text, sa, windows):
    """The same counts as RetrievalIndex.counts: for each target and context length, (context, context+target)."""
    words = np.ndarray(shape=(len(text) - 8,), dtype=">u8", buffer=text, strides=(1,))
    prefix = max(plm.RETRIEVAL_CONTEXT_TOKENS)
    t_tokens = windows.shape[1] - prefix - 1
    grams = windows.unfold(1, prefix + 1, 1)[:, 1:t_tokens + 1].reshape(-1, prefix + 1).numpy()  # Q x 5 tokens
    b = plm.token_bases(grams.reshape(-1)).reshape(len(grams), -1)  # Q x 30 bases
    out = np.zeros((len(grams), len(LENGTHS), 2), dtype=np.int64)
    for i, L in enumerate(LENGTHS):
        pat = np.zeros((len(grams), 32), dtype=np.uint8)
        pat[:, :L] = b[:, MAXLEN - L:]
        for j, m in enumerate((L - plm.BASES_PER_TOKEN, L)):
            out[:, i, j] = sa_count(sa, words, pat, m, 255) - sa_count(sa, words, pat, m, 0)
    return out.reshape(windows.shape[0], t_tokens, len(LENGTHS), 2)


def bench_pydivsufsort(bases, lengths, windows, table_counts):
    import pydivsufsort
    import importlib.metadata as md
    result = {"package": "pydivsufsort", "version": md.version("pydivsufsort")}
    text = sa_text(bases, lengths)
    result["text_bytes"] = int(len(text))
    rss0 = plm.host_rss_mb() / 1024
    t = time.time()
    sa = pydivsufsort.divsufsort(text[:len(text) - MAXLEN - 8])
    result["sa_build_s"] = time.time() - t
    result["sa_dtype"] = str(sa.dtype)
    result["sa_bytes"] = int(sa.nbytes)
    result["rss_added_by_build_gb"] = plm.host_rss_mb() / 1024 - rss0
    n_sub = 16384  # timing on a slice, then the full batch when it is quick enough
    sub = windows[: max(1, n_sub // 64)]
    t = time.time()
    counts_sub = sa_queries(text, sa, sub)
    sub_s = time.time() - t
    result["query_subset_targets"] = int(sub.shape[0] * 64)
    result["query_subset_s"] = sub_s
    result["query_s_per_262144_targets_extrapolated"] = sub_s * 262144 / (sub.shape[0] * 64)
    ref = table_counts[: sub.shape[0]].long().numpy()
    result["counts_equal_to_table"] = bool(np.array_equal(counts_sub, ref))
    result["note"] = ("the suffix array also counts a context in the last 6 bases of a piece (no next 6-mer after "
                      "it), the table does not: a few context counts are 1 higher")
    if result["query_s_per_262144_targets_extrapolated"] < 120:
        t = time.time()
        counts = sa_queries(text, sa, windows)
        result["query_s_262144_targets"] = time.time() - t
        differ = counts != table_counts.long().numpy()
        result["counts_differing_full_batch"] = int(differ.sum())
        result["counts_compared_full_batch"] = int(differ.size)
        result["differing_are_context_counts_one_higher"] = bool(
            (differ[..., 1].sum() == 0) and np.all((counts - table_counts.long().numpy())[differ] >= 1))
    return result


def bench_infinigram(bases, lengths, windows, table_counts, workdir):
    """infini-gram's own indexer (rust_indexing, prebuilt in the wheel) and engine (cpp_engine) on u8 tokens
    = bases 0..3; its tokenize step (transformers, JSON text) is bypassed by writing tokenized.0/offset.0."""
    import argparse as ap
    from infini_gram import indexing
    from infini_gram.engine import InfiniGramEngine
    result = {"package": "infini-gram"}
    try:
        import importlib.metadata as md
        result["version"] = md.version("infini-gram")
    except Exception:
        pass
    save_dir = os.path.join(workdir, "infinigram")
    os.makedirs(save_dir, exist_ok=True)
    reverse = (3 - bases[::-1]).astype(np.uint8)
    offsets, pos = [], 0
    with open(os.path.join(save_dir, "tokenized.0"), "wb") as f:
        for strand, lens in ((bases, lengths), (reverse, lengths[::-1])):
            o = 0
            for n in lens:
                content = b"\xff" + strand[o:o + n].astype(np.uint8).tobytes()
                f.write(content)
                offsets.append(pos)
                pos += len(content)
                o += n
    np.array(offsets, dtype=np.uint64).tofile(os.path.join(save_dir, "offset.0"))
    args = ap.Namespace(save_dir=save_dir, temp_dir=save_dir, worker_id=0, shards=1, workers=1, cpus=2, mem=8,
                        token_width=1)
    cwd = os.getcwd()
    t = time.time()
    try:
        indexing.build_sa(args)
    finally:
        os.chdir(cwd)
    result["sa_build_s"] = time.time() - t
    result["index_bytes"] = {f: os.path.getsize(os.path.join(save_dir, f)) for f in os.listdir(save_dir)}
    engine = InfiniGramEngine(index_dir=save_dir, eos_token_id=254, vocab_size=255, token_dtype="u8")
    prefix = max(plm.RETRIEVAL_CONTEXT_TOKENS)
    grams = windows.unfold(1, prefix + 1, 1)[:, 1:65].reshape(-1, prefix + 1).numpy()
    b = plm.token_bases(grams.reshape(-1)).reshape(len(grams), -1)
    n_q = 4096
    ref = table_counts.reshape(-1, len(LENGTHS), 2)[:n_q].long().numpy()
    got = np.zeros_like(ref)
    queries = [[b[q, MAXLEN - L:MAXLEN - L + m].tolist() for i, L in enumerate(LENGTHS)
                for m in (L - plm.BASES_PER_TOKEN, L)] for q in range(n_q)]
    t = time.time()
    for q in range(n_q):
        for j, ids in enumerate(queries[q]):
            got[q, j // 2, j % 2] = engine.count(input_ids=ids)["count"]
    s = time.time() - t
    result["query_subset_targets"] = n_q
    result["query_subset_s"] = s
    result["query_s_per_262144_targets_extrapolated"] = s * 262144 / n_q
    result["counts_equal_to_table"] = bool(np.array_equal(got, ref))
    return result


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="data")
    p.add_argument("--species", default="arabidopsis")
    p.add_argument("--subset-mbp", type=float, default=12.0)
    p.add_argument("--builders", default=REFERENCE, help=f"comma-separated, of {', '.join(BUILDERS)}; "
                   f"{REFERENCE} (the reference) always runs, first")
    p.add_argument("--full-best", action="store_true", help="also run --full-builders on the full training data")
    p.add_argument("--full-builders", default=REFERENCE)
    p.add_argument("--skip-infinigram", action="store_true")
    p.add_argument("--extra-path", default="/tmp/ixpkgs:/tmp/igpkgs")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "index_choice.json"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--summarize-only", action="store_true", help="recompute the summary of an existing --out")
    # child mode
    p.add_argument("--child", default=None)
    p.add_argument("--bases-file", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-to", default=None)
    p.add_argument("--reference", default=None)
    args = p.parse_args()
    if args.child:
        return child_build(args)
    if args.summarize_only:
        with open(args.out) as f:
            return write_result(args.out, summarize(json.load(f)), default=float)
    for extra in reversed([x for x in args.extra_path.split(":") if x]):
        sys.path.insert(1, extra)

    workdir = args.workdir or tempfile.mkdtemp(prefix="index_choice_", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    report = {"device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                        f"({open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()})",
              "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
              "torch_threads": torch.get_num_threads(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "runs": "one run of each builder (fresh process); "
              "table queries: median of 3", "machine_shared_with_other_jobs": True}
    print("scanning", args.data_dir, flush=True)
    cfg, full, sub, scan_s, full_train_bases, file_bases = subset_index(args.data_dir, args.species, args.subset_mbp)
    report["scan_all_genomes_s"] = scan_s
    report["full_train_bases"] = full_train_bases
    report["file_bases"] = file_bases

    t = time.time()
    bases, lengths, read_phases = read_bases(sub, cfg)
    read_phases["total_s"] = time.time() - t
    sub_bases = len(bases)
    scale = full_train_bases / sub_bases
    report["subset"] = {"species": args.species, "train_chunks": len(sub.train_chunks), "bases_one_strand": sub_bases,
                        "fraction_of_full_train_bases": sub_bases / full_train_bases,
                        "read_phase": read_phases,
                        "read_phase_note": f"chunk_file parses the whole {args.species} file "
                                           f"({file_bases[args.species]:,} bases) whatever the subset"}
    print(f"subset: {sub_bases:,} bases ({100 / scale:.1f} % of {full_train_bases:,}); read {read_phases}", flush=True)
    bases_file = os.path.join(workdir, "bases.npz")
    np.savez(bases_file, bases=bases, lengths=np.array(lengths))

    reference = os.path.join(workdir, f"reference_{REFERENCE}.pt")
    builds = [run_child(REFERENCE, bases_file, save_to=reference)]  # first: builds[0] has the save time
    for name in args.builders.split(","):
        if name != REFERENCE:
            builds.append(run_child(name, bases_file, reference=reference))
    report["subset_builds"] = builds
    # the module itself, end to end, as the check of the instrumented reference
    t = time.time()
    module_built = plm.build_retrieval_index(sub, cfg, "cpu", "bench")
    module_s = time.time() - t
    ref = torch.load(reference, weights_only=True, mmap=True)
    report["module_build_retrieval_index_subset"] = {
        "seconds_including_read": module_s,
        "instrumented_copy_equal": all(torch.equal(a, b) for a, b in zip(ref["keys"] + ref["cumulative"],
                                                                         module_built.keys + module_built.cumulative))}
    del module_built, ref

    # extrapolation: the read phase scales with the bases of all files, the rest with training bases
    all_file_bases = sum(file_bases.values())
    read_full_s = read_phases["total_s"] * all_file_bases / file_bases[args.species]
    extrap = {}
    for b in builds:
        if "build_s" not in b:
            continue
        extrap[b["builder"]] = {
            "build_s_linear": b["build_s"] * scale,
            "build_s_nlogn": b["build_s"] * scale * np.log2(full_train_bases * 2) / np.log2(sub_bases * 2),
            "with_read_and_save_s": b["build_s"] * scale * np.log2(full_train_bases * 2) / np.log2(sub_bases * 2)
            + read_full_s + builds[0].get("save_s", 0) * scale,
            "peak_rss_gb_linear": b["peak_rss_gb"] * scale}
    report["extrapolated_full_data"] = {"scale_training_bases": scale, "read_phase_s": read_full_s, "builders": extrap,
                                        "note": "linear in training bases, nlogn for the sorts; the table sizes "
                                                "grow slower than linearly (repeats are shared across genomes)"}
    write_result(args.out, report, default=float)

    # queries: the sorted tables with torch.searchsorted (the model's own RetrievalIndex.counts)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    windows = query_windows(bases, lengths, 4096, rng)
    table_counts, median_s, all_s = table_queries(reference, windows)
    report["queries"] = {"targets": int(windows.shape[0] * 64), "lookups": "3 context lengths x (context count, "
                         "context+target count)", "table_torch_searchsorted_cpu": {"median_s": median_s, "runs_s": all_s}}
    print("table queries", median_s, flush=True)
    write_result(args.out, report, default=float)

    try:
        dss = bench_pydivsufsort(bases, lengths, windows, table_counts)
    except ImportError as e:
        dss = {"package": "pydivsufsort", "error": str(e)}
    report["queries"]["pydivsufsort_numpy_binary_search"] = dss
    print("pydivsufsort", dss, flush=True)
    write_result(args.out, report, default=float)

    if not args.skip_infinigram:
        try:
            ig = bench_infinigram(bases, lengths, windows, table_counts, workdir)
        except Exception as e:  # noqa: BLE001 - report what stopped it
            ig = {"package": "infini-gram", "error": f"{type(e).__name__}: {e}"}
        report["queries"]["infinigram"] = ig
        print("infini-gram", ig, flush=True)
        write_result(args.out, report, default=float)

    if args.full_best:
        print("full data:", args.full_builders, flush=True)
        t = time.time()
        fb, fl, fphases = read_bases(full, cfg)
        fphases["total_s"] = time.time() - t
        full_file = os.path.join(workdir, "bases_full.npz")
        np.savez(full_file, bases=fb, lengths=np.array(fl))
        del fb, fl
        report["full_data_best"] = {"read_phase": fphases}
        for name in args.full_builders.split(","):
            report["full_data_best"][name] = run_child(name, full_file)
            write_result(args.out, report, default=float)
    write_result(args.out, summarize(report), default=float)


def summarize(report):
    """The figures the README needs, and the extrapolation to the full data and to 4.5 Gbp (both strands)."""
    sub = report["subset"]["bases_one_strand"]
    full = report["full_train_bases"]
    by = {b["builder"]: b for b in report["subset_builds"] if "build_s" in b}
    fb = report.get("full_data_best", {})
    entries_full = sum(fb.get("proposed", {}).get("entries", [])) or None
    spec = 4.5e9
    q = report.get("queries", {})
    dss = q.get("pydivsufsort_numpy_binary_search", {})
    ig = q.get("infinigram", {})
    out = {"subset_bases_one_strand": sub, "full_train_bases_one_strand": full, "spec_bases_one_strand": spec,
           "current_build_subset_s": by.get("current", {}).get("build_s"),
           "current_build_full_extrapolated_s": report["extrapolated_full_data"]["builders"].get("current", {}).get(
               "build_s_nlogn"),
           "current_peak_rss_full_extrapolated_gb": report["extrapolated_full_data"]["builders"].get(
               "current", {}).get("peak_rss_gb_linear"),
           "proposed_build_subset_s": by.get("proposed", {}).get("build_s"),
           "proposed_build_full_measured_s": fb.get("proposed", {}).get("build_s"),
           "proposed_peak_rss_full_measured_gb": fb.get("proposed", {}).get("peak_rss_gb"),
           "one_sort_numpy_build_full_measured_s": fb.get("one_sort_numpy", {}).get("build_s"),
           "one_sort_numpy_peak_rss_full_measured_gb": fb.get("one_sort_numpy", {}).get("peak_rss_gb"),
           "table_entries_full": entries_full,
           "table_gb_full": fb.get("proposed", {}).get("table_gb"),
           "table_gb_4_5_gbp_linear_upper_bound": (fb.get("proposed", {}).get("table_gb") or 0) * spec / full,
           "table_build_peak_gb_4_5_gbp_linear": (fb.get("proposed", {}).get("peak_rss_gb") or 0) * spec / full,
           "sa_text_plus_pointers_gb_full": 2 * full * (1 + 4) / 1e9,
           "sa_text_plus_pointers_gb_4_5_gbp_pydivsufsort_int64": 2 * spec * (1 + 8) / 1e9,
           "sa_text_plus_pointers_gb_4_5_gbp_infinigram_5_byte": 2 * spec * (1 + 5) / 1e9,
           "pydivsufsort_build_full_extrapolated_s": dss.get("sa_build_s", 0) * full / sub,
           "pydivsufsort_build_4_5_gbp_extrapolated_s": dss.get("sa_build_s", 0) * spec / sub,
           "infinigram_build_full_extrapolated_s": ig.get("sa_build_s", 0) * full / sub,
           "infinigram_build_4_5_gbp_extrapolated_s": ig.get("sa_build_s", 0) * spec / sub,
           "query_262144_targets_s": {
               "tables_torch_searchsorted": q.get("table_torch_searchsorted_cpu", {}).get("median_s"),
               "pydivsufsort_sa_numpy_binary_search": dss.get("query_s_262144_targets"),
               "infinigram_engine_count_extrapolated": ig.get("query_s_per_262144_targets_extrapolated")},
           "query_note": "binary searches: log2 of the table or SA size, so 1.3-1.5x more steps at 4.5 Gbp; "
                         "all on this CPU, 2 threads"}
    for key in [k for k in out if k.startswith(("current_", "one_sort_numpy_")) and out[k] is None]:
        del out[key]  # builders since removed: a report made before keeps their figures (--summarize-only)
    report["summary"] = out
    return report


if __name__ == "__main__":
    main()

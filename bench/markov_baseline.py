"""Order-k nucleotide Markov baseline: the quality floor a DNA language model must beat, in bits per base.

    python bench/markov_baseline.py [--data_dir data] [--max_order 12] [--out bench/results/markov_baseline.json]

Same data as the trainer: plm.Config() with data_dir and global_memory=none overridden, so the train/validation
split and the fixed validation windows (plm.load_validation) are exactly those the language model is scored on
(global_memory changes neither; with `none` the windows carry no retrieval prefix tokens in front).

Scoring mirrors the LM: in each window of context_size + 1 = 65 tokens the LM predicts tokens 1..64, so here the
64 * 6 = 384 bases of those tokens are scored, base by base, each given up to k preceding bases taken from the window
itself (the first scored base has 6 bases of context, as the LM's first prediction has one token). A 6-mer's
probability is the product of its bases' probabilities, so bits/base here and the LM's nats/token / (6 ln 2) measure
the same thing.

Model: counts of every (j+1)-mer, j = 0..max_order, over the bases of the training chunks (one dense numpy array per
order; the top order by one np.bincount, lower orders by marginalizing it). Three smoothings, each interpolating
order j with order j-1 down to a uniform distribution:
    wb   Witten-Bell
    mad  interpolated modified absolute discounting (three discounts per order, from count-of-counts) on raw counts
    mkn  interpolated modified Kneser-Ney (as mad, lower orders on continuation counts)
Method and k (2..max_order) are chosen on a held-out 5% of the TRAINING chunks (per species, smallest hash of the
chunk key; never on validation); the model is then refit on all training chunks and scores validation.

Side check: the same scoring on the first batch of TRAINING windows the trainer draws (EpochSampler epoch 0, shard 0
of 1, 4096 windows), out of sample (model refit on the training chunks minus the ones those windows came from; counts
are additive, so theirs are subtracted) and in-sample (the full fit, which counted them: optimistic at high orders).
Also printed: the share of bases in each window set that repeat a 13-mer seen earlier in the same window.

bench/mixture_baseline.py scores the same windows with a context-mixing model over orders 0..31 (static and online
mixer weights); it replaces order-12 Kneser-Ney as the floor.
"""

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plant_lm_train as plm  # noqa: E402
from _results import write_result  # noqa: E402

METHODS = ("wb", "mad", "mkn")
HOLDOUT_FRACTION = 0.05
TRAIN_SAMPLE = 4096
REPEAT_K = 13  # k-mer length of the within-window repeat statistic
BLOCK_WINDOWS = 1024  # windows scored at once (bounds memory)
SHIFTS = (2 * np.arange(plm.BASES_PER_TOKEN - 1, -1, -1)).astype(np.int64)


def tokens_to_codes(tokens):
    """6-mer ids [..., n] -> base codes 0..3 [..., n*6] uint8: codes[i*6+j] = (token >> 2*(5-j)) & 3."""
    tokens = np.asarray(tokens).astype(np.int64)
    codes = (tokens[..., None] >> SHIFTS) & 3
    return codes.reshape(*tokens.shape[:-1], tokens.shape[-1] * plm.BASES_PER_TOKEN).astype(np.uint8)


def holdout_keys(train_chunks):
    """A deterministic ~5% of each species' training chunks (at least one when it has >= 2), by hash of the key."""
    chosen = set()
    by_species = {}
    for chunk in train_chunks:
        by_species.setdefault(chunk.key[0], []).append(chunk)
    for chunks in by_species.values():
        if len(chunks) < 2:
            continue
        ranked = sorted(chunks, key=lambda c: plm.unit_hash("markov-holdout", *c.key))
        n = min(max(1, round(HOLDOUT_FRACTION * len(chunks))), len(chunks) - 1)
        chosen.update(c.key for c in ranked[:n])
    return chosen


def load_train_codes(index, cfg):
    """{chunk key: uint8 base codes} for every training chunk, streamed file by file."""
    wanted = {c.key for c in index.train_chunks}
    codes = {}
    for name in index.species:
        for path, label in index.files.get(name, []):
            for chunk in plm.chunk_file(path, name, label, cfg, wanted=wanted):
                if chunk.tokens is not None:
                    codes[chunk.key] = tokens_to_codes(chunk.tokens)
    missing = wanted - set(codes)
    if missing:
        raise RuntimeError(f"{len(missing)} training chunks not found on re-reading, e.g. {next(iter(missing))}")
    return codes


def kmer_index(codes, length):
    """Base-4 index (first base most significant) of every `length`-mer of a code array, uint32 (length <= 15)."""
    n = len(codes) - length + 1
    km = np.zeros(max(n, 0), dtype=np.uint32)
    for i in range(length):
        km <<= 2
        km |= codes[i:i + n]
    return km


def count_orders(code_arrays, max_order):
    """counts[j] = uint32 [4^j, 4]: how often base b follows context h (j bases), j = 0..max_order.

    Only positions with j preceding bases in the same chunk count, for every j: the top order comes from one
    bincount; order j from order j+1 by summing out the context's first base, plus each chunk's first j+1 bases
    (the (j+1)-mer that has no base before it in its chunk).
    """
    length = max_order + 1
    total = sum(max(len(c) - length + 1, 0) for c in code_arrays)
    km = np.empty(total, dtype=np.uint32)
    at = 0
    for c in code_arrays:
        part = kmer_index(c, length)
        km[at:at + len(part)] = part
        at += len(part)
    flat = np.bincount(km, minlength=4**length).astype(np.uint32)
    del km
    counts = [None] * length
    counts[max_order] = flat.reshape(4**max_order, 4)
    prefixes = np.stack([c[:max_order] for c in code_arrays]).astype(np.int64) if code_arrays else None
    for j in range(max_order - 1, -1, -1):
        flat = counts[j + 1].reshape(4, 4**(j + 1)).sum(0, dtype=np.uint32)
        if prefixes is not None:
            idx = (prefixes[:, :j + 1] * (4 ** np.arange(j, -1, -1))).sum(1)
            np.add.at(flat, idx, 1)
        counts[j] = flat.reshape(4**j, 4)
    return counts


def mkn_discounts(arr):
    """Modified Kneser-Ney discounts (D1, D2, D3+) from the count-of-counts of an array (Chen & Goodman)."""
    n = [int(np.count_nonzero(arr == r)) for r in (1, 2, 3, 4)]
    if min(n) == 0:  # saturated low orders: no singletons at all, so any small discount is harmless
        return (0.5, 1.0, 1.5)
    n1, n2, n3, n4 = n
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return tuple(float(min(max(x, 0.01), cap)) for x, cap in zip(d, (1.0, 2.0, 3.0)))


class MarkovModel:
    def __init__(self, counts):
        self.counts = counts
        self.max_order = len(counts) - 1
        self.disc = [mkn_discounts(c) for c in counts]
        # continuation counts: in how many distinct one-base-longer contexts (h' = x h) was b seen after h
        self.cont = [(counts[j + 1].reshape(4, 4**j, 4) > 0).sum(0, dtype=np.uint8) for j in range(self.max_order)]
        self.cont_disc = [mkn_discounts(c) for c in self.cont]

    @staticmethod
    def add(a, b):
        return [x + y for x, y in zip(a, b)]

    def order0_entropy(self):
        p = self.counts[0][0].astype(np.float64)
        p /= p.sum()
        return float(-(p * np.log2(p)).sum())


def _discounted(rows, c, lower, disc):
    """Interpolated (modified) absolute discounting of one order, at the target base; rows [..., 4] counts."""
    d1, d2, d3 = disc
    tot = rows.sum(-1, dtype=np.int64)
    n1 = (rows == 1).sum(-1)
    n2 = (rows == 2).sum(-1)
    n3 = (rows >= 3).sum(-1)
    dc = np.where(c >= 3, d3, np.where(c == 2, d2, np.where(c == 1, d1, 0.0)))
    safe = np.maximum(tot, 1).astype(np.float64)
    p = (c - dc) / safe + (d1 * n1 + d2 * n2 + d3 * n3) / safe * lower
    return np.where(tot > 0, p, lower)


def _witten_bell(rows, c, lower):
    tot = rows.sum(-1, dtype=np.int64)
    types = (rows > 0).sum(-1)
    p = (c + types * lower) / np.maximum(tot + types, 1)
    return np.where(tot > 0, p, lower)


def score_windows(windows, model, max_order):
    """Per-window log2-probability sums for every method and order.

    windows: uint8 base codes [N, (context_size + 1) * 6]; the bases of tokens 1.. (columns 6..) are scored, the
    base in column p given min(k, p) preceding bases of its window. Returns {method: (A, B)}, float64 [N, K+1]:
    A[:, j] = sum of log2 P_j over columns >= max(j, 6); B[:, j] = log2 P_j at column j (j >= 6), so that the
    window's total under order k is A[:, k] + sum_{6 <= p < k} B[:, p] (see window_bits).
    """
    out = {m: (np.zeros((len(windows), max_order + 1)), np.zeros((len(windows), max_order + 1))) for m in METHODS}
    first = plm.BASES_PER_TOKEN
    for s in range(0, len(windows), BLOCK_WINDOWS):
        w = windows[s:s + BLOCK_WINDOWS].astype(np.int64)
        n, width = w.shape
        targets = w[:, first:]
        ctx = np.zeros((n, width), dtype=np.int64)
        lower = {m: np.full((n, width - first), 0.25) for m in METHODS}  # order j-1 at the target (mkn: continuation)
        for j in range(max_order + 1):
            if j > 0:
                ctx[:, j:] += w[:, :width - j] * 4 ** (j - 1)  # prepend base p-j as the new most significant digit
            c0 = max(j, first)  # first column with j bases before it in the window
            if c0 >= width:
                break
            h, b = ctx[:, c0:], targets[:, c0 - first:]
            rows = model.counts[j][h]
            c = np.take_along_axis(rows, b[..., None], -1)[..., 0].astype(np.float64)
            low = {m: lower[m][:, c0 - first:] for m in METHODS}
            probs = {
                "wb": _witten_bell(rows, c, low["wb"]),
                "mad": _discounted(rows, c, low["mad"], model.disc[j]),
                "mkn": _discounted(rows, c, low["mkn"], model.disc[j]),  # top order: raw counts
            }
            lower["wb"][:, c0 - first:] = probs["wb"]
            lower["mad"][:, c0 - first:] = probs["mad"]
            if j < max_order:  # lower-order distribution of mkn: continuation counts
                crow = model.cont[j][h]
                cc = np.take_along_axis(crow, b[..., None], -1)[..., 0].astype(np.float64)
                lower["mkn"][:, c0 - first:] = _discounted(crow, cc, low["mkn"], model.cont_disc[j])
            for m in METHODS:
                logp = np.log2(probs[m])
                A, B = out[m]
                A[s:s + n, j] = logp.sum(1)
                if j >= first:
                    B[s:s + n, j] = logp[:, 0]
    return out


def window_bits(scores, k):
    """Bits of each window's scored bases under order k (positions with fewer than k bases before use all)."""
    A, B = scores
    first = plm.BASES_PER_TOKEN
    return -(A[:, k] + B[:, first:k].sum(1))


def table(scores, max_order, n_bases_per_window, mask=None):
    """{method: [bits/base for k = 0..max_order]} over the windows in mask."""
    res = {}
    for m, sc in scores.items():
        sel = sc if mask is None else (sc[0][mask], sc[1][mask])
        nb = len(sel[0]) * n_bases_per_window
        res[m] = [float(window_bits(sel, k).sum() / nb) if nb else float("nan") for k in range(max_order + 1)]
    return res


def chunk_windows(codes, n_tokens, cfg):
    starts = plm.window_starts(n_tokens, cfg.context_size, cfg.window_stride) * plm.BASES_PER_TOKEN
    return codes[starts[:, None] + np.arange(cfg.window_bases)]


def within_window_repeats(windows, first):
    """Share of scored bases that end a REPEAT_K-mer already seen earlier in the same window (tandem/local repeats,
    which a copying model such as a transformer can exploit but a count-based Markov model mostly cannot)."""
    n, width = windows.shape
    km = np.zeros((n, width - REPEAT_K + 1), dtype=np.int64)
    for i in range(REPEAT_K):
        km = km * 4 + windows[:, i:width - REPEAT_K + 1 + i]
    key = (np.arange(n)[:, None] << (2 * REPEAT_K)) | km
    _, first_at = np.unique(key.ravel(), return_index=True)
    seen_before = np.ones(key.size, dtype=bool)
    seen_before[first_at] = False
    ends = np.arange(REPEAT_K - 1, width)  # column of the k-mer's last base
    scored = np.broadcast_to(ends >= first, km.shape).ravel()
    return float(seen_before[scored].mean())


def composition_entropy(windows, first):
    p = np.bincount(windows[:, first:].ravel(), minlength=4).astype(np.float64)
    p /= p.sum()
    return float(-(p[p > 0] * np.log2(p[p > 0])).sum()), p.round(4).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--max_order", type=int, default=12)
    ap.add_argument("--out", default=os.path.join("bench", "results", "markov_baseline.json"))
    args = ap.parse_args()
    if not 2 <= args.max_order <= 13:
        raise SystemExit("--max_order must be in 2..13 (order 13 needs ~2 GB per count set)")
    K = args.max_order
    t0 = time.time()
    cfg = plm.Config(data_dir=args.data_dir, global_memory="none").check()  # windows without prefix tokens
    first, per_window = plm.BASES_PER_TOKEN, cfg.context_size * plm.BASES_PER_TOKEN

    index = plm.scan_genomes(cfg, progress=False)
    print(f"[{time.time() - t0:5.1f}s] scanned: {len(index.train)} training chunks, {len(index.val)} validation "
          f"chunks, species {index.species}")
    codes = load_train_codes(index, cfg)
    held = holdout_keys(index.train_chunks)
    fit_keys = [c.key for c in index.train_chunks if c.key not in held]
    held_keys = [c.key for c in index.train_chunks if c.key in held]
    n_train_bases = sum(len(v) for v in codes.values())
    print(f"[{time.time() - t0:5.1f}s] training bases {n_train_bases:,}; held-out for selection: "
          f"{len(held_keys)} chunks, {sum(len(codes[k]) for k in held_keys):,} bases")

    # ---------------------------------------------------------------- selection on held-out training chunks
    counts_fit = count_orders([codes[k] for k in fit_keys], K)
    counts_held = count_orders([codes[k] for k in held_keys], K)
    model_fit = MarkovModel(counts_fit)
    print(f"[{time.time() - t0:5.1f}s] counted orders 0..{K}")
    n_tok = {c.key: c.n_tokens for c in index.train_chunks}
    hw = [chunk_windows(codes[k], n_tok[k], cfg) for k in held_keys]
    held_windows = np.concatenate(hw)
    held_species = np.concatenate([np.full(len(x), index.species.index(k[0])) for x, k in zip(hw, held_keys)])
    held_scores = score_windows(held_windows, model_fit, K)
    held_table = table(held_scores, K, per_window)
    print(f"[{time.time() - t0:5.1f}s] scored {len(held_windows)} held-out windows "
          f"({len(held_windows) * per_window:,} bases)")
    candidates = [(held_table[m][k], m, k) for m in METHODS for k in range(2, K + 1)]
    best_bits, method, k_best = min(candidates)

    print("\nheld-out training chunks (model fit on the other training chunks), bits/base:")
    print("  k " + "".join(f"{m:>9s}" for m in METHODS))
    for k in range(K + 1):
        print(f"{k:3d} " + "".join(f"{held_table[m][k]:9.4f}" for m in METHODS))
    print(f"chosen: {method}, k = {k_best} ({best_bits:.4f} bits/base on held-out)")

    # ---------------------------------------------------------------- refit on all training chunks, score validation
    model = MarkovModel(MarkovModel.add(counts_fit, counts_held))
    del counts_held
    val_tokens, val_species, _ = plm.load_validation(index, cfg)
    val_windows = tokens_to_codes(val_tokens.numpy())
    val_species = val_species.numpy()
    val_scores = score_windows(val_windows, model, K)
    val_table = table(val_scores, K, per_window)
    vb = window_bits(val_scores[method], k_best)
    val_bits = float(vb.sum() / (len(vb) * per_window))
    val_per_species = {name: float(vb[val_species == i].sum() / ((val_species == i).sum() * per_window))
                       for i, name in enumerate(index.species) if (val_species == i).any()}
    val_counts = {name: int((val_species == i).sum()) for i, name in enumerate(index.species)}
    h0_train = model.order0_entropy()
    h0_val, comp_val = composition_entropy(val_windows, first)
    print(f"\n[{time.time() - t0:5.1f}s] VALIDATION ({len(val_windows)} windows, {len(val_windows) * per_window:,} "
          f"bases; windows per species {val_counts}):")
    print(f"  {method} k={k_best}: {val_bits:.4f} bits/base")
    for name, bits in val_per_species.items():
        print(f"    {name:12s} {bits:.4f}")
    print(f"  order-0 entropy: training bases {h0_train:.4f}, validation scored bases {h0_val:.4f} "
          f"(ACGT {comp_val}); order-0 model on validation {val_table[method][0]:.4f}")

    # ---------------------------------------------------------------- side check: the trainer's first training windows
    sampler = plm.EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1)
    tr_tokens, tr_species, tr_keys, _ = sampler.next_batch(TRAIN_SAMPLE)
    tr_windows = tokens_to_codes(tr_tokens.astype(np.int64))
    tr_scores = score_windows(tr_windows, model, K)
    tr_table = table(tr_scores, K, per_window)
    tb = window_bits(tr_scores[method], k_best)
    tr_per_species = {name: float(tb[tr_species == i].sum() / ((tr_species == i).sum() * per_window))
                      for i, name in enumerate(index.species) if (tr_species == i).any()}
    tr_counts = {name: int((tr_species == i).sum()) for i, name in enumerate(index.species)}
    # out of sample: refit without the chunks the sample came from (counts are additive, so subtract theirs)
    sample_chunks = sorted(set(tr_keys))
    model_loo = MarkovModel([a - b for a, b in zip(model.counts, count_orders([codes[k] for k in sample_chunks], K))])
    loo_scores = score_windows(tr_windows, model_loo, K)
    del model_loo
    loo_table = table(loo_scores, K, per_window)
    lb = window_bits(loo_scores[method], k_best)
    loo_per_species = {name: float(lb[tr_species == i].sum() / ((tr_species == i).sum() * per_window))
                       for i, name in enumerate(index.species) if (tr_species == i).any()}
    loo_bits = float(lb.sum() / (len(lb) * per_window))
    in_held = np.array([k in held for k in tr_keys])
    tr_oos = None
    if in_held.any():
        oos = score_windows(tr_windows[in_held], model_fit, K)
        tr_oos = {"windows": int(in_held.sum()), "bits_per_base": table(oos, K, per_window)[method][k_best],
                  "same_windows_in_sample": table({method: tr_scores[method]}, K, per_window, in_held)[method][k_best]}
    h0_tr, comp_tr = composition_entropy(tr_windows, first)
    n_unique = len(np.unique(tr_tokens, axis=0))
    n_chunks = len(set(tr_keys))
    # species-mixture-matched comparison: validation per-species numbers weighted like the training sample
    mix = {s: tr_counts[s] / TRAIN_SAMPLE for s in tr_counts}
    val_at_train_mix = sum(mix[s] * val_per_species[s] for s in mix if s in val_per_species)
    print(f"\nSIDE CHECK: first {TRAIN_SAMPLE} TRAINING windows of EpochSampler(epoch 0, shard 0/1) "
          f"({n_unique} distinct, from {n_chunks} chunks; windows per species {tr_counts}):")
    print(f"  {method} k={k_best}, OUT OF SAMPLE (refit without the {len(sample_chunks)} chunks the windows came "
          f"from): {loo_bits:.4f} bits/base   [validation {val_bits:.4f}]")
    print(f"  {method} k={k_best}, in-sample (model fit on all training chunks, these bases counted): "
          f"{float(tb.sum() / (len(tb) * per_window)):.4f} bits/base")
    print("    species       out-of-sample  in-sample  validation")
    for name, bits in tr_per_species.items():
        print(f"    {name:12s} {loo_per_species[name]:14.4f} {bits:10.4f} {val_per_species.get(name, float('nan')):11.4f}")
    print(f"  validation re-weighted to the training sample's species mix: {val_at_train_mix:.4f}")
    if tr_oos:
        print(f"  the {tr_oos['windows']} sampled windows from held-out chunks, out of sample: "
              f"{tr_oos['bits_per_base']:.4f} (in-sample {tr_oos['same_windows_in_sample']:.4f})")
    print(f"  order-0 entropy of the sampled bases {h0_tr:.4f} (ACGT {comp_tr})")
    rep = {"validation": within_window_repeats(val_windows, first), "train_sample": within_window_repeats(tr_windows, first),
           "holdout": within_window_repeats(held_windows, first)}
    print(f"  within-window redundancy (share of scored bases whose preceding {REPEAT_K - 1} bases + itself occur "
          f"earlier in the same window): " + ", ".join(f"{k} {v:.3f}" for k, v in rep.items()))
    print(f"\nall orders, model fit on all training chunks ({method}; validation shown for information only, "
          f"never used for selection):")
    print("  k  held-out(fit w/o)  validation  train-sample(out-of-sample)  train-sample(in-sample)")
    for k in range(K + 1):
        print(f"{k:3d} {held_table[method][k]:18.4f} {val_table[method][k]:11.4f} {loo_table[method][k]:28.4f} "
              f"{tr_table[method][k]:24.4f}")

    runtime = time.time() - t0
    print(f"\nruntime {runtime:.1f}s")
    import torch
    result = {
        "device": "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "config": {"data_dir": cfg.data_dir, "chunk_size": cfg.chunk_size, "context_size": cfg.context_size,
                   "overlap_ratio": cfg.overlap_ratio, "val_fraction": cfg.val_fraction,
                   "eval_windows": cfg.eval_windows, "seed": cfg.seed},
        "scoring": "bases of tokens 1..64 of each 65-token window; each base given up to k preceding bases "
                   "from its own window (first scored base: 6)",
        "methods": {"wb": "Witten-Bell", "mad": "interpolated modified absolute discounting, raw counts",
                    "mkn": "interpolated modified Kneser-Ney"},
        "training_bases": n_train_bases,
        "selection": {"rule": f"per species, the {HOLDOUT_FRACTION:.0%} of training chunks with the smallest "
                              "unit_hash('markov-holdout', *key) (at least 1), scored in the trainer's windows",
                      "holdout_chunks": len(held_keys), "holdout_windows": int(len(held_windows)),
                      "holdout_bases_scored": int(len(held_windows) * per_window),
                      "holdout_per_species_windows": {s: int((held_species == i).sum())
                                                      for i, s in enumerate(index.species)},
                      "bits_per_base_by_order": held_table},
        "chosen": {"method": method, "k": k_best, "holdout_bits_per_base": best_bits},
        "validation": {"bits_per_base": val_bits, "per_species": val_per_species, "windows": int(len(val_windows)),
                       "windows_per_species": val_counts, "bases_scored": int(len(val_windows) * per_window),
                       "bits_per_base_by_order_info_only": val_table},
        "order0_entropy": {"training_bases": h0_train, "validation_scored_bases": h0_val,
                           "validation_acgt": comp_val},
        "train_sample_side_check": {
            "what": f"EpochSampler(index, cfg, epoch=0, shard=0, n_shards=1).next_batch({TRAIN_SAMPLE}), scored "
                    "like validation; out_of_sample: model refit on the training chunks minus those the windows came "
                    "from; in_sample: model fit on all training chunks",
            "out_of_sample": {"bits_per_base": loo_bits, "per_species": loo_per_species,
                              "bits_per_base_by_order": loo_table},
            "in_sample": {"bits_per_base": float(tb.sum() / (len(tb) * per_window)), "per_species": tr_per_species,
                          "bits_per_base_by_order": tr_table},
            "windows_per_species": tr_counts, "distinct_windows": n_unique, "chunks": n_chunks,
            "validation_at_train_species_mix": val_at_train_mix,
            "holdout_chunk_windows_out_of_sample": tr_oos,
            "order0_entropy": h0_tr, "acgt": comp_tr},
        "within_window_repeat_share": {"what": f"share of scored bases ending a {REPEAT_K}-mer that occurs earlier in "
                                               "the same window", **rep},
        "runtime_s": runtime,
    }
    write_result(args.out, result, announce=True)


if __name__ == "__main__":
    main()

"""Compressor-style context mixing over nucleotide orders 0..31: the floor a DNA language model must beat.

    python bench/mixture_baseline.py [--data_dir data] [--out bench/results/mixture_baseline.json] [--one_strand]

About 9 minutes and 12 GB peak RSS on a 2-core CPU for the bundled ~117 Mbp (--one_strand: about 5 minutes).

Windows and scoring are those of bench/markov_baseline.py: plm.Config() with data_dir and global_memory=none, the
trainer's 4,096 fixed validation windows (plm.load_validation), and in each 65-token window the 64 * 6 = 384 bases
of tokens 1..64 scored, each base given ONLY the bases of its own window before it (the first scored base has 6
bases of context; order k is unavailable for a base with fewer than k bases before it in the window). Nothing
reaches back before the window start, and validation bases are never counted.

Counts. For every order k in ORDERS (0..12, 14, 16, ..., 24, 28, 31; 31 is the longest context whose (k+1)-mer
still packs into one uint64, standing in for the "longer matches" of a compressor's match model) the number of
times each base followed each k-base context, over the bases of the training chunks, BOTH strands (each chunk and
its reverse complement; k-mers never cross a chunk end). Orders <= 12 are dense np.bincount tables; higher orders
are sorted unique uint64 keys (context << 2 | base) with counts, built one order at a time, looked up with
np.searchsorted for the positions that are scored, then freed. Two count sets are kept per order: one over the
"fit" chunks (all training chunks minus a held-out ~5%: per species the chunks with the smallest
plm.unit_hash('markov-holdout', *key), the same chunks markov_baseline.py holds out) and one over the held-out
chunks; validation is looked up in their sum, i.e. in all training chunks.

Model (PAQ/cmix style). A base is coded as two binary decisions: the high bit (A,C | G,T), then the low bit given
the high bit. For each decision and order k the counts give (c0, c1) and two inputs:
    direct  ln((c1 + 0.4) / (c0 + 0.4))            (0 when the context was never seen)
    mapped  stretch(T[k, node, q(c0), q(c1)])     q() = 16 log-spaced count levels; T = the frequency of a 1 in
                                                  that count state on the held-out fitting windows (+0.5/+1)
plus a bias: 2 * 21 + 1 = 43 inputs. The mixer is logistic: p = sigmoid(w_s . x), with the weight set s selected by
(node: high bit / low bit after A,C / low bit after G,T) x (longest order whose context occurs in training) x (is
that order's (c0, c1) one-sided): 3 * 21 * 2 = 126 weight sets.

Static mixture: T and w fitted on held-out training windows (every 3rd window of the held-out chunks, the spacing
of the validation windows; their counts come from the fit chunks only), w by Newton/IRLS per weight set (ridge
1.0), then frozen and used on validation with the counts of all training chunks.

Online mixture (weights adapt while scoring, as a compressor's mixer does; counts and T stay fixed): start from the
static w; the validation windows are processed in file order in groups of GROUP = 16 consecutive windows; inside a
group all windows advance in lockstep, base by base and bit by bit, and after every bit each window's
w_s += eta * (y - p) * x is applied (the per-bit gradient of the log loss in nats; the group's updates are summed
with np.add.at, i.e. G sequential PAQ updates made from one shared weight state). eta is chosen on the held-out
windows: w fitted on one half of the held-out chunks, online runs on the other half for each eta in ETAS.

Reference rows computed here as well: the static order-<=31 chain with Dirichlet back-off (no mixing)
p_k(b) = (n_k(b) + alpha p_{k'}(b)) / (N_k + alpha) over the same orders (k' the previous order in ORDERS, uniform
below order 0), alpha chosen on the held-out windows. Order-12 Kneser-Ney is the figure of markov_baseline.json.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import plant_lm_train as plm  # noqa: E402
from _results import write_result  # noqa: E402
from markov_baseline import holdout_keys, load_train_codes, tokens_to_codes  # noqa: E402  same holdout

BASES_PER_TOKEN = 6
ORDERS = tuple(range(13)) + (14, 16, 18, 20, 22, 24, 28, 31)
DENSE_MAX = 12  # orders up to this use a dense 4^(k+1) table
HELD_WINDOW_STEP = 3  # every 3rd window of the held-out chunks
PRIOR = 0.4  # additive prior of the direct input
LEVELS = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 1024])  # count quantization edges
NQ = len(LEVELS) + 1
RIDGE = 1.0
IRLS_ITERS = 12
GROUP = 16
ETAS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008)
ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

T0 = time.time()


def log(msg):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{time.time() - T0:6.1f}s, peak RSS {rss:5.2f} GB] {msg}", flush=True)


# ----------------------------------------------------------------------------- data (same windows as the trainer)

def chunk_windows(codes, n_tokens, cfg):
    starts = plm.window_starts(n_tokens, cfg.context_size, cfg.window_stride) * BASES_PER_TOKEN
    return codes[starts[:, None] + np.arange(cfg.window_bases)]


# ----------------------------------------------------------------------------- packing and counting

def packed32(codes):
    """codes [..., L] uint8 (0..3) -> uint64 [..., L]: bases i..i+31 packed, base i in the top 2 bits, zero past the
    end. Built by doubling (2 -> 4 -> 8 -> 16 -> 32 bases)."""
    pad = np.zeros(codes.shape[:-1] + (31,), dtype=np.uint8)
    c = np.concatenate([codes, pad], axis=-1)
    L = codes.shape[-1]
    p = c.astype(np.uint8)
    width = 1
    for dtype in (np.uint8, np.uint8, np.uint16, np.uint32, np.uint64):
        n = p.shape[-1] - width
        hi = p[..., :n].astype(dtype)
        hi <<= np.array(2 * width, dtype=dtype)
        hi |= p[..., width:width + n].astype(dtype)
        p = hi
        width *= 2
    return p[..., :L]


class TrainingText:
    """Concatenated base codes of some chunks (and their reverse complements) packed 32 bases per position, with
    the number of bases after each position inside its own chunk."""

    def __init__(self, arrays, both_strands):
        parts = list(arrays)
        if both_strands:
            parts += [(3 - a[::-1]).astype(np.uint8) for a in arrays]
        lens = np.array([len(a) for a in parts], dtype=np.int64)
        flat = np.concatenate(parts)
        self.n_bases = len(flat)
        self.packed = packed32(flat)
        del flat
        ends = np.cumsum(lens)
        self.room = (np.repeat(ends.astype(np.int32), lens) - np.int32(1)) - np.arange(self.n_bases, dtype=np.int32)

    def kmers(self, k):
        """Packed (k+1)-mers (k context bases, then the next base) at every position with k bases after it."""
        keys = self.packed[self.room >= k]
        keys >>= np.uint64(2 * (31 - k))
        return keys


class CountTable:
    """Next-base counts of one order: dense [4^k, 4] or sorted unique (context << 2 | base) keys with counts."""

    def __init__(self, text, k):
        self.k = k
        keys = text.kmers(k)
        if k <= DENSE_MAX:
            self.dense = np.bincount(keys.astype(np.intp), minlength=4 ** (k + 1)).astype(np.uint32).reshape(-1, 4)
            return
        self.dense = None
        keys.sort()
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        self.keys = keys[starts]
        self.counts = np.diff(np.append(starts, len(keys))).astype(np.uint32)

    def lookup(self, ctx):
        """ctx uint64 [n] -> uint32 [n, 4] counts of the next base."""
        if self.dense is not None:
            return self.dense[ctx.astype(np.intp)]
        order = np.argsort(ctx)
        cs = ctx[order]
        idx = np.searchsorted(self.keys, cs << np.uint64(2))
        rows = np.zeros((len(ctx), 4), dtype=np.uint32)
        n = len(self.keys)
        for t in range(4):
            j = np.minimum(idx + t, n - 1)
            kj = self.keys[j]
            hit = ((kj >> np.uint64(2)) == cs) & (idx + t < n)
            rows[hit, (kj[hit] & np.uint64(3)).astype(np.intp)] = self.counts[j[hit]]
        out = np.empty_like(rows)
        out[order] = rows
        return out


def window_counts_one(packed, k, tables, first):
    """Counts [N, S, 4] of order k for the scored columns (first..) of windows whose packed32 is `packed` [N, W],
    summed over the given tables; zero where fewer than k bases precede the column in its window."""
    n, width = packed.shape
    out = np.zeros((n, width - first, 4), dtype=np.uint32)
    c0 = max(k, first)  # first column with k bases before it in the window
    if c0 >= width:
        return out
    keys = packed[:, c0 - k:width - k] >> np.uint64(2 * (31 - k))  # bases p-k..p for columns p = c0..W-1
    ctx = (keys >> np.uint64(2)).ravel()
    total = 0
    for t in tables:
        total = total + t.lookup(ctx)
    out[:, c0 - first:] = total.reshape(n, width - c0, 4)
    return out


# ----------------------------------------------------------------------------- features

def stretch(p):
    return np.log(p / (1 - p))


def quantize(c):
    return np.searchsorted(LEVELS, c, side="right")


def node_counts(counts, targets):
    """counts [..., K, 4], targets [...] -> per node (0: high bit, 1: low bit) c0, c1 [..., 2, K], the bits
    y [..., 2] and node types [..., 2] (0 high bit, 1 low bit after A/C, 2 low bit after G/T)."""
    c = counts.astype(np.float32)
    hi = (targets >> 1).astype(np.int64)
    lo = (targets & 1).astype(np.int64)
    c1_hi = c[..., 2] + c[..., 3]
    c0_hi = c[..., 0] + c[..., 1]
    h = hi[..., None]
    c0_lo = np.where(h == 1, c[..., 2], c[..., 0])
    c1_lo = np.where(h == 1, c[..., 3], c[..., 1])
    c0 = np.stack([c0_hi, c0_lo], axis=-2)
    c1 = np.stack([c1_hi, c1_lo], axis=-2)
    y = np.stack([hi, lo], axis=-1)
    node = np.stack([np.zeros_like(hi), 1 + hi], axis=-1)
    return c0, c1, y, node


def state_cells(c0, c1, node):
    """Index into T [K, 3, NQ, NQ] flattened, for every (..., K)."""
    K = c0.shape[-1]
    korder = np.arange(K)
    return ((korder * 3 + node[..., None]) * NQ + quantize(c0)) * NQ + quantize(c1)


def fit_state_map(cells, y):
    """T = (ones + 0.5) / (n + 1) per count state, from held-out bits."""
    size = len(ORDERS) * 3 * NQ * NQ
    K = cells.shape[-1]
    flat = cells.reshape(-1, K)
    yy = np.broadcast_to(y[..., None], cells.shape).reshape(-1, K)
    n = np.bincount(flat.ravel(), minlength=size).astype(np.float64)
    ones = np.bincount(flat.ravel(), weights=yy.ravel().astype(np.float64), minlength=size)
    return (ones + 0.5) / (n + 1)


def features(counts, targets, state_map):
    """Inputs X [M, F] float32, weight set s [M], bit y [M], for every (window, column, node) in that order."""
    c0, c1, y, node = node_counts(counts, targets)  # c0/c1 [N, S, 2, K]
    direct = np.log((c1 + PRIOR) / (c0 + PRIOR))
    cells = state_cells(c0, c1, node)
    mapped = stretch(state_map[cells]).astype(np.float32)
    seen = (counts.sum(-1) > 0)  # [N, S, K]
    K = len(ORDERS)
    longest = K - 1 - np.argmax(seen[..., ::-1], axis=-1)  # order 0 always seen
    lc0 = np.take_along_axis(c0, longest[..., None, None].repeat(2, -2), -1)[..., 0]
    lc1 = np.take_along_axis(c1, longest[..., None, None].repeat(2, -2), -1)[..., 0]
    onesided = ((lc0 == 0) | (lc1 == 0)).astype(np.int64)
    sets = (node * K + longest[..., None]) * 2 + onesided
    X = np.concatenate([direct, mapped, np.ones(direct.shape[:-1] + (1,), dtype=np.float32)], axis=-1)
    F = X.shape[-1]
    return X.reshape(-1, F).astype(np.float32), sets.reshape(-1), y.reshape(-1), cells


N_SETS = 3 * len(ORDERS) * 2
N_FEATURES = 2 * len(ORDERS) + 1


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def fit_mixer(X, s, y):
    """Per weight set, ridge-regularized logistic regression by Newton/IRLS. Returns W [N_SETS, F] float64."""
    W = np.zeros((N_SETS, X.shape[1]))
    order = np.argsort(s, kind="stable")
    bounds = np.searchsorted(s[order], np.arange(N_SETS + 1))
    for g in range(N_SETS):
        idx = order[bounds[g]:bounds[g + 1]]
        if len(idx) == 0:
            continue
        Xg = X[idx].astype(np.float64)
        yg = y[idx].astype(np.float64)
        w = np.zeros(X.shape[1])
        for _ in range(IRLS_ITERS):
            p = sigmoid(Xg @ w)
            grad = Xg.T @ (yg - p) - RIDGE * w
            H = (Xg * (p * (1 - p))[:, None]).T @ Xg + RIDGE * np.eye(len(w))
            step = np.linalg.solve(H, grad)
            w += step
            if np.abs(step).max() < 1e-6:
                break
        W[g] = w
    return W


def static_bits(X, s, y, W):
    """Bits of each (window, column) row given frozen weights, from node-major flattened rows (2 per base)."""
    z = np.einsum("mf,mf->m", X, W[s].astype(np.float32), dtype=np.float64)
    p = sigmoid(z)
    p = np.clip(np.where(y == 1, p, 1 - p), 1e-12, 1)
    return -np.log2(p)


def online_bits(X, s, y, W0, n_windows, n_cols, eta, group=GROUP):
    """Online mixing: groups of `group` consecutive windows in file order, lockstep inside a group, bit by bit;
    after each bit every window applies w_s += eta * (y - p) * x to the shared weights (np.add.at). Returns bits
    per row, same layout as static_bits."""
    W = W0.astype(np.float64).copy()
    F = X.shape[1]
    X4 = X.reshape(n_windows, n_cols, 2, F)
    s3 = s.reshape(n_windows, n_cols, 2)
    y3 = y.reshape(n_windows, n_cols, 2)
    bits = np.zeros((n_windows, n_cols, 2))
    for g0 in range(0, n_windows, group):
        g1 = min(g0 + group, n_windows)
        Xg, sg, yg = X4[g0:g1], s3[g0:g1], y3[g0:g1]
        for col in range(n_cols):
            for node in range(2):
                x = Xg[:, col, node].astype(np.float64)
                ss = sg[:, col, node]
                yy = yg[:, col, node]
                p = sigmoid(np.einsum("gf,gf->g", x, W[ss]))
                bits[g0:g1, col, node] = -np.log2(np.clip(np.where(yy == 1, p, 1 - p), 1e-12, 1))
                if eta:
                    np.add.at(W, ss, (eta * (yy - p))[:, None] * x)
    return bits.reshape(-1)


def dirichlet_chain_bits(counts, targets, alpha, max_order=ORDERS[-1]):
    """Bits per (window, column): p_k(b) = (n_k(b) + alpha p_prev(b)) / (N_k + alpha) over ORDERS up to max_order,
    uniform below order 0."""
    p = np.full(counts.shape[:-2] + (4,), 0.25)
    for oi in range(sum(k <= max_order for k in ORDERS)):
        c = counts[..., oi, :].astype(np.float64)
        p = (c + alpha * p) / (c.sum(-1, keepdims=True) + alpha)
    pt = np.take_along_axis(p, targets[..., None].astype(np.intp), -1)[..., 0]
    return -np.log2(pt)


def per_base(bits_rows, n_windows, n_cols):
    """Row bits (2 per base) -> bits per window."""
    return bits_rows.reshape(n_windows, n_cols * 2).sum(1)


def summarize(window_bits, species_ids, species, n_per_window):
    res = {"overall": float(window_bits.sum() / (len(window_bits) * n_per_window))}
    for i, name in enumerate(species):
        m = species_ids == i
        if m.any():
            res[name] = float(window_bits[m].sum() / (m.sum() * n_per_window))
    return res


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--out", default=os.path.join("bench", "results", "mixture_baseline.json"))
    ap.add_argument("--one_strand", action="store_true", help="count the given strand only")
    ap.add_argument("--dev_subsample", type=int, default=1, help="development only: count every n-th fit chunk")
    args = ap.parse_args()
    both = not args.one_strand
    cfg = plm.Config(data_dir=args.data_dir, global_memory="none").check()  # windows without prefix tokens
    first = BASES_PER_TOKEN
    n_cols = cfg.context_size * BASES_PER_TOKEN

    index = plm.scan_genomes(cfg, progress=False)
    species = index.species
    codes = load_train_codes(index, cfg)
    held = holdout_keys(index.train_chunks)
    fit_keys = [c.key for c in index.train_chunks if c.key not in held][::args.dev_subsample]
    held_keys = [c.key for c in index.train_chunks if c.key in held]
    n_train_bases = sum(len(v) for v in codes.values())
    log(f"{len(index.train)} training chunks ({n_train_bases:,} bases), {len(held_keys)} held out "
        f"({sum(len(codes[k]) for k in held_keys):,} bases); strands counted: {'both' if both else 'given only'}")

    # held-out fitting windows: every 3rd window of each held-out chunk; halves A/B alternate chunks per species
    n_tok = {c.key: c.n_tokens for c in index.train_chunks}
    hw, hs, hhalf = [], [], []
    seen_per_species = {}
    for key in held_keys:
        w = chunk_windows(codes[key], n_tok[key], cfg)[::HELD_WINDOW_STEP]
        j = seen_per_species.get(key[0], 0)
        seen_per_species[key[0]] = j + 1
        hw.append(w)
        hs.append(np.full(len(w), species.index(key[0])))
        hhalf.append(np.full(len(w), j % 2))
    held_windows, held_species, held_half = np.concatenate(hw), np.concatenate(hs), np.concatenate(hhalf)
    val_tokens, val_species, _ = plm.load_validation(index, cfg)
    val_windows = tokens_to_codes(val_tokens.numpy())
    val_species = val_species.numpy()
    log(f"{len(held_windows)} held-out fitting windows, {len(val_windows)} validation windows")

    # ---------------------------------------------------------------- counts, one order at a time
    fit_text = TrainingText([codes[k] for k in fit_keys], both)
    held_text = TrainingText([codes[k] for k in held_keys], both)
    del codes
    log(f"packed training text: fit {fit_text.n_bases:,} bases, held-out {held_text.n_bases:,} (with strands)")
    held_counts = np.zeros((len(held_windows), n_cols, len(ORDERS), 4), dtype=np.uint32)
    val_counts = np.zeros((len(val_windows), n_cols, len(ORDERS), 4), dtype=np.uint32)
    table_stats = {}
    held_packed, val_packed = packed32(held_windows), packed32(val_windows)
    for oi, k in enumerate(ORDERS):
        t_fit = CountTable(fit_text, k)
        t_held = CountTable(held_text, k)
        held_counts[:, :, oi] = window_counts_one(held_packed, k, [t_fit], first)
        val_counts[:, :, oi] = window_counts_one(val_packed, k, [t_fit, t_held], first)
        if t_fit.dense is None:
            table_stats[k] = {"distinct_kmers_fit": int(len(t_fit.keys))}
        del t_fit, t_held
        log(f"order {k:2d} counted and looked up")
    del fit_text, held_text
    held_targets = held_windows[:, first:]
    val_targets = val_windows[:, first:]

    # ---------------------------------------------------------------- reference: Dirichlet back-off chain
    chain_held = {a: float(dirichlet_chain_bits(held_counts, held_targets, a).mean()) for a in ALPHAS}
    alpha = min(chain_held, key=chain_held.get)
    chain_val = summarize(dirichlet_chain_bits(val_counts, val_targets, alpha).sum(1), val_species, species, n_cols)
    log(f"Dirichlet chain over orders <= {ORDERS[-1]}: held-out {chain_held}, alpha {alpha}: validation {chain_val}")
    chain_short = {}
    for top in (12, 24):
        by_alpha = {a: float(dirichlet_chain_bits(held_counts, held_targets, a, top).mean()) for a in (4.0, 8.0, 16.0)}
        a_top = min(by_alpha, key=by_alpha.get)
        chain_short[top] = {"alpha": a_top, **summarize(dirichlet_chain_bits(val_counts, val_targets, a_top, top).sum(1),
                                                       val_species, species, n_cols)}
        log(f"Dirichlet chain over orders <= {top}: alpha {a_top}, validation {chain_short[top]}")
    # how much of validation the training text covers: share of scored bases (with >= k bases before them in the
    # window) whose k-base context occurs in training, and whose context + the base itself does
    coverage = {}
    for oi, k in enumerate(ORDERS):
        if k < 8:
            continue
        c = val_counts[:, max(k, first) - first:, oi]
        t = val_targets[:, max(k, first) - first:]
        ctx_seen = c.sum(-1) > 0
        kmer_seen = np.take_along_axis(c, t[..., None].astype(np.intp), -1)[..., 0] > 0
        coverage[k] = {}
        for i, name in enumerate(species):
            m = val_species == i
            coverage[k][name] = {"context_seen": float(ctx_seen[m].mean()), "with_base_seen": float(kmer_seen[m].mean())}
    log("coverage of validation by training (context seen / context+base seen): " + "; ".join(
        f"k={k}: " + ", ".join(f"{n} {v['context_seen']:.3f}/{v['with_base_seen']:.3f}" for n, v in d.items())
        for k, d in coverage.items() if k in (12, 16, 24, 31)))

    # ---------------------------------------------------------------- static mixture
    def fit_all(mask):
        c0, c1, y, node = node_counts(held_counts[mask], held_targets[mask])
        T = fit_state_map(state_cells(c0, c1, node), y)
        X, s, y, _ = features(held_counts[mask], held_targets[mask], T)
        return T, fit_mixer(X, s, y)

    results = {}
    # eta selection: fit on half A of the held-out chunks, run online on half B
    A, B = held_half == 0, held_half == 1
    T_a, W_a = fit_all(A)
    Xb, sb, yb, _ = features(held_counts[B], held_targets[B], T_a)
    nb = int(B.sum())
    eta_scores = {}
    for eta in ETAS:
        eta_scores[eta] = float(online_bits(Xb, sb, yb, W_a, nb, n_cols, eta).sum() / (nb * n_cols))
        log(f"  eta {eta}: held-out half B {eta_scores[eta]:.4f} bits/base (static from half A)")
    eta = min(eta_scores, key=eta_scores.get)
    del Xb, sb, yb

    T, W = fit_all(np.ones(len(held_windows), dtype=bool))
    Xh, sh, yh, _ = features(held_counts, held_targets, T)
    held_static = summarize(per_base(static_bits(Xh, sh, yh, W), len(held_windows), n_cols), held_species, species,
                            n_cols)
    del Xh, sh, yh
    log(f"static mixture fitted on {len(held_windows)} held-out windows; in-sample there {held_static}")
    Xv, sv, yv, _ = features(val_counts, val_targets, T)
    nv = len(val_windows)
    results["static"] = summarize(per_base(static_bits(Xv, sv, yv, W), nv, n_cols), val_species, species, n_cols)
    log(f"VALIDATION static mixture: {results['static']}")
    results["online"] = summarize(per_base(online_bits(Xv, sv, yv, W, nv, n_cols, eta), nv, n_cols), val_species,
                                  species, n_cols)
    log(f"VALIDATION online mixture (eta {eta}): {results['online']}")

    kn = None
    kn_path = os.path.join(ROOT, "bench", "results", "markov_baseline.json")
    if os.path.exists(kn_path):
        with open(kn_path) as f:
            mk = json.load(f)
        kn = {"source": "bench/results/markov_baseline.json (not recomputed here)",
              "method": mk["chosen"]["method"], "k": mk["chosen"]["k"],
              "overall": mk["validation"]["bits_per_base"], **mk["validation"]["per_species"]}
    runtime = time.time() - T0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nvalidation bits/base ({len(val_windows)} windows, {len(val_windows) * n_cols:,} bases):")
    rows = [("Dirichlet chain, orders <= 31, no mixing", chain_val), ("static mixture", results["static"]),
            ("online mixture", results["online"])]
    if kn:
        rows.insert(0, (f"order-{kn['k']} Kneser-Ney (markov_baseline.json)", kn))
    print(f"  {'':44s}" + "".join(f"{n:>12s}" for n in ["overall"] + species))
    for name, r in rows:
        print(f"  {name:44s}" + "".join(f"{r.get(n, float('nan')):12.4f}" for n in ["overall"] + species))
    print(f"runtime {runtime:.0f}s, peak RSS {peak_gb:.1f} GB")
    import torch
    result = {
        "device": f"cpu ({os.cpu_count()} cores)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "config": {"data_dir": cfg.data_dir, "chunk_size": cfg.chunk_size, "context_size": cfg.context_size,
                   "overlap_ratio": cfg.overlap_ratio, "val_fraction": cfg.val_fraction,
                   "eval_windows": cfg.eval_windows, "seed": cfg.seed},
        "scoring": "bases of tokens 1..64 of each 65-token validation window (384 per window); each base given only "
                   "the bases before it in its own window (order k unavailable for the first k bases)",
        "counts": {"orders": list(ORDERS), "strands": "both (each training chunk and its reverse complement)" if both
                   else "given strand only", "training_bases": n_train_bases,
                   "fit_chunks": len(fit_keys), "held_out_chunks": len(held_keys),
                   "dev_subsample": args.dev_subsample, "distinct_kmers_in_fit_counts": table_stats},
        "mixer": {"inputs": "per order and binary node: ln((c1+0.4)/(c0+0.4)) and stretch(count-state map); bias",
                  "n_inputs": N_FEATURES, "weight_sets": N_SETS,
                  "weight_set_context": "node (3) x longest order seen in training (21) x one-sided counts there (2)",
                  "static_fit": f"IRLS per weight set, ridge {RIDGE}, {IRLS_ITERS} iterations, on every "
                                f"{HELD_WINDOW_STEP}rd window of the held-out chunks (counts from the fit chunks)",
                  "online_update": f"w_s += eta * (y - p) * x after every bit, groups of {GROUP} consecutive "
                                   "validation windows in file order in lockstep, updates summed with np.add.at; "
                                   "counts and count-state maps frozen",
                  "eta": eta, "eta_selection_heldout_half_b": {str(k): v for k, v in eta_scores.items()}},
        "held_out": {"windows": int(len(held_windows)),
                     "windows_per_species": {n: int((held_species == i).sum()) for i, n in enumerate(species)},
                     "static_in_sample": held_static,
                     "dirichlet_chain_by_alpha": {str(k): v for k, v in chain_held.items()}},
        "validation": {"windows": int(len(val_windows)), "bases_scored": int(len(val_windows) * n_cols),
                       "windows_per_species": {n: int((val_species == i).sum()) for i, n in enumerate(species)},
                       "static_mixture": results["static"], "online_mixture": results["online"],
                       "dirichlet_chain": {"alpha": alpha, **chain_val},
                       "dirichlet_chain_orders_le": {str(k): v for k, v in chain_short.items()},
                       "kneser_ney_order12": kn,
                       "coverage_by_training": {"what": "share of scored bases with >= k bases before them in the "
                                                        "window whose k-base context (context_seen) and context + "
                                                        "base (with_base_seen) occur in the training counts",
                                                "by_order": {str(k): v for k, v in coverage.items()}}},
        "runtime_s": runtime,
        "peak_rss_gb": peak_gb,
    }
    write_result(args.out, result, announce=True)

if __name__ == "__main__":
    main()

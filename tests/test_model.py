"""Tests of the model section of plant_lm_train.py: local attention window, causality, the written-out attention,
the bucket memory (update formula, observations, eval-time freezing, state dict, DDP agreement), the loss, the
initialization, the parameter count and the FLOP count used for MFU.

Everything runs on the CPU in fp32 with tiny models (d_model 32, 2 layers, 2 heads, 16-token context, window 4);
n_buckets is always 4096, one row per 6-mer. The DDP tests launch tests/ddp_worker.py under
torch.distributed.run with two gloo processes.
"""

import math
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ddp_worker
import plant_lm_train as plm
from _helpers import TESTS, TWO_LAYERS, describe, random_dna, run_train, tiny_config, write_fasta

VOCAB = plm.VOCAB_SIZE


# ----------------------------------------------------------------------------- helpers

def fill_memory(model, seed=1):
    """A live memory path: random bucket rows and weights, non-zero gates, memory_kv large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.bucket_memory.normal_(generator=g)
        model.bucket_weight.uniform_(0.5, 2.0, generator=g)
        for block in model.blocks:
            if hasattr(block.attn, "memory_gate"):
                block.attn.memory_gate.uniform_(0.5, 1.5, generator=g)
                block.attn.memory_kv.weight.normal_(0.0, 0.3, generator=g)
    return model


def make_model(cfg=None, n_species=3, seed=0, memory=True):
    """A tiny PlantLM in eval mode; with memory=True (and global_memory = buckets) its memory path is live."""
    cfg = cfg or tiny_config(**TWO_LAYERS)
    torch.manual_seed(seed)
    model = plm.PlantLM(cfg, n_species).eval()
    if memory and cfg.global_memory == "buckets":
        fill_memory(model, seed + 1)
    return model


def random_batch(cfg, batch=3, seed=0, n_species=3, length=None):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, (length or cfg.context_size) + 1), generator=g)
    species = torch.randint(0, n_species, (batch,), generator=g)
    return tokens, species


def logits_of(model, tokens, species):
    with torch.no_grad():
        return model(tokens, species)[0]


def other_tokens(tokens, seed):
    """Tokens that differ from `tokens` at every position."""
    g = torch.Generator().manual_seed(seed)
    return (tokens + torch.randint(1, VOCAB, tokens.shape, generator=g)) % VOCAB


def observation(cfg, entries):
    """bucket_observations-shaped [n_buckets, d_model + 1] from {bucket: (sum vector, count)}."""
    obs = torch.zeros(cfg.n_buckets, cfg.d_model + 1)
    for bucket, (vector, count) in entries.items():
        obs[bucket, :-1] = torch.as_tensor(vector, dtype=torch.float32)
        obs[bucket, -1] = count
    return obs


def band(T, lo, hi):
    """[T, T] bool: dep[t, j] = lo <= t - j <= hi."""
    i = torch.arange(T)
    offset = i[:, None] - i[None, :]
    return (offset >= lo) & (offset <= hi)


def dependence_matrix(run, x, perturb, T, unchanged=1e-6, changed=1e-4):
    """dep[t, j]: does output position t move when input position j is perturbed? Fails on in-between changes."""
    base = run(x)
    dep = torch.zeros(T, T, dtype=torch.bool)
    for j in range(T):
        diff = (run(perturb(x, j)) - base).abs()
        diff = diff.amax(dim=tuple(d for d in range(diff.dim()) if d != 1))  # per position t
        ambiguous = (diff > unchanged) & (diff < changed)
        assert not ambiguous.any(), f"input {j}: output changes {diff[ambiguous].tolist()} are neither ~0 nor clear"
        dep[:, j] = diff >= changed
    return dep


# ----------------------------------------------------------------------------- local window and causality

@pytest.mark.parametrize("window", [1, 4, 16])
def test_local_window_mask_gives_query_i_keys_i_minus_w_plus_1_to_i(window):
    T = 16
    i = torch.arange(T)
    mask = plm.local_window_mask(i[:, None], i[None, :], window)
    assert torch.equal(mask, band(T, 0, window - 1))
    assert mask.sum(1).tolist() == [min(t + 1, window) for t in range(T)]


@pytest.mark.parametrize("use_memory", [False, True], ids=["local-only", "with-memory"])
@pytest.mark.parametrize("window", [1, 4, 16])
def test_attention_output_at_t_depends_exactly_on_inputs_t_minus_w_plus_1_to_t(use_memory, window):
    """One BucketAttention layer: output t moves when input j changes iff t - (W - 1) <= j <= t."""
    cfg = tiny_config(**TWO_LAYERS, local_attn_window=window, global_memory="buckets" if use_memory else "none")
    model = make_model(cfg)
    attn, T = model.blocks[0].attn, cfg.context_size
    rotary = (model.rotary_cos[:T], model.rotary_sin[:T])
    window_bias = model.window_bias(T, torch.device("cpu"))
    memory = model.bucket_memory if use_memory else None
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, cfg.d_model, generator=g)
    noise = torch.randn(2, T, cfg.d_model, generator=g)

    def run(inputs):
        with torch.no_grad():
            return attn(inputs, rotary, window_bias, memory)

    def perturb(inputs, j):
        out = inputs.clone()
        out[:, j] += noise[:, j]
        return out

    dep = dependence_matrix(run, x, perturb, T)
    expected = band(T, 0, window - 1)
    assert torch.equal(dep, expected), f"output t <- input j (rows t):\n{dep.int()}\nexpected\n{expected.int()}"


def test_logits_at_or_before_t_ignore_tokens_after_t_with_live_memory():
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg)
    assert model.bucket_memory.abs().sum() > 0 and all(b.attn.memory_gate.abs().min() > 0 for b in model.blocks)
    tokens, species = random_batch(cfg)
    tokens = tokens[:, :-1]
    base = logits_of(model, tokens, species)
    T = cfg.context_size
    for t in range(T - 1):
        changed = tokens.clone()
        changed[:, t + 1:] = other_tokens(tokens[:, t + 1:], seed=t)
        logits = logits_of(model, changed, species)
        past = (logits[:, :t + 1] - base[:, :t + 1]).abs().max().item()
        assert past <= 1e-6, f"changing tokens after {t} moved logits at <= {t} by {past:.3g}"
        assert (logits[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4  # the change is visible where it should be


def test_whole_model_receptive_field_is_n_layers_times_window_minus_one():
    """Logits at t depend on tokens t - L(W - 1) .. t and no others (the memory is fixed during a forward)."""
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg)
    tokens, species = random_batch(cfg, batch=2)
    tokens = tokens[:, :-1]
    replacement = other_tokens(tokens, seed=9)

    def perturb(toks, j):
        out = toks.clone()
        out[:, j] = replacement[:, j]
        return out

    dep = dependence_matrix(lambda toks: logits_of(model, toks, species), tokens, perturb, cfg.context_size)
    expected = band(cfg.context_size, 0, cfg.n_layers * (cfg.local_attn_window - 1))
    assert torch.equal(dep, expected), f"logits t <- token j:\n{dep.int()}"


# ----------------------------------------------------------------------------- the written-out local attention

@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("length", [16, 11])
def test_local_attention_equals_sdpa_with_the_boolean_window_mask(window, length):
    """local_attention (two matmuls and a softmax, what the model runs on every device) against PyTorch's own
    scaled_dot_product_attention given the boolean window mask, in fp32 and under CPU bf16 autocast."""
    cfg = tiny_config(**TWO_LAYERS, local_attn_window=window)
    model = make_model(cfg)
    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(3, 4, length, 8, generator=g) for _ in range(3))
    index = torch.arange(length)
    mask = plm.local_window_mask(index[:, None], index[None, :], window)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    window_bias = model.window_bias(length, torch.device("cpu"))
    assert (plm.local_attention(q, k, v, window_bias) - expected).abs().max().item() <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = plm.local_attention(q, k, v, window_bias)
    assert rounded.dtype == torch.bfloat16
    assert (rounded.float() - expected).abs().max().item() <= 0.05


def test_local_attention_in_fp16_survives_raw_scores_beyond_the_fp16_range():
    """A raw q.k of 80,000 is past fp16's 65,504, its scaled score (28,284) is not: scaling q first keeps the row
    finite, as SDPA does (an inf score plus the -inf bias would make the whole row NaN)."""
    q = k = torch.full((1, 1, 4, 8), 100.0)
    v = torch.arange(32, dtype=torch.float32).view(1, 1, 4, 8)
    window_bias = make_model().window_bias(4, torch.device("cpu"))
    got = plm.local_attention(q.half(), k.half(), v.half(), window_bias)
    index = torch.arange(4)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=plm.local_window_mask(index[:, None], index[None, :],
                                                                                          tiny_config().local_attn_window))
    assert torch.isfinite(got).all()
    assert (got.float() - expected).abs().max().item() <= 0.05


# ----------------------------------------------------------------------------- bucket memory: update formula

def test_memory_row_is_the_first_observation_then_decays_to_1_over_e_after_global_context_tokens():
    G = 1000
    cfg = tiny_config(**TWO_LAYERS, global_context=G)
    model = make_model(cfg, memory=False)
    g = torch.Generator().manual_seed(0)
    k, other = 7, 100
    x = torch.randn(cfg.d_model, generator=g)
    model.update_bucket_memory(observation(cfg, {k: (x, 1)}))
    assert torch.allclose(model.bucket_memory[k], x, rtol=0, atol=1e-7)
    assert model.bucket_weight[k].item() == pytest.approx(1.0, rel=1e-6)
    model.update_bucket_memory(observation(cfg, {other: (torch.randn(cfg.d_model, generator=g) * G, G)}))
    assert model.bucket_weight[k].item() == pytest.approx(math.exp(-1), rel=1e-6)  # 1/e after G tokens
    assert torch.equal(model.bucket_memory[k], model.bucket_memory[k].new_tensor(x.tolist()))  # no observation


@pytest.mark.parametrize("between", [999, 1000])
def test_observations_at_one_bucket_are_weighted_by_exp_minus_tokens_between_over_global_context(between):
    """x at bucket k, then `between` tokens of other ids, then y at k: y is the (between + 1)-th token after x, so
    memory_k = (a x + y) / (a + 1) with a = exp(-(between + 1) / G). With between = G - 1 this is exactly the
    spec's (e^-1 x + y) / (e^-1 + 1); with between = G (the spec's wording) y's own token decays x once more."""
    G = 1000
    cfg = tiny_config(**TWO_LAYERS, global_context=G)
    model = make_model(cfg, memory=False)
    g = torch.Generator().manual_seed(1)
    k = 42
    x, y = torch.randn(cfg.d_model, generator=g), torch.randn(cfg.d_model, generator=g)
    model.update_bucket_memory(observation(cfg, {k: (x, 1)}))
    others = {b: (torch.randn(cfg.d_model, generator=g) * n, n) for b, n in ((3, between // 2),
                                                                          (4000, between - between // 2))}
    model.update_bucket_memory(observation(cfg, others))
    model.update_bucket_memory(observation(cfg, {k: (y, 1)}))
    a = math.exp(-(between + 1) / G)
    expected = (a * x.double() + y.double()) / (a + 1)
    assert torch.allclose(model.bucket_memory[k].double(), expected, rtol=0, atol=1e-6)
    assert model.bucket_weight[k].item() == pytest.approx(a + 1, rel=1e-6)
    if between == G - 1:
        spec = (math.exp(-1) * x.double() + y.double()) / (math.exp(-1) + 1)
        assert torch.allclose(model.bucket_memory[k].double(), spec, rtol=0, atol=1e-6)


def test_memory_rows_are_exponentially_weighted_means_of_all_their_observations():
    """Several steps of random observations vs a float64 reference: row b = sum_i w_i h_i / sum_i w_i and
    weight_b = sum_i w_i, with w_i = exp(-(tokens observed in later steps) / G)."""
    G = 50
    cfg = tiny_config(**TWO_LAYERS, global_context=G)
    model = make_model(cfg, memory=False)
    rng = np.random.default_rng(3)
    observed = {}  # bucket -> [(tokens seen up to and including its step, vector)]
    seen = 0
    for step in range(1, 9):
        obs = torch.zeros(cfg.n_buckets, cfg.d_model + 1)
        n_tokens = int(rng.integers(5, 40))
        buckets = rng.choice([0, 1, 2, 3, 4095], size=n_tokens)
        vectors = rng.normal(size=(n_tokens, cfg.d_model))
        seen += n_tokens
        for b, v in zip(buckets, vectors):
            obs[b, :-1] += torch.from_numpy(v).float()
            obs[b, -1] += 1
            observed.setdefault(int(b), []).append((seen, torch.from_numpy(v).float().double()))
        model.update_bucket_memory(obs)
    for b, items in observed.items():
        weights = torch.tensor([math.exp(-(seen - at) / G) for at, _ in items], dtype=torch.float64)
        mean = (weights[:, None] * torch.stack([v for _, v in items])).sum(0) / weights.sum()
        assert torch.allclose(model.bucket_memory[b].double(), mean, rtol=1e-5, atol=1e-5), b
        assert model.bucket_weight[b].item() == pytest.approx(weights.sum().item(), rel=1e-5)
    untouched = [b for b in range(cfg.n_buckets) if b not in observed]
    assert model.bucket_memory[untouched].abs().max() == 0 and model.bucket_weight[untouched].abs().max() == 0


def test_rows_without_observations_keep_their_memory_and_decay_their_weight():
    G = 1000
    cfg = tiny_config(**TWO_LAYERS, global_context=G)
    model = make_model(cfg)  # random memory and weights
    before_memory, before_weight = model.bucket_memory.clone(), model.bucket_weight.clone()
    g = torch.Generator().manual_seed(2)
    model.update_bucket_memory(observation(cfg, {5: (torch.randn(cfg.d_model, generator=g) * 30, 30),
                                                 9: (torch.randn(cfg.d_model, generator=g) * 20, 20)}))
    rest = torch.ones(cfg.n_buckets, dtype=torch.bool)
    rest[[5, 9]] = False
    assert torch.equal(model.bucket_memory[rest], before_memory[rest])
    assert torch.allclose(model.bucket_weight[rest], before_weight[rest] * math.exp(-50 / G), rtol=1e-6, atol=0)
    assert not torch.equal(model.bucket_memory[5], before_memory[5])
    assert not torch.equal(model.bucket_memory[9], before_memory[9])


def test_attention_reads_every_memory_row_at_unit_rms_at_every_step():
    """The stored rows are running means whose scale drifts; what attention reads is each row at unit RMS, at every
    step (a renormalization every N steps made the scale jump from ~0.5 to 1 at exactly those steps)."""
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg, memory=False)
    scale = {1: 5.0, 2: 0.1, 4095: 40.0}
    g = torch.Generator().manual_seed(4)
    for step in range(1, 6):
        vectors = {b: torch.randn(cfg.d_model, generator=g) * s / step for b, s in scale.items()}
        model.update_bucket_memory(observation(cfg, {b: (v, 1) for b, v in vectors.items()}))
        read = model.memory_rows()
        for b in scale:
            assert read[b].pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5), (step, b)
            cos = F.cosine_similarity(read[b], model.bucket_memory[b], dim=0)
            assert cos.item() == pytest.approx(1.0, abs=1e-6)  # rescaled, not rotated
    empty = torch.ones(cfg.n_buckets, dtype=torch.bool)
    empty[list(scale)] = False
    assert read[empty].abs().max().item() == 0 and torch.isfinite(read).all()


# ----------------------------------------------------------------------------- bucket memory: observations

def test_bucket_observations_sum_hidden_states_and_count_tokens_per_id():
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg, memory=False)
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 12, (3, cfg.context_size), generator=g)  # many repeated ids
    tokens[0, 0], tokens[2, -1] = VOCAB - 1, VOCAB - 1
    hidden = torch.randn(3, cfg.context_size, cfg.d_model, generator=g)
    stats = model.bucket_observations(tokens, hidden)
    assert stats.shape == (cfg.n_buckets, cfg.d_model + 1) and stats.dtype == torch.float32
    expected = torch.zeros(cfg.n_buckets, cfg.d_model + 1, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            expected[tokens[b, t], :-1] += hidden[b, t].double()
            expected[tokens[b, t], -1] += 1
    assert torch.equal(stats[:, -1].double(), expected[:, -1])
    assert torch.allclose(stats.double(), expected, rtol=1e-6, atol=1e-6)
    assert stats[:, -1].sum().item() == tokens.numel()
    low = model.bucket_observations(tokens, hidden.bfloat16())  # autocast hidden states come back in fp32
    assert low.dtype == torch.float32
    assert torch.allclose(low.double(), expected, rtol=2e-2, atol=5e-2)


# ----------------------------------------------------------------------------- bucket memory: frozen outside training

def test_forward_and_backward_never_change_the_memory_in_train_or_eval_mode():
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg)
    memory, weight = model.bucket_memory.clone(), model.bucket_weight.clone()
    tokens, species = random_batch(cfg)
    model.train()
    loss, _ = model(tokens[:, :-1], species, tokens[:, 1:])
    loss.backward()
    model(tokens[:, :-1], species)
    model.eval()
    with torch.no_grad():
        model(tokens[:, :-1], species)
        model(tokens[:, :-1], species, tokens[:, 1:])
    assert torch.equal(model.bucket_memory, memory) and torch.equal(model.bucket_weight, weight)


def test_evaluate_leaves_the_memory_alone_and_returns_the_mean_loss_over_all_windows():
    cfg = tiny_config(**TWO_LAYERS, batch_size=4)
    model = make_model(cfg)
    model.train()
    memory, weight = model.bucket_memory.clone(), model.bucket_weight.clone()
    tokens, species = random_batch(cfg, batch=7, seed=8)  # 7 windows: the last batch is padded
    repeat = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(9)) < 0.3
    rt = plm.Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    loss, by_species, by_repeat = plm.validation_loss(model, tokens, species, repeat, cfg, rt, None)
    assert torch.equal(model.bucket_memory, memory) and torch.equal(model.bucket_weight, weight)
    assert model.training  # restored
    with torch.no_grad():
        logits, _ = model.eval()(tokens[:, :-1], species)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    nats = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
    assert by_species == pytest.approx([nats[species == s].mean().item() for s in range(int(species.max()) + 1)],
                                       rel=1e-6)  # the mean over each species' windows
    # and the mean over the repeat targets (the flags of tokens 1..T, the targets) and over the others, unweighted
    per_target = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    flags = repeat[:, 1:]
    assert 0 < flags.sum() < flags.numel()
    assert by_repeat["repeat"] == pytest.approx(per_target[flags].mean().item(), rel=1e-6)
    assert by_repeat["nonrepeat"] == pytest.approx(per_target[~flags].mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- bucket memory: state dict

def test_memory_is_in_the_state_dict_and_round_trips_through_a_checkpoint(tmp_path):
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg)
    state = model.state_dict()
    assert {"bucket_memory", "bucket_weight"} <= set(state)
    assert not {"rotary_cos", "rotary_sin"} & set(state)  # derived, not saved
    path = str(tmp_path / "model.pt")
    plm.save_checkpoint(path, {"model_state_dict": state})
    fresh = plm.PlantLM(cfg, 3).eval()
    assert fresh.bucket_memory.abs().max() == 0
    fresh.load_state_dict(plm.load_checkpoint(path)["model_state_dict"])
    assert torch.equal(fresh.bucket_memory, model.bucket_memory)
    assert torch.equal(fresh.bucket_weight, model.bucket_weight)
    tokens, species = random_batch(cfg)
    assert torch.equal(logits_of(fresh, tokens[:, :-1], species), logits_of(model, tokens[:, :-1], species))


def test_without_global_memory_there_are_no_memory_parameters_and_the_memory_is_ignored():
    cfg = tiny_config(**TWO_LAYERS, global_memory="none")
    model = make_model(cfg)
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "memory" in n], names
    tokens, species = random_batch(cfg)
    before = logits_of(model, tokens[:, :-1], species)
    fill_memory(model, seed=11)
    with torch.no_grad():
        model.bucket_memory.mul_(100)
    assert torch.equal(logits_of(model, tokens[:, :-1], species), before)


def test_with_global_memory_the_logits_depend_on_the_memory_once_the_gate_opens():
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg, memory=False)
    tokens, species = random_batch(cfg)
    with torch.no_grad():
        model.bucket_memory.normal_(generator=torch.Generator().manual_seed(3))
    closed = logits_of(model, tokens[:, :-1], species)
    with torch.no_grad():
        model.bucket_memory.mul_(3)
    assert torch.equal(logits_of(model, tokens[:, :-1], species), closed)  # gates start at 0: a plain local model
    fill_memory(model)
    opened = logits_of(model, tokens[:, :-1], species)
    with torch.no_grad():
        model.bucket_memory[tokens[0, 0]] += 5
    assert (logits_of(model, tokens[:, :-1], species) - opened).abs().max() > 1e-4


# ----------------------------------------------------------------------------- loss, init, size, FLOPs

def test_loss_is_fp32_cross_entropy_of_the_logits_under_bf16_autocast():
    cfg = tiny_config(**TWO_LAYERS)
    model = make_model(cfg)
    tokens, species = random_batch(cfg, batch=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, hidden = model(tokens[:, :-1], species, tokens[:, 1:])
        logits, _ = model(tokens[:, :-1], species)
    assert logits.dtype == torch.bfloat16  # autocast is really on
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    fp32 = F.cross_entropy(logits_of(model, tokens[:, :-1], species).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(fp32.item(), rel=1e-2)


def tiny_retrieval_index(tokens):
    """A RetrievalIndex of one sequence of 6-mer ids (a 1-D int64 tensor), both strands left aside."""
    bases = torch.from_numpy(plm.token_bases(tokens.numpy()))
    keys, cumulative = plm.key_tables(plm.longest_keys(bases, [len(bases)], plm.INDEX_KEY_BASES))
    return plm.RetrievalIndex(keys, cumulative, "test")


@pytest.mark.parametrize("memory", ["buckets", "retrieval"])
def test_the_step_graph_path_trains_exactly_like_plain_train_step(memory):
    """Config.cuda_graphs: StepGraph copies each batch into static buffers and runs step_on_device from them (on a
    GPU it captures that once and replays it; on the CPU nothing is captured, so this checks the buffers and the
    step, not a replay). Its steps, dropout on and the learning rate changing, must give bit for bit the
    parameters, memory and results of plain train_steps; bench/graph_equivalence.py checks the captured graph on a
    GPU the same way. On the CPU the learner itself holds no graph."""
    cfg = tiny_config(n_layers=2, global_memory=memory, precision="fp32", dropout=0.1)
    g = torch.Generator().manual_seed(5)
    genome = torch.randint(0, 12, (4000,), generator=g)  # few distinct 6-mers: contexts recur, lookups hit
    width = cfg.prefix_tokens + cfg.context_size + 1
    steps = [(torch.stack([genome[s:s + width] for s in torch.randint(0, 4000 - width, (8,), generator=g)])
              .view(2, 4, width).to(torch.int16), torch.randint(0, 3, (2, 4), generator=g),
              torch.rand(2, 4, width, generator=g) < 0.3, 1e-3 * (i + 1)) for i in range(5)]
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        learner = plm.build_learner(cfg, plm.Runtime(0, 0, 1, torch.device("cpu")), 3)
        assert learner.graph is None  # the CPU has no graphs to capture
        if memory == "retrieval":
            learner.retrieval_index = tiny_retrieval_index(genome)
            assert learner.retrieval_index.counts(steps[0][0][0].long(), cfg.prefix_tokens, True)[..., 1].sum() > 0
        if graphed:
            learner.graph = plm.StepGraph(learner)
        initial = {k: v.clone() for k, v in learner.model.state_dict().items()}
        results = [plm.train_step(learner, *step) for step in steps]
        runs.append((learner.model.state_dict(), results))
    (plain, plain_results), (graphed, graphed_results) = runs
    assert not torch.equal(plain["blocks.0.mlp.fc.weight"], initial["blocks.0.mlp.fc.weight"])  # it trained
    for name in plain:
        assert torch.equal(plain[name], graphed[name]), name
    for a, b in zip(plain_results, graphed_results):
        assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))


def test_a_step_updates_every_tensor_it_keeps_in_place_so_a_captured_graph_stays_valid():
    """A CUDA graph replays against the addresses it captured: a step that rebinds a parameter, a buffer (the bucket
    memory), an optimizer state, the learning rate, the loss scale or the bad-step counters to a new tensor would
    leave the replay writing into a dead one. On the CPU: their addresses after a few steps are those after one."""
    cfg = tiny_config(n_layers=2, global_memory="buckets", precision="fp32", dropout=0.1)
    learner = plm.build_learner(cfg, plm.Runtime(0, 0, 1, torch.device("cpu")), 3)
    g = torch.Generator().manual_seed(3)
    width = cfg.prefix_tokens + cfg.context_size + 1

    def step(i):
        return plm.train_step(learner, torch.randint(0, 4096, (2, 4, width), generator=g).to(torch.int16),
                              torch.randint(0, 3, (2, 4), generator=g), torch.rand(2, 4, width, generator=g) < 0.3,
                              1e-3 * (i + 1))

    def addresses():
        kept = {f"model.{name}": t for name, t in learner.model.state_dict(keep_vars=True).items()}
        kept.update({f"optimizer.{i}.{key}": t for i, state in enumerate(learner.optimizer.state.values())
                     for key, t in state.items() if torch.is_tensor(t)})
        kept.update(lr=learner.lr, scale=learner.scaler._scale, consecutive_bad=learner.consecutive_bad,
                    worst_streak=learner.worst_streak, skipped_steps=learner.skipped_steps)
        return {name: t.data_ptr() for name, t in kept.items()}

    step(0)
    before = addresses()
    for i in range(1, 4):
        step(i)
    assert addresses() == before
    assert learner.model.bucket_weight.sum() > 0  # the memory was updated, in place


def test_train_step_follows_the_repeat_weighted_loss_and_reports_the_plain_one():
    """repeat_loss_weight w: the step's gradient is that of one weighted mean over all its micro-batches,
    sum(weight * nats) / sum(weight), weight w on targets whose repeat flag is set and 1 elsewhere (not a mean of
    per-micro-batch weighted means, in which a micro-batch of repeats alone would weigh 1); StepResult.loss stays
    the plain mean (comparable across runs), StepResult.weighted_loss is what was trained."""
    w = 0.25
    cfg = tiny_config(**TWO_LAYERS, batch_size=3, accumulation_steps=2, precision="fp32", grad_clip=1e9,
                      repeat_loss_weight=w)
    torch.manual_seed(0)
    model = plm.PlantLM(cfg, 3)
    reference = plm.PlantLM(cfg, 3)
    reference.load_state_dict(model.state_dict())
    learner = plm.build_learner(cfg, plm.Runtime(0, 0, 1, torch.device("cpu")), 3, build_model=lambda *a, **k: model)
    learner.optimizer = ddp_worker.RecordingSGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 3, cfg.context_size + 1), generator=g)
    species = torch.randint(0, 3, (2, 3), generator=g)
    repeat = torch.rand(tokens.shape, generator=g) < 0.4
    repeat[1] = True  # the second micro-batch is all repeats: its weight must not cancel
    result = plm.train_step(learner, tokens, species, repeat, lr=0.1)

    weights = torch.where(repeat[:, :, 1:], w, 1.0)
    weighted, plain = 0.0, 0.0
    for micro in range(2):
        nats, _ = reference(tokens[micro, :, :-1], species[micro], tokens[micro, :, 1:], reduction="none")
        weighted = weighted + (nats * weights[micro]).sum() / weights.sum()
        plain += nats.mean().item() / 2
    weighted.backward()
    assert result.loss.item() == pytest.approx(plain, rel=1e-6)
    assert result.weighted_loss.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert abs(result.weighted_loss.item() - plain) > 1e-4  # the flags split the targets unevenly: weights matter
    for name, p in reference.named_parameters():
        trained = learner.optimizer.grads[dict(model.named_parameters())[name]]
        assert torch.allclose(trained, p.grad, rtol=1e-4, atol=1e-7), name


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return plm.PlantLM(plm.Config(), 3)


def test_init_is_gpt2_residual_projections_scaled_by_depth(default_model):
    cfg = default_model.cfg
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    checked = {"residual": 0, "other": 0}
    for name, p in default_model.named_parameters():
        if p.dim() < 2 or name.startswith(("retrieval_head", "copy_head", "copy_from_hidden")):
            continue
        kind = "residual" if name.endswith("proj.weight") else "other"
        want = residual_std if kind == "residual" else 0.02
        assert p.std().item() == pytest.approx(want, rel=0.1), name
        assert abs(p.mean().item()) < 0.1 * want, name
        checked[kind] += 1
    # embeddings; qkv, fc; the homolog slots' feature and copied-token maps
    assert checked == {"residual": 2 * cfg.n_layers, "other": 2 + 2 * cfg.n_layers + 2}
    assert default_model.head.weight is default_model.token_embedding.weight  # tied
    head = default_model.retrieval_head  # starts at the same gate, 0.12, everywhere: weight 0, bias -2
    assert torch.equal(head.weight, torch.zeros_like(head.weight)) and torch.equal(head.bias, torch.full((3,), -2.0))
    # every homolog slot starts at the same weight and substitution rate, whatever it reads: weights 0
    copy_head, from_hidden = default_model.copy_head, default_model.copy_from_hidden
    assert torch.equal(copy_head.weight, torch.zeros_like(copy_head.weight))
    assert torch.equal(from_hidden.weight, torch.zeros_like(from_hidden.weight))
    assert torch.equal(copy_head.bias, torch.tensor([-4.0, -2.0]))
    buckets = plm.PlantLM(plm.Config(global_memory="buckets"), 3)
    for block in buckets.blocks:
        assert torch.equal(block.attn.memory_gate, torch.zeros(cfg.n_heads))  # starts as a plain local model


def test_default_model_parameter_count_matches_hand_count(default_model):
    d, L, H, V, S = 512, 6, 8, 4096, 3
    embeddings = V * d + S * d  # token embedding (= the tied head) + species embedding
    per_layer = (2 * d  # ln_attn
                 + d * 3 * d + d * d  # qkv, attention output projection
                 + 2 * d  # ln_mlp
                 + d * 4 * d + 4 * d * d)  # MLP fc, proj
    retrieval_head = d * 3 + 3  # one gate per context length (12, 18, 24 bases) from the final hidden state
    expected = embeddings + L * per_layer + 2 * d + retrieval_head  # + ln_final
    assert expected == 20_987_907
    retrieval = plm.PlantLM(plm.Config(global_memory="retrieval"), S)
    assert sum(p.numel() for p in retrieval.parameters()) == expected
    F = plm.NEIGHBOUR_FEATURES  # per slot: features -> d (with bias), its copied token's embedding -> d, the copy
    homologs = F * d + d + d * d + F * 2 + 2 + d * 2  # expert's weight and rate from the features and the hidden state
    assert sum(p.numel() for p in default_model.parameters()) == expected + homologs == 21_289_625
    bucket_memory = L * (d * 2 * d + H)  # memory_kv, memory_gate in every layer
    buckets = plm.PlantLM(plm.Config(global_memory="buckets"), S)
    assert sum(p.numel() for p in buckets.parameters()) == expected - retrieval_head + bucket_memory == 24_132_144


def hand_flops(n_tokens, forwards, use_memory):
    """Training FLOPs (2 per multiply-add) of the model tests' config: d 32, L 2, T 16, W 4, 4096 buckets, vocab 4096.

    Forward per token: linears 24 d^2 per layer (qkv 6, proj 2, MLP 16); local attention 4 d FLOPs per key (QK and
    PV) with on average (1+2+3+4*13)/16 = 3.625 keys; head 2 d V; global attention 4 d per memory row per layer.
    Backward is twice the forward, except for the memory's key/value projection (once per forward call, over
    the 4096 rows): its input is the bucket_memory buffer, which needs no gradient, so its backward is the weight
    gradient alone, once the forward.
    """
    d, L, V, buckets = 32, 2, 4096, 4096
    per_token = L * (24 * d * d + 4 * 3.625 * d) + 2 * d * V
    flops = 3 * per_token * n_tokens
    if use_memory:
        flops += 3 * L * 4 * buckets * d * n_tokens
        flops += (1 + 1) * L * 2 * buckets * d * (2 * d) * forwards
    return flops


@pytest.mark.parametrize("use_memory", [False, True], ids=["local-only", "with-memory"])
def test_flops_per_step_matches_hand_count(use_memory):
    model = plm.PlantLM(tiny_config(**TWO_LAYERS, global_memory="buckets" if use_memory else "none"), 3)
    n_tokens, forwards = 8 * 4 * 16, 4
    assert model.flops_per_step(n_tokens, forwards) == pytest.approx(hand_flops(n_tokens, forwards, use_memory),
                                                                     rel=1e-9)


@pytest.mark.parametrize("use_memory", [False, True], ids=["local-only", "with-memory"])
def test_flops_per_step_matmul_part_matches_flop_counter_of_a_training_step(use_memory):
    """torch's FlopCounterMode counts the matmuls of a real forward + backward (not CPU SDPA, which the bucket
    memory uses): they must equal flops_per_step with its attention terms, which count only the keys in the window,
    replaced by what local_attention multiplies: all T keys of every query, the masked ones too."""
    cfg = tiny_config(**TWO_LAYERS, global_memory="buckets" if use_memory else "none")
    model = make_model(cfg).train()
    tokens, species = random_batch(cfg, batch=2)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = model(tokens[:, :-1], species, tokens[:, 1:])
        loss.backward()
    matmul_ops = ("aten.mm", "aten.addmm", "aten.bmm", "aten.matmul")
    measured = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".default")[0]
                   in matmul_ops)
    n_tokens = tokens[:, :-1].numel()
    d, L = cfg.d_model, cfg.n_layers
    attention = 3 * n_tokens * L * (4 * 3.625 * d + (4 * cfg.n_buckets * d if use_memory else 0))
    written_out = 3 * n_tokens * L * 4 * cfg.context_size * d
    assert model.flops_per_step(n_tokens, 1) - attention + written_out == pytest.approx(measured, rel=1e-9)


# ----------------------------------------------------------------------------- DDP (2 gloo processes)

@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Run tests/ddp_worker.py on 2 CPU ranks once; returns its output dir."""
    root = tmp_path_factory.mktemp("ddp")
    data_dir, out_dir = root / "data", root / "out"
    out_dir.mkdir()
    for i, species in enumerate(("a", "b")):
        write_fasta(data_dir / species / f"{species}.fa", [(f"{species}_chr1", random_dna(12_000, 100 + i))])
    try:
        proc = run_train([], cwd=root, nproc=2, timeout=60, script=os.path.join(TESTS, "ddp_worker.py"),
                         script_args=[str(out_dir), str(data_dir)])
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"ddp_worker.py did not finish in 60 s:\n{stderr[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"ddp_worker.py failed: {describe(proc)}")
    return out_dir


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_ddp_accumulation_with_no_sync_equals_one_big_batch(ddp_results):
    ranks = [torch.load(ddp_results / f"accum_rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["step_tokens"], ranks[1]["step_tokens"])  # each rank its own data
    cfg = plm.Config(**ranks[0]["config"])
    reference = plm.PlantLM(cfg, 3)
    reference.load_state_dict(ranks[0]["initial"])
    tokens = ranks[0]["tokens"].reshape(-1, cfg.context_size + 1)  # 2 ranks x 2 micro-batches x 2 windows
    species = ranks[0]["species"].reshape(-1)
    assert tokens.shape[0] == 8
    loss, _ = reference(tokens[:, :-1], species, tokens[:, 1:])
    loss.backward()
    for name, p in reference.named_parameters():
        for r in range(2):
            grad = ranks[r]["grads"][name]
            assert p.grad.abs().max() > 0, name  # every parameter takes part (the memory path is live)
            assert relative_error(grad, p.grad) <= 2e-6, (name, r, relative_error(grad, p.grad))
            after = p.detach() - ddp_worker.SGD_LR * p.grad
            assert relative_error(ranks[r]["params"][name], after) <= 1e-6, (name, r)
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


def test_ddp_training_keeps_the_bucket_memory_bitwise_equal_on_ranks_that_see_different_data(ddp_results):
    ranks = [torch.load(ddp_results / f"memory_rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["seen"].shape[0] == 4 * 2  # 4 steps x 2 micro-batches of training inputs
    assert not torch.equal(ranks[0]["seen"], ranks[1]["seen"])
    memory = ranks[0]["bucket_memory"]
    assert (memory.abs().sum(1) > 0).sum() >= 100  # the memory learned something
    assert torch.equal(ranks[0]["bucket_memory"], ranks[1]["bucket_memory"])
    assert torch.equal(ranks[0]["bucket_weight"], ranks[1]["bucket_weight"])
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name
    ckpt = plm.load_checkpoint(str(ddp_results / "ckpt" / "model_latest.pt"))
    assert ckpt["step"] == 4
    assert torch.equal(ckpt["model_state_dict"]["bucket_memory"], memory)

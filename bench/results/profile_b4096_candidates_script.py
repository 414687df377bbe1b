"""The one-off script behind BENCHMARKS.md's "Candidates, measured before the change" table, kept as the record of
what ran (it monkeypatches commit 04dd80a's plant_lm_train.py and does not run against later commits).

Ran from bench/ of a checkout of 04dd80a, on one H200 (torch 2.11.0+cu130, 2026-11-29), one call:
    for v in base d0 d0+flex64 d0+dense d0+rms d0+tanh d0+flex32+rms d0+mat; do
        timeout 110 python explore_mfu.py $v; done
(flex64, flex32+rms failed to compile; mat did not finish compiling within the 110 s.)
"""
import json, os, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa
from profile_step import GROUPS, synthetic_index  # noqa

variant = sys.argv[1]
parts = set(variant.split("+"))
overrides = ["--batch_size=4096", "--accumulation_steps=1"] + sys.argv[2:]
if "d0" in parts:
    overrides.append("--dropout=0")
if "mat" in parts:
    overrides.append("--compile_mode=max-autotune-no-cudagraphs")
cfg = plm.Config(**plm.parse_overrides(overrides)).validate()

if "rms" in parts:
    plm.nn.LayerNorm = lambda d: nn.RMSNorm(d)
if "tanh" in parts:
    plm.MLP.forward = lambda self, x: self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))
if "flex64" in parts or "flex32" in parts:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    bs = 64 if "flex64" in parts else 32
    opts = {"BLOCK_M": bs, "BLOCK_N": bs, "BLOCK_M1": 32, "BLOCK_N1": bs, "BLOCK_M2": bs, "BLOCK_N2": 32}

    def local_mask(self, T, device):
        key = (T, str(device))
        if key not in self._block_masks:
            w = self.cfg.local_attn_window
            self._block_masks[key] = create_block_mask(lambda b, h, q, kv: plm.local_window_mask(q, kv, w), None, None,
                                                       T, T, device=device, BLOCK_SIZE=bs)
        return self._block_masks[key]
    plm.PlantLM.local_mask = local_mask
    plm.flex_local_attention = lambda q, k, v, m: flex_attention(q, k, v, block_mask=m, kernel_options=opts)
if "dense" in parts:
    idx = torch.arange(cfg.context_size, device="cuda")
    bias = torch.where(plm.local_window_mask(idx[:, None], idx[None, :], cfg.local_attn_window), 0.0, float("-inf"))

    def dense(q, k, v, m):
        s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5 + bias
        return s.softmax(-1).to(q.dtype) @ v
    plm.flex_local_attention = dense

rt = plm.Runtime(0, 0, 1, torch.device("cuda"))
learner = plm.build_learner(cfg, rt, 3)
learner.memory_index = synthetic_index(170_000_000, rt.device)
tokens = torch.randint(0, plm.VOCAB_SIZE, (1, 4096, cfg.prefix_tokens + cfg.context_size + 1))
species = torch.randint(0, 3, (1, 4096))
repeat = torch.zeros(tokens.shape, dtype=torch.bool)
t_start = time.time()
for _ in range(4):
    r = plm.train_step(learner, tokens, species, repeat, 1e-4)
torch.cuda.synchronize()
compile_s = time.time() - t_start
t0 = time.time()
for _ in range(20):
    r = plm.train_step(learner, tokens, species, repeat, 1e-4)
torch.cuda.synchronize()
graphed = (time.time() - t0) / 20
learner.graph = None
for _ in range(2):
    plm.train_step(learner, tokens, species, repeat, 1e-4)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        plm.train_step(learner, tokens, species, repeat, 1e-4)
    torch.cuda.synchronize()
totals = {name: 0.0 for name, _ in GROUPS}
kernels = []
for e in prof.key_averages():
    us = getattr(e, "device_time_total", 0)
    if us <= 0:
        continue
    kernels.append((e.key, us / 3000))
    totals[next(n for n, ks in GROUPS if any(k in e.key.lower() for k in ks))] += us / 3000
flops = learner.model.flops_per_step(4096 * 64, 1)
out = {"variant": variant, "compile_s": compile_s, "graphed_ms": graphed * 1e3, "mfu": flops / graphed / 989e12,
       "loss": float(r.loss), "kernel_ms": sum(totals.values()), "groups_ms": totals,
       "top": sorted(kernels, key=lambda x: -x[1])[:12]}
print(json.dumps({k: v for k, v in out.items() if k != "top"}))
for k, ms in out["top"]:
    print(f"   {ms:7.2f} {k[:100]}")
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), f"explore_{variant}.json"), "w") as f:
    json.dump(out, f, indent=1)

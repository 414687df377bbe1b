"""The HF GPT-2 baseline: what a user would write instead, at Plant LM's shape, behind Plant LM's model interface.

Benchmark-only dependency: transformers (not in requirements.txt). Run it through train_variant.py, so it trains
through exactly the same data pipeline, optimizer, schedule and loop as Plant LM.
"""


import torch.nn as nn
import torch.nn.functional as F

import plant_lm_train as plm


class GPT2Baseline(nn.Module):
    """transformers.GPT2LMHeadModel (vocab 4096, learned positions, no species input, no memory)."""

    def __init__(self, cfg, n_species):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        if cfg.global_memory != "none":
            raise ValueError("the GPT-2 baseline has no global memory: run it with --global_memory=none")
        self.cfg = cfg
        self.gpt2 = GPT2LMHeadModel(GPT2Config(
            vocab_size=plm.VOCAB_SIZE, n_positions=cfg.context_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=0, eos_token_id=0))

    def forward(self, tokens, species, targets=None, reduction="mean"):
        logits = self.gpt2(input_ids=tokens).logits
        if targets is None:
            return logits, None
        return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction=reduction), None

    def flops_per_step(self, n_tokens, batch_forwards):
        d, L, T = self.cfg.d_model, self.cfg.n_layers, self.cfg.context_size
        keys_per_query = (T + 1) / 2
        per_token = L * (24 * d * d + 4 * keys_per_query * d) + 2 * d * plm.VOCAB_SIZE
        return 3 * per_token * n_tokens

"""Two-process CPU (gloo) checks for tests/test_model.py; not a test module itself.

    WANDB_MODE=disabled OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= \
        python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUTDIR DATA_DIR

Each rank writes its results to OUTDIR; the test compares them:
  accumulation: one plant_lm_train.train_step (forward and backward inside DDP no_sync but for the last
      micro-batch, loss / accumulation_steps), with SGD in place of AdamW, on DIFFERENT micro-batches per rank ->
      accum_rank{r}.pt with the all-reduced gradients and the parameters after the step, plus (rank 0) the initial
      state and every micro-batch, for a single-process reference over the whole batch.
  memory: the real plant_lm_train.train() on a tiny synthetic genome dir, with a PlantLM subclass that records the
      training inputs it sees -> memory_rank{r}.pt with the rank's bucket memory after training and its inputs.
"""

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from _helpers import TWO_LAYERS, tiny_config
import plant_lm_train as plm  # _helpers puts the repository on sys.path

ACCUMULATION_STEPS = 2
MICRO_BATCH = 2
SGD_LR = 0.5


def accumulation_case(world_size):
    """(cfg, model, tokens [world * accum, micro, T + 1], species [world * accum, micro]); the same on every rank."""
    cfg = tiny_config(**TWO_LAYERS, batch_size=MICRO_BATCH, accumulation_steps=ACCUMULATION_STEPS, precision="fp32",
                      grad_clip=1e9)  # no clipping: the reference takes a plain SGD step
    torch.manual_seed(0)
    model = plm.PlantLM(cfg, 3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a live memory path, so that memory_kv and memory_gate get gradients too
        model.bucket_memory.normal_(generator=g)
        for block in model.blocks:
            block.attn.memory_gate.uniform_(0.5, 1.5, generator=g)
    tokens = torch.randint(0, plm.VOCAB_SIZE, (world_size * ACCUMULATION_STEPS, MICRO_BATCH, cfg.context_size + 1),
                           generator=g)
    species = torch.randint(0, 3, (world_size * ACCUMULATION_STEPS, MICRO_BATCH), generator=g)
    return cfg, model, tokens, species


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it steps with: train_step clears them right after the step."""

    def step(self, closure=None):
        self.grads = {p: p.grad.clone() for group in self.param_groups for p in group["params"]}
        return super().step(closure)


def run_accumulation(outdir, rank, world_size):
    cfg, model, tokens, species = accumulation_case(world_size)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rt = plm.Runtime(rank, rank, world_size, torch.device("cpu"))
    learner = plm.build_learner(cfg, rt, 3, build_model=lambda *args, **kwargs: model)
    learner.optimizer = RecordingSGD(model.parameters(), lr=SGD_LR)
    mine = slice(rank * ACCUMULATION_STEPS, (rank + 1) * ACCUMULATION_STEPS)  # each rank its own micro-batches
    step_tokens, step_species = tokens[mine], species[mine]
    no_repeats = torch.zeros(step_tokens.shape, dtype=torch.bool)
    plm.train_step(learner, step_tokens, step_species, no_repeats, lr=SGD_LR)  # the trainer's own step
    grads = {name: learner.optimizer.grads[p] for name, p in model.named_parameters()}
    result = {"grads": grads, "params": {name: p.detach().clone() for name, p in model.named_parameters()},
              "step_tokens": step_tokens}
    if rank == 0:
        result.update(initial=initial, tokens=tokens, species=species, config=dataclasses.asdict(cfg))
    torch.save(result, os.path.join(outdir, f"accum_rank{rank}.pt"))


class RecordingPlantLM(plm.PlantLM):
    """PlantLM that keeps every training micro-batch it is given (inputs only), to show the ranks saw different data."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def forward(self, tokens, species, targets=None, **kwargs):
        if self.training:
            self.seen.append(tokens.detach().clone())
        return super().forward(tokens, species, targets, **kwargs)


def run_memory(outdir, data_dir, rank):
    cfg = tiny_config(n_layers=2, dropout=0.1, data_dir=data_dir, species_distribution={"a": 1.0, "b": 1.0},
                      overlap_ratio=0.5, val_fraction=0.1, batch_size=2, accumulation_steps=2, max_steps=4,
                      checkpoint_every=2, global_context=100, precision="fp32", compile=False,
                      checkpoint_dir=os.path.join(outdir, "ckpt"), log_dir=os.path.join(outdir, "logs"),
                      resume="none", seed=7)
    built = []

    def build_model(*args, **kwargs):
        built.append(RecordingPlantLM(*args, **kwargs))
        return built[0]

    plm.train(cfg, build_model=build_model)  # destroys the process group at the end
    model = built[0]
    torch.save({"bucket_memory": model.bucket_memory.clone(), "bucket_weight": model.bucket_weight.clone(),
                "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "seen": torch.stack(model.seen)}, os.path.join(outdir, f"memory_rank{rank}.pt"))


def main(outdir, data_dir):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_accumulation(outdir, rank, world_size)
    dist.barrier()
    run_memory(outdir, data_dir, rank)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""The CUDA path (compiled, bf16) against the CPU path (eager, fp32): the same code on both.

    python bench/gpu_agreement.py      -> bench/results/gpu_agreement.json
Same weights, same non-zero bucket memory and open memory gates; logits and gradients compared by
relative L2 error ||a - b|| / ||b||.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    torch.manual_seed(0)
    cfg = plm.Config(dropout=0.0, global_memory="buckets")  # the memory path that attends on every device
    reference = plm.PlantLM(cfg, 3)
    tokens = torch.randint(0, plm.VOCAB_SIZE, (16, cfg.context_size + 1))
    species = torch.randint(0, 3, (16,))
    with torch.no_grad():
        _, hidden = reference(tokens[:, :-1], species)
        reference.update_bucket_memory(reference.bucket_observations(tokens[:, :-1], hidden))
        for block in reference.blocks:
            block.attn.memory_gate.fill_(0.5)
    state = reference.state_dict()

    def loss_and_grads(model, device, dtype, compiled):
        model = model.to(device)
        model.load_state_dict(state)
        model.window_bias(cfg.context_size, device)
        run = torch.compile(model) if compiled else model
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, _ = run(tokens[:, :-1].to(device), species.to(device))
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].to(device).flatten())
        loss.backward()
        grads = torch.cat([p.grad.flatten().float().cpu() for p in model.parameters()])
        return logits.detach().float().cpu(), grads

    cpu_logits, cpu_grads = loss_and_grads(plm.PlantLM(cfg, 3), torch.device("cpu"), None, False)
    cuda = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for label, dtype, compiled in [("cuda fp32 eager", None, False), ("cuda fp32 compiled", None, True),
                                   ("cuda bf16 compiled", torch.bfloat16, True)]:
        logits, grads = loss_and_grads(plm.PlantLM(cfg, 3), cuda, dtype, compiled)
        results[label] = {"logits_rel_err": rel(logits, cpu_logits), "grads_rel_err": rel(grads, cpu_grads)}
        print(label, results[label], flush=True)
    write_result(os.path.join(RESULTS, "gpu_agreement.json"), results)


if __name__ == "__main__":
    main()

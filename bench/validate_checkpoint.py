"""A checkpoint's validation bits/base on the trainer's fixed windows, with as many windows as asked (0: all).

    python bench/validate_checkpoint.py CHECKPOINT [CHECKPOINT ...] [--eval_windows 4096] [--name NAME]
Each checkpoint is scored with its own Config (data, split, memory), the retrieval index beside it and
plant_lm_train.validation_loss itself, on the GPU when there is one: a run's figures on another number of windows
than it validated on. Writes bench/results/NAME.json with --name.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plant_lm_train as plm  # noqa: E402
from _results import RESULTS, write_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--eval_windows", type=int, default=4096)
    parser.add_argument("--name")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rt = plm.Runtime(0, 0, 1, device)
    results = []
    for path in args.checkpoints:
        ckpt = plm.load_checkpoint(path)
        folder = os.path.dirname(os.path.abspath(path))
        cfg = dataclasses.replace(plm.checkpoint_config(ckpt["config"]), eval_windows=args.eval_windows,
                                  checkpoint_dir=folder)
        catalog = plm.scan_genomes(cfg, warn=lambda message: None, progress=False,
                                   cache_dir=os.path.join(folder, "data_cache"))
        if catalog.species != ckpt["species"]:
            raise SystemExit(f"error: {path} was trained on {ckpt['species']}, {cfg.data_dir} holds {catalog.species}")
        tokens, species, repeat = plm.load_validation(catalog, cfg)
        model = plm.PlantLM(cfg, len(catalog.species))
        model.load_state_dict(ckpt["model_state_dict"])
        model.to(device)
        index = None
        if cfg.retrieves:
            index = plm.load_retrieval_index(plm.retrieval_index_path(folder, ckpt["retrieval_index"],
                                                                      cfg.index_layout), device)
        autocast_dtype, _ = plm.precision_settings(cfg, device)
        started = time.time()
        loss, by_species, by_repeat = plm.validation_loss(model, tokens, species, repeat, cfg, rt, autocast_dtype,
                                                          index)
        bits = plm.NATS_PER_TOKEN_TO_BITS_PER_BASE
        result = {"checkpoint": path, "step": ckpt["step"], "global_memory": cfg.global_memory,
                  "windows": len(tokens), "val_bits_per_base": loss * bits,
                  "by_species": {name: x * bits for name, x in zip(catalog.species, by_species)},
                  "repeat": by_repeat["repeat"] * bits, "nonrepeat": by_repeat["nonrepeat"] * bits,
                  "seconds": time.time() - started}
        print(result, flush=True)
        results.append(result)
    if args.name:
        meta = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
        write_result(os.path.join(RESULTS, f"{args.name}.json"), {"meta": meta, "results": results})


if __name__ == "__main__":
    main()

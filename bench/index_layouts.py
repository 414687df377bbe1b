"""The two retrieval index layouts side by side on one data set: size, build, lookups, and whether they agree.

    python bench/index_layouts.py [--data_dir data] [--windows 1024] [--name index_layouts_cpu]
Each layout is built from the training chunks in a child process of its own (so that its peak resident memory is
its own), on the device this runs on (tables) or the host (suffix_array), saved and loaded as training does. Then,
in this process, both count one batch of validation windows (--windows, with the 12/18/24-base contexts and each
target's 0 and 6 bases): the median of 3 timings, and how many counts differ. Writes bench/results/NAME.json.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from _results import RESULTS, gpu_header, write_result

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plant_lm_train as plm  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--windows", type=int, default=1024)
    parser.add_argument("--name", default="index_layouts_cpu")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # child: build this layout and save it to --to
    parser.add_argument("--to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.build:
        return build(args, device)
    folder = tempfile.mkdtemp(prefix="index_layouts_")
    layouts = {}
    for layout in plm.INDEX_LAYOUTS:
        path = os.path.join(folder, f"{layout}.pt")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), f"--data_dir={args.data_dir}",
                                f"--build={layout}", f"--to={path}"], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stderr[-3000:])
        layouts[layout] = json.loads(child.stdout.strip().splitlines()[-1])
        print(layout, layouts[layout], flush=True)
    cfg = plm.Config(data_dir=args.data_dir)
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    tokens, _, _ = plm.load_validation(catalog, cfg)
    windows = tokens[:args.windows].long().to(device)
    found = {}
    for layout, report in layouts.items():
        index = plm.load_retrieval_index(os.path.join(folder, f"{layout}.pt"), device)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            found[layout] = index.counts(windows, cfg.prefix_tokens, exclude_self=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        report["lookup_s_median_of_3"] = sorted(times)[1]
        os.remove(os.path.join(folder, f"{layout}.pt"))
    tables, suffixes = found["tables"], found["suffix_array"]
    header = gpu_header() if device.type == "cuda" else {"device": "cpu", "torch": torch.__version__,
                                                         "date": time.strftime("%Y-%m-%d"),
                                                         "command": " ".join(sys.argv)}
    result = {"meta": {**header, "windows": len(windows), "statistic": "one build each; lookups median of 3"},
              "layouts": layouts,
              "counts_compared": tables.numel(),
              "context_and_target_counts_differing": int((tables[..., 1] != suffixes[..., 1]).sum()),
              "context_counts_differing": int((tables[..., 0] != suffixes[..., 0]).sum())}
    write_result(os.path.join(RESULTS, f"{args.name}.json"), result, announce=True)
    print(json.dumps(result, indent=1))


def build(args, device):
    """In a child process: scan, build one layout, save it, and print its figures as one JSON line."""
    cfg = plm.Config(data_dir=args.data_dir, index_layout=args.build)
    catalog = plm.scan_genomes(cfg, warn=lambda m: None, progress=False)
    n_bases = sum(c.n_tokens for c in catalog.train_chunks) * plm.BASES_PER_TOKEN
    start = time.perf_counter()
    index = plm.build_retrieval_index(catalog, cfg, device, "bench")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    plm.save_retrieval_index(index, args.to)
    print(json.dumps({"training_bases": n_bases, "build_s": seconds, "file_bytes": os.path.getsize(args.to),
                      "bytes_per_base": os.path.getsize(args.to) / n_bases, "summary": index.summary(),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # ru_maxrss: KiB
                      "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}))


if __name__ == "__main__":
    main()

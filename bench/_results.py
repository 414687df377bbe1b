"""How the scripts in bench/ write their results: indented JSON, by default under bench/results. The scripts run as
python bench/X.py, which puts this folder on sys.path: `from _results import write_result`."""

import json
import os
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_result(path, result, default=None, announce=False, atomic=False):
    """`result` as JSON (indent 1) at `path`, its folder made first. default: json.dump's, for values JSON has no
    type for (numpy scalars); announce: print "wrote PATH"; atomic: write PATH.tmp and rename it onto PATH, so that
    a file rewritten after every stage of a long run is never left half-written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    target = path + ".tmp" if atomic else path
    with open(target, "w") as f:
        json.dump(result, f, indent=1, default=default)
    if atomic:
        os.replace(target, path)
    if announce:
        print(f"wrote {path}")


def gpu_header():
    """The first keys of a GPU script's result: CUDA device 0's name, torch's version, the day and the command."""
    import torch
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv)}

"""Run plant_lm_train's entry point, keeping a copy of every checkpoint it writes.

Usage: python tests/_keep_checkpoints.py KEEP_DIR [plant_lm_train args...]
Each checkpoint save_checkpoint writes is also copied to KEEP_DIR/step_<step>.pt, so that a test can resume from
any intermediate step of a run whose rolling model_latest.pt was overwritten later (same schedule, no kill needed).
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plant_lm_train as plm  # noqa: E402

keep_dir = sys.argv.pop(1)
original_save = plm.save_checkpoint


def save_and_keep(path, payload):
    original_save(path, payload)
    os.makedirs(keep_dir, exist_ok=True)
    shutil.copyfile(path, os.path.join(keep_dir, f"step_{payload['step']}.pt"))


plm.save_checkpoint = save_and_keep
sys.exit(plm.main(sys.argv[1:]))

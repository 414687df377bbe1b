"""Run plant_lm_train's entry point, overwriting a genome file with garbage once the scan and the validation
windows have been read, i.e. just before the DataLoader workers open it. The scan's token stores are dropped, as
where the data cache cannot be written, so that the workers read the FASTA file itself.

Usage: python tests/_corrupt_after_scan.py PATH_TO_CORRUPT [plant_lm_train args...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plant_lm_train as plm  # noqa: E402

target = sys.argv.pop(1)
original_load_validation = plm.load_validation


def load_validation_then_corrupt(index, cfg):
    result = original_load_validation(index, cfg)
    with open(target, "wb") as f:
        f.write(bytes(range(256)) * 64)  # NUL bytes: binary, not FASTA
    index.stores.clear()
    return result


plm.load_validation = load_validation_then_corrupt
sys.exit(plm.main(sys.argv[1:]))

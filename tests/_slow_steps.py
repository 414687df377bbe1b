"""Run plant_lm_train's entry point with every optimizer step and every validation made slow by a sleep.

Usage: python tests/_slow_steps.py STEP_SECONDS VALIDATION_SECONDS [plant_lm_train args...]
The real step and the real validation still run after the sleep: only the clock sees a slower machine.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plant_lm_train as plm  # noqa: E402

step_seconds, validation_seconds = float(sys.argv[1]), float(sys.argv[2])
real_step, real_validation = plm.train_step, plm.validation_loss


def slow_step(*args, **kwargs):
    time.sleep(step_seconds)
    return real_step(*args, **kwargs)


def slow_validation(*args, **kwargs):
    time.sleep(validation_seconds)
    return real_validation(*args, **kwargs)


plm.train_step, plm.validation_loss = slow_step, slow_validation  # the loop looks both up at each call
sys.exit(plm.main(sys.argv[3:]))

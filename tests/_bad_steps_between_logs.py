"""Run plant_lm_train's entry point with a model whose loss is infinite on optimizer steps 2 to 4 only.

Usage: python tests/_bad_steps_between_logs.py [plant_lm_train args...]   (with --accumulation_steps=2)
The streak of three skipped steps ends long before the next log line (the caller sets log_every=10).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plant_lm_train as plm  # noqa: E402

BAD_FORWARDS = range(2, 8)  # training forward calls 2..7 = optimizer steps 2, 3, 4 at 2 micro-batches a step


class BadForAWhile(plm.PlantLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.training_forwards = 0

    def forward(self, tokens, species, targets=None, **kwargs):
        loss, hidden = super().forward(tokens, species, targets, **kwargs)
        if self.training:
            if self.training_forwards in BAD_FORWARDS:
                loss = loss * torch.tensor(float("inf"))
            self.training_forwards += 1
        return loss, hidden


plm.PlantLM = BadForAWhile  # build_learner builds plm.PlantLM by default
sys.exit(plm.main(sys.argv[1:]))

"""Tests of the wall clock: max_minutes counts the whole invocation and leaves room for the last validation and save;
validation and saves follow minutes (stretched where they are slow) unless step counts override them; the closing
lines split the wall time.

The budget is checked end to end on a CPU subprocess whose steps and validations are slowed by sleeps
(tests/_slow_steps.py); the cadence in-process, on a Clock whose time is set by hand.
"""

import math
import os
import re
import time
import types

import pytest
import torch

import plant_lm_train as plm
from _helpers import TESTS, TINY_ARGS, describe, load, read_jsonl, run_train, train_env

# ----------------------------------------------------------------------------- the budget, end to end


def test_max_minutes_holds_the_whole_invocation_with_slow_steps_and_slow_validations(genome_dir, tmp_path):
    """0.1 s steps and a 3 s validation every 40 steps under a 40 s budget counted from launch: the run ends inside
    the budget (within its 10 s tolerance), not long before it, and its last validation and model_latest.pt are at
    its last step. Counting only step time, as max_minutes once did, overruns by the validations."""
    budget_s = 40
    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    args = [f"--data_dir={genome_dir}", *TINY_ARGS, "--species_distribution=s:1", "--global_memory=none",
            "--n_epochs=100000", "--eval_every=40", "--log_every=5", f"--max_minutes={budget_s / 60}",
            f"--checkpoint_dir={ckpt_dir}", f"--log_dir={log_dir}"]
    started = time.time()
    proc = run_train(args, cwd=tmp_path, script=os.path.join(TESTS, "_slow_steps.py"), script_args=["0.1", "3"],
                     env=train_env(PLANT_LM_START=repr(started)), timeout=240)
    wall = time.time() - started
    assert proc.returncode == 0, describe(proc)
    assert budget_s * 0.6 < wall <= budget_s + 10, f"{wall:.1f} s for a {budget_s} s budget\n{describe(proc)}"
    final_step = int(re.search(r"done: (\d+) steps", proc.stdout).group(1))
    assert final_step > 80, describe(proc)  # it trained, rather than stopping at once
    assert load(ckpt_dir / "model_latest.pt")["step"] == final_step
    records = read_jsonl(log_dir)
    validations = [r["step"] for r in records if "val_bits_per_base" in r]
    assert validations == list(range(40, final_step, 40)) + [final_step], validations
    split = next(r for r in records if "time_split_s" in r)
    assert set(split["time_split_s"]) == {"start_up", "steps", "data_wait", "validation", "checkpoints"}
    assert split["time_split_s"]["validation"] >= 3 * len(validations)
    assert split["time_split_s"]["steps"] >= 0.1 * final_step
    assert sum(split["time_split_s"].values()) == pytest.approx(split["wall_s"], abs=0.05)
    assert re.search(r"wall time [\d.]+ s: start up [\d.]+ s \([\d.]+ %\), steps [\d.]+ s \([\d.]+ %\), data wait "
                     r"[\d.]+ s \([\d.]+ %\), validation [\d.]+ s \([\d.]+ %\), checkpoints [\d.]+ s", proc.stdout)


# ----------------------------------------------------------------------------- the cadence, in-process

class FakeTime:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(plm.time, "time", clock)
    return clock


def clock_at_start(fake_time, step=0, n_val=64, **config):
    """A Clock whose steps start at fake_time.now, with a stand-in run: one CPU rank, a 1000-parameter model. Its
    log-line measures count once the run is past the warm-up steps: call observe_steps with run.step there."""
    cfg = plm.Config(**config).check()
    run = types.SimpleNamespace(step=step, val_tokens=torch.zeros(n_val, 3),
                                rt=plm.Runtime(0, 0, 1, torch.device("cpu")),
                                learner=types.SimpleNamespace(model=torch.nn.Linear(10, 100)))
    clock = plm.Clock(cfg, start=fake_time.now - 30)  # 30 s of start-up
    clock.start_steps(run)
    return clock, run


def take(fake_time, seconds):
    fake_time.now += seconds


def test_validation_comes_every_eval_every_minutes_and_stretches_when_it_is_slow(fake_time):
    clock, run = clock_at_start(fake_time, eval_every_minutes=1.0)
    run.step = 20
    clock.observe_steps(run, 10, 0.1)  # quick steps: the first validation's estimate is small
    take(fake_time, 59)
    assert not clock.poll(run).validation
    take(fake_time, 2)
    assert clock.poll(run).validation
    with clock.paused_for("validation"):
        take(fake_time, 0.5)  # quick: the next one a minute on
    take(fake_time, 59)
    assert not clock.poll(run).validation
    take(fake_time, 1)
    assert clock.poll(run).validation
    with clock.paused_for("validation"):
        take(fake_time, 10)  # slow (a big model on a CPU): 10 s / MAX_PAUSE_SHARE = 400 s on
    take(fake_time, 399)
    assert not clock.poll(run).validation
    take(fake_time, 2)
    assert clock.poll(run).validation
    assert clock.spent["validation"] == pytest.approx(10.5)


def test_step_counts_override_the_minutes(fake_time):
    clock, run = clock_at_start(fake_time, eval_every=3, checkpoint_every=4)
    asked = []
    for step in range(1, 13):
        run.step = step
        take(fake_time, 3600)  # an hour a step: by the minutes, everything would be due every step
        due = clock.poll(run)
        asked.append((due.validation, due.checkpoint))
    assert [s for s, (v, _) in enumerate(asked, 1) if v] == [3, 6, 9, 12]
    assert [s for s, (_, c) in enumerate(asked, 1) if c] == [4, 8, 12]


def test_model_best_does_not_put_off_model_latest(fake_time):
    clock, run = clock_at_start(fake_time, checkpoint_every_minutes=10.0)
    take(fake_time, 500)
    with clock.paused_for("checkpoints", reschedule=False):  # model_best.pt
        take(fake_time, 1)
    take(fake_time, 100)
    assert clock.poll(run).checkpoint
    assert clock.spent["checkpoints"] == 1


def test_no_periodic_save_when_checkpoint_every_minutes_is_0(fake_time):
    clock, run = clock_at_start(fake_time, checkpoint_every_minutes=0.0)
    take(fake_time, 10 ** 6)
    assert not clock.poll(run).checkpoint


def test_out_of_time_leaves_room_for_a_step_the_last_validation_and_the_last_save(fake_time):
    clock, run = clock_at_start(fake_time, max_minutes=10.0)  # the deadline: start + 600 = steps' start + 570
    run.step = 20
    clock.observe_steps(run, 10, 5.0)  # 0.5 s a step, measured at a log line
    with clock.paused_for("validation"):
        take(fake_time, 4)
    with clock.paused_for("checkpoints"):
        take(fake_time, 2)
    finish = 0.5 + 4 + 2 * 2 + plm.EXIT_SECONDS  # the last validation, model_best.pt and model_latest.pt
    assert clock.finish_estimate(run) == pytest.approx(finish)
    clock.next_due = {"validation": math.inf, "checkpoints": math.inf}  # nothing due in the loop meanwhile
    fake_time.now = clock.deadline - finish - 0.01
    assert not clock.poll(run).out_of_time
    take(fake_time, 0.02)
    assert clock.poll(run).out_of_time


def test_the_warm_up_steps_that_compile_do_not_count_in_the_estimates(fake_time):
    """A GPU run's first step compiles for 30 s and its third captures the graph; then a step takes 0.5 s. A 5-minute
    budget must not end at step 1 (a step time of 30 s would make a validation of 64 micro-batches' windows look
    like 15 minutes). After the warm-up: the mean step since, a validation of the val windows at half a step per
    micro-batch's windows, a save at 200 MB/s of fp32 weights and two moments."""
    clock, run = clock_at_start(fake_time, n_val=4096, max_minutes=5.0, batch_size=16, accumulation_steps=4)
    for step, seconds in enumerate([30, 1, 5], 1):  # compile, eager, capture
        take(fake_time, seconds)
        run.step = step
        assert not clock.poll(run).out_of_time
    assert clock.step_estimate(run) == 0.0
    for step in range(4, 9):
        take(fake_time, 0.5)
        run.step = step
        clock.poll(run)
    assert clock.step_estimate(run) == pytest.approx(0.5)
    clock.observe_steps(run, 8, 36.0 + 2.5)  # a log line over steps 1-8: warm-up included, so not kept
    assert clock.step_estimate(run) == pytest.approx(0.5)
    n_params = 10 * 100 + 100
    expected = 0.5 + (4096 / 64 * 0.5 / 2 + 1.0) + 2 * (12 * n_params / 200e6 + 1.0) + plm.EXIT_SECONDS
    assert clock.finish_estimate(run) == pytest.approx(expected)


def test_without_max_minutes_the_clock_never_stops_a_run(fake_time):
    clock, run = clock_at_start(fake_time)
    take(fake_time, 10 ** 7)
    assert math.isinf(clock.deadline) and not clock.poll(run).out_of_time


def test_max_minutes_counts_from_run_sh_start(monkeypatch):
    monkeypatch.setenv("PLANT_LM_START", "12345.5")
    assert plm.invocation_start(7.0) == 12345.5
    monkeypatch.delenv("PLANT_LM_START")
    assert plm.invocation_start(7.0) == 7.0


def test_the_first_validation_waits_while_its_estimate_is_a_large_share(fake_time):
    """A big model on a CPU: 4096 windows at 2 s a step of 64 windows, about 65 s a validation, waits 65 / 0.025 s."""
    clock, run = clock_at_start(fake_time, n_val=4096, eval_every_minutes=1.0, batch_size=16, accumulation_steps=4)
    run.step = 20
    clock.observe_steps(run, 10, 20.0)
    estimate = clock.validation_estimate(run)
    assert estimate == pytest.approx(4096 / 64 * 2.0 / 2 + 1.0)
    take(fake_time, estimate / plm.MAX_PAUSE_SHARE - 1)
    assert not clock.poll(run).validation
    take(fake_time, 2)
    assert clock.poll(run).validation


def test_a_validation_due_at_the_end_is_left_to_the_finish_when_both_do_not_fit(fake_time):
    """A 10 s validation due with 25 s left: the finish alone (step, validation, two saves, exit) takes about 20 s,
    the due one on top would overrun, so the run stops now and validates once, in the finish."""
    clock, run = clock_at_start(fake_time, max_minutes=10.0, eval_every_minutes=1.0)
    run.step = 20
    clock.observe_steps(run, 10, 5.0)
    with clock.paused_for("validation"):
        take(fake_time, 10)
    with clock.paused_for("checkpoints"):
        take(fake_time, 1)
    clock.next_due["validation"] = -math.inf  # due
    fake_time.now = clock.deadline - 25
    due = clock.poll(run)
    assert due.out_of_time and not due.validation and not due.checkpoint
    fake_time.now = clock.deadline - 40
    due = clock.poll(run)
    assert not due.out_of_time and due.validation


def test_a_budget_too_small_for_the_last_validation_says_how_far_past_it_the_run_goes():
    """On a CPU, start-up and one validation can outlast a few minutes: the stop line then says so, with the way out,
    instead of claiming time left."""
    cfg = plm.Config(max_minutes=3, eval_windows=4096)
    assert plm.out_of_time_line(cfg, 4, 60.0, 40.0).endswith("with time left for the last validation and checkpoint")
    over = plm.out_of_time_line(cfg, 4, 120.0, 165.0)
    assert "time left" not in over
    assert "about 165 s" in over and "about 45 s past it" in over and "--eval_windows, now 4096" in over
    assert "about 165 s past it" in plm.out_of_time_line(cfg, 4, -3.0, 165.0)  # the deadline already behind

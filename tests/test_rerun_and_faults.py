"""The user's habit (edit Config, run again) and faults that could hide: resume under changed settings, logs
redirected to a file, epoch checkpoints and disk space, non-finite steps between log lines, which errors are one
line, and the small runtime helpers (GPU peak FLOPs, NVML, netrc, log files after a failed start).
"""

import dataclasses
import gc
import os
import re
import sys
import types
import warnings
from collections import namedtuple

import pytest
import torch

import plant_lm_train as plm
from _helpers import TESTS, TINY_ARGS, describe, read_jsonl, run_train, tiny_config


def args(data_dir, tmp_path, *extra):
    return [f"--data_dir={data_dir}", *TINY_ARGS, "--species_distribution=s:1", "--global_memory=none",
            f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}", *extra]


# ----------------------------------------------------------------------------- resume under changed settings

def test_config_fields_carry_their_kind_as_metadata():
    assert set(plm.fields_of_kind("architecture")) == {"d_model", "n_layers", "n_heads", "context_size",
                                                      "local_attn_window", "n_buckets", "global_memory",
                                                      "retrieval_mixing"}
    assert set(plm.fields_of_kind("split")) == {"chunk_size", "val_fraction"}
    assert {"log_every", "eval_every", "max_minutes", "num_workers"} <= set(plm.fields_of_kind("runtime"))
    assert {"learning_rate", "n_epochs", "batch_size", "max_steps"} <= set(plm.fields_of_kind(None))


def test_resume_refuses_changed_training_settings_naming_each_field_old_and_new():
    saved = dataclasses.asdict(plm.Config())
    now = plm.Config(learning_rate=3e-4, n_epochs=20, batch_size=8, max_steps=100)
    with pytest.raises(plm.ConfigError) as error:
        plm.check_compatible(saved, now, ["s"], ["s"], "ck.pt", warn=lambda m: None)
    message = str(error.value)
    for line in ("learning_rate: checkpoint 0.0001 vs now 0.0003", "n_epochs: checkpoint 10 vs now 20",
                 "batch_size: checkpoint 16 vs now 8", "max_steps: checkpoint 0 vs now 100"):
        assert line in message, message
    assert "RESUME=none" in message and "--resume_with_new_settings=true" in message


def test_resume_with_new_settings_continues_and_reports_each_change():
    saved = dataclasses.asdict(plm.Config())
    said = []
    plm.check_compatible(saved, plm.Config(learning_rate=3e-4, resume_with_new_settings=True), ["s"], ["s"], "ck.pt",
                         warn=said.append)
    assert said == ["resuming ck.pt with a changed setting: learning_rate: checkpoint 0.0001 vs now 0.0003"]


def test_resume_continues_when_only_runtime_fields_changed_and_notes_them():
    saved = dataclasses.asdict(plm.Config())
    said = []
    plm.check_compatible(saved, plm.Config(log_every=7, eval_every=9, max_minutes=5.0, num_workers=1), ["s"], ["s"],
                         "ck.pt", warn=said.append)
    assert len(said) == 4 and all(s.startswith("note: runtime setting changed since ck.pt: ") for s in said), said


def test_a_field_the_checkpoint_predates_counts_as_its_default():
    saved = dataclasses.asdict(plm.Config())
    del saved["keep_epoch_checkpoints"], saved["max_bad_steps"]
    plm.check_compatible(saved, plm.Config(), ["s"], ["s"], "ck.pt", warn=lambda m: None)


def test_a_checkpoint_from_before_index_layout_reads_as_the_tables_it_was_trained_with():
    former = plm.Config(global_memory="retrieval", index_layout="tables")
    saved = dataclasses.asdict(former)
    del saved["index_layout"]  # written before the field existed, when every index was tables
    assert plm.checkpoint_config(saved).index_layout == "tables"
    said = []
    plm.check_compatible(saved, former, ["s"], ["s"], "ck.pt", warn=said.append)
    assert said == []
    with pytest.raises(plm.ConfigError, match="index_layout: checkpoint 'tables' vs now 'suffix_array'"):
        plm.check_compatible(saved, plm.Config(global_memory="retrieval"), ["s"], ["s"], "ck.pt", warn=said.append)


def test_rerun_with_an_edited_learning_rate_refuses_then_continues_with_the_flag(genome_dir, tmp_path):
    first = run_train(args(genome_dir, tmp_path, "--max_steps=2"), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    edited = run_train(args(genome_dir, tmp_path, "--max_steps=4", "--learning_rate=0.001"), cwd=tmp_path)
    assert edited.returncode == 2, describe(edited)
    assert "learning_rate: checkpoint 0.0001 vs now 0.001" in edited.stderr, describe(edited)
    assert "max_steps: checkpoint 2 vs now 4" in edited.stderr, describe(edited)
    assert "Traceback" not in edited.stderr
    going_on = run_train(args(genome_dir, tmp_path, "--max_steps=4", "--learning_rate=0.001",
                              "--resume_with_new_settings=true"), cwd=tmp_path)
    assert going_on.returncode == 0, describe(going_on)
    assert "resumed from" in going_on.stdout and "at step 2" in going_on.stdout, describe(going_on)
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))["step"] == 4


def test_rerun_with_only_runtime_fields_changed_continues(genome_dir, tmp_path):
    first = run_train(args(genome_dir, tmp_path, "--max_steps=2"), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    again = run_train(args(genome_dir, tmp_path, "--max_steps=2", "--log_every=2", "--eval_every=5"), cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert "note: runtime setting changed since" in again.stdout and "log_every: checkpoint 1 vs now 2" in again.stdout


def test_a_checkpoint_of_a_graphed_gpu_run_resumes_on_the_cpu(genome_dir, tmp_path):
    """StepGraph.capture marks the optimizer's groups capturable, and checkpoints keep the mark; AdamW on a CPU
    refuses to step with it, so resume clears it (capture sets it again where there is a graph)."""
    first = run_train(args(genome_dir, tmp_path, "--max_steps=2"), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    path = tmp_path / "ckpt" / "model_latest.pt"
    ckpt = plm.load_checkpoint(str(path))
    for group in ckpt["optimizer_state_dict"]["param_groups"]:
        group["capturable"] = True  # as a graphed run on a GPU saves it
    torch.save(ckpt, str(path))
    resumed = run_train(args(genome_dir, tmp_path, "--max_steps=3", "--resume_with_new_settings=true"), cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert "resumed from" in resumed.stdout and plm.load_checkpoint(str(path))["step"] == 3


def test_ctrl_c_with_resume_none_names_the_checkpoint_and_how_to_resume_from_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "ckpt").mkdir()
    plm.save_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"), {"model_state_dict": {}, "step": 7})

    def interrupted(cfg, **_):
        raise KeyboardInterrupt
    monkeypatch.setattr(plm, "train", interrupted)
    monkeypatch.delenv("RESUME", raising=False)
    assert plm.main([f"--checkpoint_dir={tmp_path / 'ckpt'}", "--resume=none"]) == 130
    err = capsys.readouterr().err
    assert f"the latest checkpoint is {tmp_path / 'ckpt' / 'model_latest.pt'} (this run has resume=none; " \
           f"--resume=auto resumes from it)" in err, err


# ----------------------------------------------------------------------------- output redirected to a file

def test_a_run_whose_output_is_not_a_terminal_draws_no_progress_bars(genome_dir, tmp_path):
    proc = run_train(args(genome_dir, tmp_path, "--max_steps=6", "--log_every=3"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "\r" not in proc.stdout + proc.stderr, "progress-bar redraws in redirected output"
    assert "it/s" not in proc.stderr and "scanning genomes" not in proc.stderr, proc.stderr[-2000:]
    steps = [int(m) for m in re.findall(r"^step (\d+) epoch", proc.stdout, flags=re.M)]
    assert steps == [3, 6], proc.stdout[-3000:]  # the plain log lines at log_every are the progress report


# ----------------------------------------------------------------------------- checkpoints and disk space

def test_keep_epoch_checkpoints_keeps_only_the_newest_epochs(genome_dir, tmp_path):
    proc = run_train(args(genome_dir, tmp_path, "--n_epochs=3", "--keep_epoch_checkpoints=1", "--eval_every=100"),
                     cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    names = sorted(n for n in os.listdir(tmp_path / "ckpt") if n.startswith("model_epoch_"))
    assert names == ["model_epoch_3.pt"], names
    assert re.search(r"checkpoints: about [\d.]+ GB each, up to 3 files \(1 model_epoch_N.pt", proc.stdout), \
        proc.stdout[-3000:]


def test_pruning_never_deletes_the_epoch_just_written_nor_another_runs_later_epochs(genome_dir, tmp_path):
    """A folder still holds an earlier run's model_epoch_5.pt; a fresh run (RESUME=none) keeping 1 epoch must keep
    the epoch it just wrote, not delete it in favour of the other run's higher number."""
    (tmp_path / "ckpt").mkdir()
    other_run = tmp_path / "ckpt" / "model_epoch_5.pt"
    other_run.write_bytes(b"another run's checkpoint")
    proc = run_train(args(genome_dir, tmp_path, "--n_epochs=2", "--keep_epoch_checkpoints=1", "--eval_every=100",
                          "--resume=none"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    names = sorted(n for n in os.listdir(tmp_path / "ckpt") if n.startswith("model_epoch_"))
    assert names == ["model_epoch_2.pt", "model_epoch_5.pt"], names


def test_every_epoch_checkpoint_is_kept_by_default(genome_dir, tmp_path):
    proc = run_train(args(genome_dir, tmp_path, "--n_epochs=2", "--eval_every=100"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert {"model_epoch_1.pt", "model_epoch_2.pt"} <= set(os.listdir(tmp_path / "ckpt"))


def test_the_disk_report_warns_naming_the_figures_when_free_space_is_short(tmp_path, monkeypatch):
    cfg = tiny_config(checkpoint_dir=str(tmp_path / "ckpt"), n_epochs=10)
    model = plm.PlantLM(cfg, 1)
    run = types.SimpleNamespace(cfg=cfg, learner=types.SimpleNamespace(model=model), total_steps=100, per_epoch=10)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(plm.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    assert "warning" not in plm.checkpoint_disk_report(run)
    monkeypatch.setattr(plm.shutil, "disk_usage", lambda path: usage(10**12, 0, 1000))
    report = plm.checkpoint_disk_report(run)
    assert re.search(r"warning: the checkpoints need [\d.]+ GB more than is there, and 0.0 GB is free", report), report
    assert "12 files" in report  # 10 epochs, model_latest.pt and model_best.pt
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "retrieval_index_0123.pt").write_bytes(b"x" * 3_000_000)
    assert "beside them 1 retrieval index file(s), 0.00 GB" in plm.checkpoint_disk_report(run)


# ----------------------------------------------------------------------------- non-finite steps between log lines

def bad_steps_run(genome_dir, tmp_path, max_bad_steps):
    return run_train(args(genome_dir, tmp_path, "--max_steps=12", "--log_every=10", "--eval_every=100",
                          f"--max_bad_steps={max_bad_steps}"),
                     cwd=tmp_path, script=os.path.join(TESTS, "_bad_steps_between_logs.py"))


def test_a_streak_of_bad_steps_that_ends_between_log_lines_still_stops_the_run(genome_dir, tmp_path):
    proc = bad_steps_run(genome_dir, tmp_path, max_bad_steps=3)
    assert proc.returncode == 2, describe(proc)
    assert "error: 3 consecutive non-finite steps up to step 10 (Config.max_bad_steps = 3)" in proc.stderr, \
        describe(proc)


def test_skipped_steps_stay_out_of_the_logged_training_loss(genome_dir, tmp_path):
    proc = bad_steps_run(genome_dir, tmp_path, max_bad_steps=4)
    assert proc.returncode == 0, describe(proc)
    at_10 = next(r for r in read_jsonl(tmp_path / "logs") if r.get("step") == 10 and "loss" in r)
    assert at_10["skipped_steps"] == 3
    assert 0 < at_10["loss"] < 20, at_10  # the mean of the 7 good steps, not nan or inf


# ----------------------------------------------------------------------------- which errors are one line

def test_a_bug_keeps_its_traceback_and_only_our_errors_are_one_line(monkeypatch, capsys):
    def numpy_bug(cfg, **_):
        raise ValueError("pvals must have at least 1 dimension")
    monkeypatch.setattr(plm, "train", numpy_bug)
    with pytest.raises(ValueError, match="pvals"):
        plm.main(["--max_steps=1"])
    for ours in (plm.ConfigError("Config.d_model = 3: bad"), plm.DataError("x.fa: bad"),
                 plm.TrainingStopped("stopped")):
        monkeypatch.setattr(plm, "train", lambda cfg, error=ours, **_: (_ for _ in ()).throw(error))
        assert plm.main(["--max_steps=1"]) == 2
        assert capsys.readouterr().err == f"error: {ours}\n"


def test_an_os_error_outside_our_checks_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(plm, "train", lambda cfg, **_: open("/nonexistent/dir/file"))
    with pytest.raises(FileNotFoundError):
        plm.main(["--max_steps=1"])


# ----------------------------------------------------------------------------- runtime helpers

@pytest.mark.parametrize("name, peak", [("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
                                        ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA GeForce RTX 4090", 165e12), ("Tesla T4", None)])
def test_peak_flops_match_whole_words_of_the_gpu_name(name, peak):
    assert plm.peak_flops_for_name(name) == peak


def test_nvml_is_initialized_once_per_process(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50),
        nvmlDeviceGetTemperature=lambda h, kind: 60, nvmlDeviceGetPowerUsage=lambda h: 300_000,
        NVML_TEMPERATURE_GPU=0, NVMLError=RuntimeError)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    plm.nvml_handle.cache_clear()
    try:
        for _ in range(3):
            assert plm.gpu_state(torch.device("cuda", 0)) == {"gpu_util": 50, "gpu_temp_c": 60, "gpu_power_w": 300.0}
    finally:
        plm.nvml_handle.cache_clear()
    assert calls == ["init"]


def test_reading_netrc_leaves_no_file_open(tmp_path, monkeypatch):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plm.netrc_has_wandb()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_a_failed_scan_closes_the_log_files(tmp_path, monkeypatch):
    logs = []

    class RecordedRunLog(plm.RunLog):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            logs.append(self)

    monkeypatch.setattr(plm, "RunLog", RecordedRunLog)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "data").mkdir()
    cfg = plm.Config(data_dir=str(tmp_path / "data"), log_dir=str(tmp_path / "logs"), compile=False)
    with pytest.raises(plm.DataError):
        plm.train(cfg)
    assert logs and logs[0].log_file.closed and logs[0].metrics_file.closed


# ----------------------------------------------------------------------------- early stopping

def stalled_args(genome_dir, tmp_path, *extra):
    """learning_rate 0: the weights never move, so after the first validation (the best) none improves on it."""
    return args(genome_dir, tmp_path, "--learning_rate=0", "--eval_every=1", "--early_stop_evals=3", *extra)


def test_early_stop_after_early_stop_evals_validations_without_a_new_best(genome_dir, tmp_path):
    proc = run_train(stalled_args(genome_dir, tmp_path, "--max_steps=50"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "early stop at step 4: 3 validations in a row without a new best (early_stop_evals = 3)" in proc.stdout
    assert re.search(r"best \d\.\d{4} bits/base at step 1, kept in \S+model_best\.pt", proc.stdout), describe(proc)
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))["step"] == 4
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_best.pt"))["step"] == 1


def test_early_stop_counts_across_a_resume_and_a_rerun_after_it_trains_nothing(genome_dir, tmp_path):
    """Stopped at step 3 (two validations past the best), the resumed run stops where an uninterrupted one does,
    at step 4, not three validations later; run once more, it says why there is nothing to train."""
    first = run_train(stalled_args(genome_dir, tmp_path, "--max_steps=3"), cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    resumed = run_train(stalled_args(genome_dir, tmp_path, "--max_steps=50", "--resume_with_new_settings=true"),
                        cwd=tmp_path)
    assert resumed.returncode == 0, describe(resumed)
    assert "early stop at step 4" in resumed.stdout, describe(resumed)
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))["step"] == 4
    again = run_train(stalled_args(genome_dir, tmp_path, "--max_steps=50"), cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    assert re.search(r"nothing to train: \S+model_latest\.pt stopped early at step 4: 3 validations in a row without a "
                     r"new best", again.stdout), describe(again)
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))["step"] == 4


def test_early_stop_when_validation_rises_early_stop_rise_above_its_best(genome_dir, tmp_path, monkeypatch):
    """Scripted validation losses (nats/token): best 1.0 at step 2, then 1.01 (0.0024 bits/base above it, under the
    0.003 allowed) and 1.03 (0.0072 above): the run stops at step 4 on the rise alone (early_stop_evals = 0), with
    model_best.pt at step 2, and run again it trains nothing, naming the rise kept in model_latest.pt."""
    losses = [2.0, 1.0, 1.01, 1.03] + [0.5] * 50
    scored = []

    def scripted_validation_loss(*args, **kwargs):
        scored.append(losses[len(scored)])
        return scored[-1], [scored[-1]], {"repeat": scored[-1], "nonrepeat": scored[-1]}

    monkeypatch.setattr(plm, "validation_loss", scripted_validation_loss)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PLANT_LM_START"):
        monkeypatch.delenv(name, raising=False)
    cfg = plm.config_from_args(args(genome_dir, tmp_path, "--eval_every=1", "--max_steps=50", "--early_stop_evals=0",
                                    "--early_stop_rise=0.003"))
    plm.train(cfg)
    assert len(scored) == 4
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))["step"] == 4
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_best.pt"))["step"] == 2
    plm.train(cfg)
    assert len(scored) == 4  # nothing trained, nothing scored
    log = "".join(open(path).read() for path in sorted((tmp_path / "logs").glob("training_*.log")))
    assert "early stop at step 4: validation 0.0072 bits/base above its best (early_stop_rise = 0.003)" in log
    assert re.search(r"nothing to train: \S+model_latest\.pt stopped early at step 4: validation 0\.0072 bits/base "
                     r"above its best", log), log[-2000:]


def test_a_run_that_ends_on_an_epoch_saves_its_last_validation_in_model_latest(genome_dir, tmp_path):
    """The epoch checkpoint is written before the run's last validation: model_latest.pt, saved after it, holds its
    best and its early-stop count, and a resume takes it over the epoch checkpoint of the same step."""
    proc = run_train(args(genome_dir, tmp_path, "--n_epochs=1", "--eval_every=1000"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    last = [r for r in read_jsonl(tmp_path / "logs") if "val_loss" in r][-1]
    latest = plm.load_checkpoint(str(tmp_path / "ckpt" / "model_latest.pt"))
    assert last["step"] == latest["step"] == 12 and latest["best_val_loss"] == last["best_val_loss"]
    assert plm.load_checkpoint(str(tmp_path / "ckpt" / "model_epoch_1.pt"))["best_val_loss"] != last["best_val_loss"]
    assert plm.find_latest_checkpoint(str(tmp_path / "ckpt")).endswith("model_latest.pt")

"""Tests of the training loop and entry point of plant_lm_train.py, on the CPU.

Every training run is a subprocess (python or torchrun with gloo) on a tiny model (d_model 32, one layer, 16-token
context, the full 4096-row bucket memory); see TINY in tests/_helpers.py. The data is a ~20 kbp slice of the real
TAIR10 chromosome 1 plus a learnable synthetic species (a 97-base motif repeated, 1% point mutations), small enough
that a 2-process run crosses an epoch boundary in ~30 steps, so both model_epoch_N.pt and model_latest.pt appear.
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import plant_lm_infer as infer
import plant_lm_train as plm
from _helpers import (INFER_SCRIPT, SCRIPT, TESTS, TINY_ARGS, describe, load, motif_genome, read_jsonl, real_slice,
                      run_sh, run_train, state_differences, tiny_config, train_env, write_fasta)

SPECIES_ARG = "--species_distribution=arabidopsis:1,motif:1"
LEARN = ["--learning_rate=3e-3", "--dropout=0.1"]  # dropout on (default off): resumes must replay its masks too
E2E_STEPS = 36
KEEP = os.path.join(TESTS, "_keep_checkpoints.py")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, real_genome):
    """arabidopsis: the first 20 kbp of TAIR10 chr1 (streamed); motif: 8 kbp of a repeated 97-base motif."""
    root = tmp_path_factory.mktemp("genomes") / "data"
    real_slice(real_genome("arabidopsis"), root / "arabidopsis" / "slice.fa.gz", 20_000)
    write_fasta(root / "motif" / "motif.fa.gz", [("motif_chr1", motif_genome(8_000, seed=0))])
    return str(root)


def base_args(data_dir, *extra):
    return [f"--data_dir={data_dir}", *TINY_ARGS, SPECIES_ARG, *LEARN, *extra]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, data_dir):
    """One 2-process torchrun (gloo) run of E2E_STEPS steps from cwd = a fresh directory (logs/, dna_model/ there)."""
    run_dir = tmp_path_factory.mktemp("e2e")
    start = time.time()
    proc = run_train(base_args(data_dir, f"--max_steps={E2E_STEPS}"), cwd=run_dir, nproc=2)
    log_paths = sorted(glob.glob(str(run_dir / "logs" / "training_*.log")))
    log_text = open(log_paths[0]).read() if log_paths else ""
    match = re.search(r"(\d+) steps per\s+epoch", log_text)
    return SimpleNamespace(proc=proc, dir=run_dir, log_text=log_text, seconds=time.time() - start,
                           per_epoch=int(match.group(1)) if match else None,
                           ckpt_dir=run_dir / "dna_model", log_dir=run_dir / "logs")


@pytest.fixture(scope="module")
def e2e_ok(e2e):
    assert e2e.proc.returncode == 0, describe(e2e.proc)
    assert e2e.per_epoch and e2e.per_epoch < E2E_STEPS, \
        f"test design: expected an epoch end within {E2E_STEPS} steps, got {e2e.per_epoch} steps per epoch"
    return e2e


# ----------------------------------------------------------------------------- 1. end to end, 2 processes

def test_two_process_run_exits_0_and_loss_decreases(e2e_ok):
    records = read_jsonl(e2e_ok.log_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == E2E_STEPS
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert first > 8.0, f"an untrained model should be near ln(4096) = 8.32 nats/token, got {first:.3f}"
    assert last < first - 0.3, f"training loss did not decrease: first 3 steps {first:.3f}, last 5 {last:.3f}"
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0] - 0.1, f"validation loss did not decrease: {val}"


REQUIRED_FIELDS = {"model_state_dict", "optimizer_state_dict", "scaler_state_dict", "epoch", "step", "config",
                   "species", "steps_per_epoch", "world_size", "best_val_loss", "rng_states"}


def test_model_best_holds_the_weights_of_the_lowest_validation_loss(e2e_ok):
    val = [(r["step"], r["val_loss"]) for r in read_jsonl(e2e_ok.log_dir) if "val_loss" in r]
    best_step, best_loss = min(val, key=lambda sv: (sv[1], sv[0]))  # the first step that reached the minimum
    ckpt = torch.load(e2e_ok.ckpt_dir / "model_best.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == best_step and ckpt["best_val_loss"] == pytest.approx(best_loss, rel=1e-9)
    assert len(ckpt["rng_states"]) == 2, "a full checkpoint: it can be resumed from"


def test_two_process_run_shows_no_ddp_deprecation_warning(e2e_ok):
    """torch 2.13 deprecates DDP's broadcast_buffers with a warning on every run; wrap_ddp uses the new name."""
    assert "broadcast_buffers" not in e2e_ok.proc.stderr + e2e_ok.proc.stdout


def test_checkpoints_hold_every_field_and_load_with_weights_only(e2e_ok):
    epoch_path, latest_path = e2e_ok.ckpt_dir / "model_epoch_1.pt", e2e_ok.ckpt_dir / "model_latest.pt"
    assert epoch_path.exists() and latest_path.exists(), sorted(os.listdir(e2e_ok.ckpt_dir))
    assert not glob.glob(str(e2e_ok.ckpt_dir / "*.tmp*")), "temporary checkpoint files left behind"
    val = {r["step"]: r["val_loss"] for r in read_jsonl(e2e_ok.log_dir) if "val_loss" in r}
    for path, step, epoch in ((epoch_path, e2e_ok.per_epoch, 1), (latest_path, E2E_STEPS, 1)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
        assert REQUIRED_FIELDS <= set(ckpt), f"{path.name} lacks {REQUIRED_FIELDS - set(ckpt)}"
        assert (ckpt["step"], ckpt["epoch"]) == (step, epoch)
        assert ckpt["world_size"] == 2 and ckpt["steps_per_epoch"] == e2e_ok.per_epoch
        assert ckpt["species"] == ["arabidopsis", "motif"]
        assert ckpt["best_val_loss"] == pytest.approx(min(v for s, v in val.items() if s <= step), rel=1e-9)
        cfg = plm.Config(**ckpt["config"])
        assert (cfg.d_model, cfg.n_layers, cfg.context_size, cfg.max_steps) == (32, 1, 16, E2E_STEPS)

        state = ckpt["model_state_dict"]
        assert not [k for k in state if k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k]
        assert state["bucket_memory"].shape == (4096, 32) and state["bucket_weight"].shape == (4096,)
        assert state["bucket_weight"].sum() > 0 and state["bucket_memory"].abs().sum() > 0, "memory never updated"
        model = plm.PlantLM(cfg, n_species=2)
        model.load_state_dict(state)  # strict: every key present, no stray prefix

        optimizer = ckpt["optimizer_state_dict"]
        assert len(optimizer["state"]) == len(list(model.parameters()))
        assert all(int(s["step"]) == step for s in optimizer["state"].values())
        assert isinstance(ckpt["scaler_state_dict"], dict)

        rng = ckpt["rng_states"]
        assert len(rng) == 2, "one RNG state per rank"
        assert all({"python", "numpy", "torch"} <= set(r) for r in rng)
        assert not torch.equal(rng[0]["torch"], rng[1]["torch"]), "ranks are seeded differently"


def test_training_log_has_config_versions_species_data_parameters_and_batch(e2e_ok):
    text = e2e_ok.log_text
    config_line = re.search(r"config: (\{.*\})", text)
    assert config_line, "no config line"
    assert json.loads(config_line.group(1))["max_steps"] == E2E_STEPS
    versions = json.loads(re.search(r"versions: (\{.*\})", text).group(1))
    assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__
    assert re.search(r"0 arabidopsis\s+1 species_distribution\s+50.0%", text), text
    assert re.search(r"1 motif\s+1 species_distribution\s+50.0%", text), text
    assert re.search(r"arabidopsis: 1 file\(s\), 1 record\(s\), 20,000 bases read", text)
    assert re.search(r"motif: 1 file\(s\), 1 record\(s\), 8,000 bases read", text)
    n_params = sum(p.numel() for p in plm.PlantLM(tiny_config(), 2).parameters())
    assert f"model: {n_params:,} parameters" in text
    assert "effective batch: 4 x 2 accumulation x 2 rank(s) = 16 windows = 256 tokens per optimizer step" in text
    assert f"done: {E2E_STEPS} steps" in text


TRAIN_KEYS = {"step", "loss", "bits_per_base", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "host_rss_mb"}


def test_metrics_jsonl_has_training_and_validation_records(e2e_ok):
    records = read_jsonl(e2e_ok.log_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, E2E_STEPS + 1))  # log_every = 1
    for r in train:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS)
        assert r["bits_per_base"] == pytest.approx(r["loss"] / (6 * math.log(2)))
        assert 0 < r["lr"] <= 3e-3 * (1 + 1e-9) and r["samples_per_s"] > 0 and r["host_rss_mb"] > 50
        assert r["tokens_per_s"] == pytest.approx(16 * r["samples_per_s"])
        assert r["skipped_steps"] == 0
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == list(range(2, E2E_STEPS + 1, 2))  # eval_every = 2
    for r in val:
        assert math.isfinite(r["val_loss"])
        assert r["val_bits_per_base"] == pytest.approx(r["val_loss"] / (6 * math.log(2)))


def test_loss_curve_png_is_written(e2e_ok):
    plots = glob.glob(str(e2e_ok.log_dir / "loss_*.png"))
    assert len(plots) == 1, plots
    with open(plots[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not glob.glob(str(e2e_ok.log_dir / "*.tmp.png"))


# ----------------------------------------------------------------------------- 2. exact resume
#
# The learning-rate schedule is a function of total_steps = min(max_steps, steps_per_epoch * n_epochs), so a first
# half run with --max_steps=N/2 follows a different schedule (its cosine ends at N/2): "stop halfway" is not
# reproducible through --max_steps. Instead each test resumes from a checkpoint that a full N-step run wrote
# halfway: the epoch checkpoint of the end-to-end run, or a copy of every checkpoint a run writes, kept by
# tests/_keep_checkpoints.py (the rolling model_latest.pt is overwritten by the end of the run). The resumed
# run has the same Config except checkpoint_dir/log_dir, and its final checkpoint must equal the straight run's
# bitwise (torch.equal on every tensor of the model and optimizer states; no tolerance).

def assert_same_training_state(straight, resumed):
    a, b = load(straight), load(resumed)
    assert a["step"] == b["step"]
    diffs = state_differences(a["model_state_dict"], b["model_state_dict"], "model")
    diffs += state_differences(a["optimizer_state_dict"], b["optimizer_state_dict"], "optimizer")
    diffs += state_differences(a["best_val_loss"], b["best_val_loss"], "best_val_loss")
    assert not diffs, "resumed run differs from the straight run:\n  " + "\n  ".join(diffs[:20])


def test_resume_two_processes_from_the_epoch_checkpoint_is_bitwise_exact(e2e_ok, data_dir, tmp_path):
    """2 ranks, dropout 0.1: resume the end-to-end run from model_epoch_1.pt and finish its last steps."""
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    shutil.copy(e2e_ok.ckpt_dir / "model_epoch_1.pt", ckpt_dir / "model_epoch_1.pt")
    proc = run_train(base_args(data_dir, f"--max_steps={E2E_STEPS}", f"--checkpoint_dir={ckpt_dir}",
                               f"--log_dir={tmp_path / 'logs'}"), cwd=tmp_path, nproc=2, env=train_env(RESUME="auto"))
    assert proc.returncode == 0, describe(proc)
    assert f"resumed from {ckpt_dir / 'model_epoch_1.pt'} at step {e2e_ok.per_epoch}" in proc.stdout
    assert_same_training_state(e2e_ok.ckpt_dir / "model_latest.pt", ckpt_dir / "model_latest.pt")


def _straight_then_resumed(data_dir, tmp_path, nproc, total, resume_at, extra=()):
    args = base_args(data_dir, f"--max_steps={total}", *extra)
    keep = tmp_path / "keep"
    straight = run_train(args + [f"--checkpoint_every={resume_at}", f"--checkpoint_dir={tmp_path / 'full'}",
                                 f"--log_dir={tmp_path / 'logs_full'}"], cwd=tmp_path, nproc=nproc,
                         script=KEEP, script_args=[str(keep)])
    assert straight.returncode == 0, describe(straight)
    assert (keep / f"step_{resume_at}.pt").exists(), sorted(os.listdir(keep))
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    shutil.copy(keep / f"step_{resume_at}.pt", res_dir / "model_latest.pt")
    resumed = run_train(args + [f"--checkpoint_dir={res_dir}", f"--log_dir={tmp_path / 'logs_res'}"], cwd=tmp_path,
                        nproc=nproc, env=train_env(RESUME="auto"))
    assert resumed.returncode == 0, describe(resumed)
    assert f"at step {resume_at}" in resumed.stdout
    assert_same_training_state(tmp_path / "full" / "model_latest.pt", res_dir / "model_latest.pt")


def test_resume_mid_epoch_single_process_is_bitwise_exact(data_dir, tmp_path):
    """1 process, dropout 0.1, resume at step 4 of 8 (mid-epoch: the data stream fast-forwards).

    The dropout masks must go on exactly as in the straight run: iter(DataLoader) draws its base seed from the
    global torch RNG, so train() restores the checkpoint's RNG states only after that call (restored before it,
    the resumed run's masks would be one draw off).
    """
    _straight_then_resumed(data_dir, tmp_path, nproc=1, total=8, resume_at=4)


def test_resume_two_processes_with_loader_workers_and_augmentation_at_an_odd_step_is_bitwise_exact(data_dir,
                                                                                                  tmp_path):
    """2 ranks x 2 DataLoader workers, resume at step 3 of 6 (the workers' step residues swap); dropout 0, so
    this isolates the data order, DDP and bucket-memory state from the dropout RNG (see the test above). With every
    augmentation on: the frame shifts and strands replay from the seeded streams, the repeat weights follow them.
    The straight run logs the weighted loss beside the plain one, and validation per repeat class."""
    _straight_then_resumed(data_dir, tmp_path, nproc=2, total=6, resume_at=3,
                           extra=["--num_workers=2", "--dropout=0", "--frame_shift=true", "--reverse_complement=0.5",
                                  "--repeat_loss_weight=0.3"])
    records = read_jsonl(tmp_path / "logs_full")
    train = [r for r in records if "loss" in r]
    assert train and all("weighted_loss" in r for r in train), train
    assert any(r["weighted_loss"] != r["loss"] for r in train), train  # the slice of TAIR10 is soft-masked
    val = [r for r in records if "val_loss" in r]
    assert val and all(0 < r["val_bits_per_base_repeat"] != r["val_bits_per_base_nonrepeat"] > 0 for r in val)


@pytest.mark.parametrize("memory", ["retrieval", "neighbours"])
def test_resume_with_a_suffix_array_on_two_ranks_is_bitwise_exact(memory, data_dir, tmp_path):
    """index_layout = suffix_array on 2 ranks. retrieval: each rank holds half of the array and the counts cross the
    ranks in every step and validation (15 windows in passes of 4: the ranks' last passes hold 3 and 4 rows, the
    lookups padded to 4). neighbours (the default): each rank holds all of it, and looks its own windows' homologs
    up, leaving out each window's own chunk. A run resumed at step 3 of 6 ends where the straight run does. (On 4
    gloo ranks a resumed run differs from the straight one by about 1e-8 with any memory, the tables' included, so
    4 ranks are checked on the counts alone, in tests/test_retrieval.py.)"""
    _straight_then_resumed(data_dir, tmp_path, nproc=2, total=6, resume_at=3,
                           extra=[f"--global_memory={memory}", "--index_layout=suffix_array", "--dropout=0",
                                  "--eval_windows=15", "--eval_batch_size=4"])


def test_resume_with_other_loader_workers_warns_that_the_data_order_changes(data_dir, tmp_path):
    """DataLoader workers own disjoint shards, so a resume with another num_workers cannot replay the data."""
    args = base_args(data_dir, f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}",
                     "--checkpoint_every=2")
    first = run_train(args + ["--max_steps=2"], cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    same = run_train(args + ["--max_steps=3", "--resume_with_new_settings=true"], cwd=tmp_path,
                     env=train_env(RESUME="auto"))
    assert same.returncode == 0, describe(same)
    assert "will not replay exactly" not in same.stdout + same.stderr
    other = run_train(args + ["--max_steps=4", "--num_workers=1", "--resume_with_new_settings=true"], cwd=tmp_path,
                      env=train_env(RESUME="auto"))
    assert other.returncode == 0, describe(other)
    output = other.stdout + other.stderr
    assert "at step 3" in output
    assert "0 DataLoader worker(s) per rank" in output and "now 1 rank(s), 1 worker(s)" in output
    assert "will not replay exactly" in output


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_a_rank_killed_mid_epoch_resumes_to_the_same_parameters_as_an_uninterrupted_run(data_dir, tmp_path):
    """kill -9 one rank of a 2-process torchrun after its first rolling checkpoint; the same command run again
    resumes from the latest complete checkpoint and ends bitwise equal to a run that was never interrupted."""
    total = 30
    args = base_args(data_dir, f"--max_steps={total}", "--checkpoint_every=5", "--eval_every=1000")
    straight = run_train(args + [f"--checkpoint_dir={tmp_path / 'straight'}", f"--log_dir={tmp_path / 'logs_a'}"],
                         cwd=tmp_path, nproc=2)
    assert straight.returncode == 0, describe(straight)

    crash_args = args + [f"--checkpoint_dir={tmp_path / 'crash'}", f"--log_dir={tmp_path / 'logs_b'}"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max_restarts=0", SCRIPT, *crash_args], cwd=str(tmp_path), env=train_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    first_checkpoint = tmp_path / "crash" / "model_latest.pt"
    deadline = time.time() + 180
    while not first_checkpoint.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first_checkpoint.exists() and launcher.poll() is None, "the run ended before its first checkpoint"
    ranks = _children(launcher.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    killed_at = load(str(plm.find_latest_checkpoint(str(tmp_path / "crash"))))["step"]
    assert killed_at < total, "the kill came after the run had finished: nothing was interrupted"

    again = run_train(crash_args, cwd=tmp_path, nproc=2)
    assert again.returncode == 0, describe(again)
    assert "resumed from" in again.stdout and f"at step {killed_at}" in again.stdout, describe(again)
    assert_same_training_state(tmp_path / "straight" / "model_latest.pt", tmp_path / "crash" / "model_latest.pt")


# ----------------------------------------------------------------------------- 4. parse_overrides

def test_parse_overrides_rejects_an_unknown_key_naming_it():
    with pytest.raises(ValueError, match=r"unknown Config field 'bogus_key'; known fields: data_dir, "):
        plm.parse_overrides(["--d_model=64", "--bogus_key=1"])


@pytest.mark.parametrize("arg, kind", [("--d_model=abc", "int"), ("--d_model=1.5", "int"),
                                       ("--learning_rate=fast", "float"), ("--compile=maybe", "bool"),
                                       ("--species_distribution=a:1,b", "dict"),
                                       ("--species_distribution=a:x", "dict"),
                                       ("--species_distribution={a: 1}", "dict")])
def test_parse_overrides_rejects_a_value_of_the_wrong_type(arg, kind):
    key = arg[2:].split("=")[0]
    with pytest.raises(ValueError, match=rf"--{key}=.* is not a valid {kind}"):
        plm.parse_overrides([arg])


@pytest.mark.parametrize("arg", ["d_model=64", "--d_model", "-d_model=64"])
def test_parse_overrides_rejects_malformed_arguments(arg):
    with pytest.raises(ValueError, match="expected --key=value"):
        plm.parse_overrides([arg])


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                         ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_parse_overrides_parses_bools(text, value):
    assert plm.parse_overrides([f"--compile={text}"]) == {"compile": value}


def test_parse_overrides_types_follow_the_fields():
    out = plm.parse_overrides(["--d-model=64", "--learning_rate=3e-4", "--max_steps=1_000", "--precision=fp32",
                               "--d_model=128"])
    assert out == {"d_model": 128, "learning_rate": 3e-4, "max_steps": 1000, "precision": "fp32"}  # last one wins
    assert type(out["d_model"]) is int and type(out["learning_rate"]) is float


def test_parse_overrides_accepts_a_fractional_max_minutes():
    """parse_overrides types a value after the field's default: a float field with an int default (max_minutes
    was `float = 0` until 376e11e) rejected --max_minutes=1.5 as 'not a valid int'."""
    assert plm.parse_overrides(["--max_minutes=1.5"]) == {"max_minutes": 1.5}


@pytest.mark.parametrize("text", ["a:1,b:2", " a : 1 , b:2 ", "a:1,b:2,", '{"a": 1, "b": 2}', '{"a": 1.0, "b": 2.0}'])
def test_parse_overrides_species_distribution_pair_and_json_forms(text):
    out = plm.parse_overrides([f"--species_distribution={text}"])
    assert out == {"species_distribution": {"a": 1.0, "b": 2.0}}
    plm.Config(**out).check()


# ----------------------------------------------------------------------------- 5. Config.validate

def test_tiny_config_is_valid():
    tiny_config()


@pytest.mark.parametrize("overrides, field", [
    ({"chunk_size": 601}, "chunk_size"),  # not a multiple of 6
    ({"chunk_size": 96}, "chunk_size"),  # a multiple of 6 but shorter than one (16 + 1) * 6 = 102-base window
    ({"context_size": 1, "local_attn_window": 1}, "context_size"),
    ({"overlap_ratio": 1.0}, "overlap_ratio"),
    ({"overlap_ratio": -0.1}, "overlap_ratio"),
    ({"local_attn_window": 17}, "local_attn_window"),
    ({"local_attn_window": 0}, "local_attn_window"),
    ({"n_buckets": 1024}, "n_buckets"),
    ({"d_model": 30, "n_heads": 4}, "d_model"),
    ({"d_model": 35, "n_heads": 5}, "d_model"),  # divisible, but the rotary head dim 7 is odd
    ({"species_distribution": {"a": -1.0}}, "species_distribution['a']"),
    ({"species_distribution": {"a": float("nan")}}, "species_distribution['a']"),
    ({"batch_size": 0}, "batch_size"),
    ({"accumulation_steps": 0}, "accumulation_steps"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"reverse_complement": 1.5}, "reverse_complement"),  # a probability
    ({"reverse_complement": -0.1}, "reverse_complement"),
    ({"reverse_complement": float("nan")}, "reverse_complement"),
    ({"repeat_loss_weight": 0.0}, "repeat_loss_weight"),  # a micro-batch of repeats alone would weigh nothing
    ({"repeat_loss_weight": -1.0}, "repeat_loss_weight"),
    ({"repeat_loss_weight": float("inf")}, "repeat_loss_weight"),
    ({"repeat_loss_weight": float("nan")}, "repeat_loss_weight"),
])
def test_validate_rejects_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"Config.{field}")):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides, field", [
    ({"n_heads": 0}, "n_heads"),  # named as such: not a d_model error, nor a ZeroDivisionError from d_model % n_heads
    ({"n_heads": -2}, "n_heads"),  # not a d_model error, nor a failed view inside the model
    ({"n_layers": 0}, "n_layers"),  # a model without a single block
    ({"d_model": 0}, "d_model"),  # 0 is divisible by any head count, and its head dim 0 is even
    ({"max_bad_steps": 0}, "max_bad_steps"),  # training would stop at its first log step
])
def test_validate_rejects_degenerate_model_and_guard_sizes(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"Config.{field}")):
        tiny_config(**overrides)


# ----------------------------------------------------------------------------- 6. wandb

WANDB_KEY = "fake0wandb0key0d41d8cd98f00b204e9800998ecf8427e"  # a made-up WANDB_API_KEY
NETRC_KEY = "fake0netrc0key0e3b0c44298fc1c149afbf4c8996fb924"  # a made-up wandb password in ~/.netrc


def test_an_offline_wandb_run_writes_the_api_key_nowhere(data_dir, tmp_path):
    """With WANDB_API_KEY set and a wandb password in ~/.netrc, a run that logs to wandb offline (its run file with
    the config and metrics, console capture and debug logs, under wandb/ and ~/.cache/wandb) must copy neither
    secret into its output, logs/, the metrics jsonl, the wandb files, HOME or the checkpoints."""
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    run_dir.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {NETRC_KEY}\n")
    netrc.chmod(0o600)
    proc = run_train(base_args(data_dir, "--max_steps=2", "--global_memory=none"), cwd=run_dir,
                     env=train_env(WANDB_MODE="offline", WANDB_API_KEY=WANDB_KEY, HOME=home))
    assert proc.returncode == 0, describe(proc)

    written = {}  # every file the run wrote (symbolic links are copies of others), by path
    for folder, _, names in os.walk(tmp_path):
        for name in names:
            path = os.path.join(folder, name)
            if path != str(netrc) and not os.path.islink(path):
                with open(path, "rb") as f:
                    written[path] = f.read()
    (wandb_run,) = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert any(data_dir.encode() in data for path, data in written.items() if path.startswith(wandb_run)), \
        "the run's config is not in its wandb files: a secret logged with it would go unseen"
    assert glob.glob(str(run_dir / "logs" / "metrics_*.jsonl")) and glob.glob(str(run_dir / "dna_model" / "*.pt"))

    for secret in (WANDB_KEY, NETRC_KEY):
        assert secret not in proc.stdout + proc.stderr, f"{secret} is in the run's output"
        leaked = [path for path, data in written.items() if secret.encode() in data]
        assert not leaked, f"{secret} is in {leaked}"
        for path in glob.glob(str(run_dir / "dna_model" / "*.pt")):
            assert secret not in json.dumps(load(path)["config"]), f"{secret} is in the config saved in {path}"



def test_wandb_online_without_credentials_falls_back_to_offline_without_blocking(data_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = train_env(WANDB_MODE="online", HOME=home)
    env.pop("WANDB_SILENT")
    assert "WANDB_API_KEY" not in env
    proc = run_train(base_args(data_dir, "--max_steps=2", "--global_memory=none"), cwd=tmp_path, env=env,
                     timeout=200)  # stdin is /dev/null: a login prompt would fail, not hang
    assert proc.returncode == 0, describe(proc)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if re.search("wandb", line, re.I)
             and not line.startswith("config: ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: ") and "offline" in lines[0] and "credentials" in lines[0]
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*")), "metrics were not logged to an offline wandb run"


# ----------------------------------------------------------------------------- 7. run.sh on the CPU

@pytest.mark.parametrize("step, per_epoch, total_steps, span", [
    (0, 9550, 20, (0, 20)),  # a short max_steps run: the bar ends at 20, not at the epoch's 9,550
    (0, 100, 300, (0, 100)),
    (150, 100, 300, (100, 200)),  # resumed mid-epoch: the bar starts at the epoch's first step
    (250, 100, 260, (200, 260)),
])
def test_the_progress_bar_counts_to_the_end_of_the_epoch_or_of_the_run(step, per_epoch, total_steps, span):
    assert plm.epoch_bar_span(step, per_epoch, total_steps) == span


def test_run_sh_trains_on_the_cpu_with_two_processes(data_dir, tmp_path):
    proc = run_sh([*TINY_ARGS, SPECIES_ARG, "--max_steps=2", "--global_memory=none",
                   f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}"], tmp_path,
                  WORLD_SIZE=2, DATA_DIR=data_dir)
    assert proc.returncode == 0, describe(proc)
    assert "No GPU found: training on the CPU with 2 process(es) (gloo backend)." in proc.stdout
    ckpt = load(tmp_path / "ckpt" / "model_latest.pt")
    assert (ckpt["step"], ckpt["world_size"], ckpt["config"]["data_dir"]) == (2, 2, data_dir)


def test_run_sh_rejects_an_unknown_key_once_without_restarts(data_dir, tmp_path):
    """A Config error is not transient: run.sh should report it once, not let torchrun restart the job
    MAX_RESTARTS times (3 by default: 4 attempts of every rank, ~40 s on this tiny config)."""
    proc = run_sh(["--bogus_key=1"], tmp_path, WORLD_SIZE=1, DATA_DIR=data_dir, MAX_RESTARTS=1)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unknown Config field 'bogus_key'" in out
    assert out.count("unknown Config field 'bogus_key'") == 1, \
        f"the error was reported {out.count('unknown Config field')} times: the launcher retried a Config error"


def test_run_sh_reports_fp16_without_cuda_once_without_restarts(data_dir, tmp_path):
    """The precision check needs the device, so Config.validate cannot make it; run.sh's pre-check does. (train_env
    hides CUDA, so this holds on a GPU machine too.)"""
    proc = run_sh(["--precision=fp16"], tmp_path, WORLD_SIZE=1, DATA_DIR=data_dir, MAX_RESTARTS=1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert out.count("Config.precision = 'fp16' needs a CUDA GPU") == 1, out[-2000:]


def test_run_sh_help_prints_usage_and_starts_nothing(tmp_path):
    proc = run_sh(["--help"], tmp_path, DATA_DIR=str(tmp_path / "no_such_data"))
    assert proc.returncode == 0, describe(proc)
    assert "bash run.sh [--field=value ...]" in proc.stdout and "MAX_RESTARTS" in proc.stdout
    assert "error" not in proc.stdout + proc.stderr


def test_run_sh_reports_a_missing_data_dir_once_without_restarts(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = run_sh([], tmp_path, WORLD_SIZE=1, DATA_DIR=str(missing), MAX_RESTARTS=1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert out.count(f"{missing}: data directory not found") == 1, out[-2000:]


# ----------------------------------------------------------------------------- 8. the eval subcommand

@pytest.fixture(scope="module")
def eval_files(e2e_ok, tmp_path_factory, data_dir):
    """(checkpoint, the motif genome it was trained on, the same bases shuffled: same composition)."""
    folder = tmp_path_factory.mktemp("eval")
    train_fa = os.path.join(data_dir, "motif", "motif.fa.gz")
    with gzip.open(train_fa, "rt") as f:
        seq = "".join(line.strip() for line in f if not line.startswith(">"))
    bases = np.frombuffer(seq.encode(), dtype=np.uint8).copy()
    np.random.default_rng(7).shuffle(bases)
    shuffled = bases.tobytes().decode()
    assert sorted(shuffled) == sorted(seq) and shuffled != seq
    shuffled_fa = write_fasta(folder / "shuffled.fa.gz", [("motif_shuffled", shuffled)])
    return str(e2e_ok.ckpt_dir / "model_latest.pt"), train_fa, shuffled_fa, folder


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_eval_scores_the_training_genome_below_its_shuffle_and_leaves_the_checkpoint_untouched(eval_files):
    ckpt, train_fa, shuffled_fa, folder = eval_files
    before = (sha256(ckpt), os.stat(ckpt).st_mtime_ns)
    out_json = folder / "cli.json"
    proc = subprocess.run([sys.executable, INFER_SCRIPT, "eval", "--checkpoint", ckpt, "--species", "motif", train_fa,
                           shuffled_fa, "--json", str(out_json)], cwd=str(folder), env=train_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, describe(proc)
    assert re.search(r"^overall\s+[\d,]+\s+-[\d.]+\s+[\d.]+$", proc.stdout, re.M), proc.stdout
    result = json.loads(out_json.read_text())
    trained, shuffled = result["files"]
    assert (trained["file"], shuffled["file"]) == (train_fa, shuffled_fa)
    assert trained["bases_scored"] == shuffled["bases_scored"] > 6000
    assert trained["bits_per_base"] < shuffled["bits_per_base"] - 0.1, (trained["bits_per_base"],
                                                                        shuffled["bits_per_base"])
    assert set(trained["records"]) == {"motif_chr1"} and set(shuffled["records"]) == {"motif_shuffled"}
    record = trained["records"]["motif_chr1"]
    assert record["bases_scored"] == trained["bases_scored"]
    assert record["log_likelihood"] == pytest.approx(trained["log_likelihood"])
    assert (sha256(ckpt), os.stat(ckpt).st_mtime_ns) == before, "eval modified the checkpoint file"


def test_eval_unknown_species_lists_the_known_ones(eval_files, capsys):
    ckpt, _, shuffled_fa, _ = eval_files
    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "quercus", shuffled_fa]) == 2
    message = capsys.readouterr().err
    assert "error: species 'quercus'" in message and "known species: arabidopsis, motif" in message
    assert "average" in message


def test_eval_argument_mistakes_are_errors_with_exit_code_2(eval_files, tmp_path, capsys):
    ckpt, train_fa, _, _ = eval_files
    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "motif", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: a directory; give the FASTA files in it" in capsys.readouterr().err
    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "motif", str(tmp_path / "nope.fa")]) == 2
    assert f"error: {tmp_path / 'nope.fa'}: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        infer.main(["eval", "--checkpoint", ckpt, "--species", "motif", "--batch-size", "0", train_fa])
    assert exc.value.code == 2 and "--batch-size: invalid positive_int value: '0'" in capsys.readouterr().err


def test_a_config_mistake_on_the_command_line_exits_2_with_one_error_line(capsys):
    assert plm.main(["--lerning_rate=1e-3"]) == 2
    fields = ", ".join(f.name for f in dataclasses.fields(plm.Config))
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: unknown Config field 'lerning_rate'; known fields: {fields}"]


def test_eval_average_species_scores_every_record(eval_files, capsys):
    ckpt, train_fa, shuffled_fa, folder = eval_files
    out_json = folder / "average.json"
    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "average", train_fa, shuffled_fa,
                     "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["species"] == "average"
    assert [list(f["records"]) for f in result["files"]] == [["motif_chr1"], ["motif_shuffled"]]
    assert 0 < result["bits_per_base"] < 2.2
    assert "overall" in capsys.readouterr().out


def test_eval_reports_a_file_with_nothing_to_score_instead_of_a_perfect_score(eval_files, tmp_path, capsys):
    ckpt, train_fa, _, _ = eval_files
    short = write_fasta(tmp_path / "short.fa.gz", [("contigs", ("ACGTTG" + "N") * 20)])  # 6-base runs: context only
    out_json = tmp_path / "mixed.json"
    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "motif", train_fa, short,
                     "--json", str(out_json)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {short}: nothing scored" in err and "140 bases read" in err, err
    result = json.loads(out_json.read_text())
    scored, empty = result["files"]
    assert empty["bases_scored"] == 0 and empty["bits_per_base"] is None
    assert result["bits_per_base"] == pytest.approx(scored["bits_per_base"]) and scored["bits_per_base"] > 0

    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "motif", short]) == 2
    assert f"error: nothing to score in {short}" in capsys.readouterr().err


def test_eval_of_a_protein_file_is_an_error_naming_it(eval_files, tmp_path, capsys):
    ckpt, _, _, _ = eval_files
    protein = write_fasta(tmp_path / "p.fa.gz", [("sp|P69905|HBA_HUMAN", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF" * 20)])
    assert infer.main(["eval", "--checkpoint", ckpt, "--species", "motif", protein]) == 2
    assert re.search(rf"error: {re.escape(protein)}: .* looks like protein", capsys.readouterr().err)


def test_eval_never_updates_the_bucket_memory(eval_files):
    ckpt_path, train_fa, _, _ = eval_files
    ckpt = load(ckpt_path)
    scorer = infer.load_for_inference(ckpt_path, "motif", "cpu")
    assert ckpt["model_state_dict"]["bucket_weight"].sum() > 0
    infer.score_fasta(scorer, [train_fa], progress=False)
    assert torch.equal(scorer.model.bucket_memory, ckpt["model_state_dict"]["bucket_memory"])
    assert torch.equal(scorer.model.bucket_weight, ckpt["model_state_dict"]["bucket_weight"])


def test_eval_keeps_records_with_the_same_id_apart(eval_files, tmp_path):
    """Two records named chr1 (two assemblies concatenated, say): scan_genomes warns and trains on both, and
    evaluate_fasta keys its per-record totals by record index too, so each keeps its own entry ('chr1 (record N)')
    instead of both landing in one."""
    ckpt_path, _, _, _ = eval_files
    scorer = infer.load_for_inference(ckpt_path, "motif", "cpu")
    fasta = write_fasta(tmp_path / "dup.fa.gz", [("chr1", motif_genome(1200, seed=1)),
                                                    ("chr1", motif_genome(1800, seed=2))])
    (result,) = infer.score_fasta(scorer, [fasta], progress=False)
    assert len(result["records"]) == 2, f"records with the same id were merged: {list(result['records'])}"

"""Reliability tests of plant_lm_train.py: untrusted or broken checkpoints, failed saves, non-finite training,
bad input data, errors inside DataLoader workers, and Config errors caught before any heavy work.

Training runs are CPU subprocesses of the tiny config (TINY in tests/_helpers.py); most data cases run in-process at
the level of scan_genomes / discover_genomes / read_fasta, a few through the entry point to check the exit code
and the one-line `error: <path>: ...` message.
"""

import dataclasses
import errno
import glob
import gzip
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import plant_lm_train as plm
from _helpers import (REPO, SCRIPT, TESTS, TINY_ARGS, armed_checkpoint, assert_armed, describe, load, random_dna,
                      read_jsonl, repeat_flags, run_sh, run_train, tiny_config, tiny_payload, train_env, write_fasta)


def train_args(data_dir, *extra):
    return [f"--data_dir={data_dir}", *TINY_ARGS, "--species_distribution=s:1", "--global_memory=none", *extra]


def error_lines(stderr):
    """The `error: ...` messages of a process's stderr (a progress bar may share their terminal line)."""
    return [line[line.index("error:"):] for line in re.split(r"[\r\n]", stderr) if "error:" in line]


# ----------------------------------------------------------------------------- 9. checkpoints that would run code

def test_load_checkpoint_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    path = armed_checkpoint(ckpt_dir / "model_latest.pt", marker)
    with pytest.raises(ValueError, match=re.escape(path) + ".*not a loadable Plant LM checkpoint"):
        plm.load_checkpoint(path)
    warnings = []
    assert plm.find_latest_checkpoint(str(ckpt_dir), warn=warnings.append) is None
    assert len(warnings) == 1 and path in warnings[0] and "passed over" in warnings[0]
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert_armed(path, marker)


def test_train_refuses_to_resume_from_a_pickle_that_would_run_code(genome_dir, tmp_path):
    marker = tmp_path / "PWNED"
    path = armed_checkpoint(tmp_path / "evil.pt", marker)
    proc = run_train(train_args(genome_dir, "--max_steps=1", f"--log_dir={tmp_path / 'logs'}",
                                f"--checkpoint_dir={tmp_path / 'ckpt'}"), cwd=tmp_path, env=train_env(RESUME=path))
    assert proc.returncode == 2, describe(proc)
    assert not marker.exists(), "resuming ran the checkpoint's code"
    assert error_lines(proc.stderr) and error_lines(proc.stderr)[0].startswith(f"error: {path}: not a loadable")
    assert "Traceback" not in proc.stderr
    assert not glob.glob(str(tmp_path / "ckpt" / "model_*.pt")), "training went on after refusing the checkpoint"
    assert_armed(path, marker)


# ----------------------------------------------------------------------------- 10. incompatible checkpoints

def test_check_compatible_lists_every_differing_field():
    saved = dataclasses.asdict(tiny_config(d_model=48, n_layers=2))
    with pytest.raises(ValueError) as exc:
        plm.check_compatible(saved, tiny_config(), ["a", "b"], ["a", "c"], "ck.pt")
    message = str(exc.value)
    assert "ck.pt does not match" in message
    assert "d_model: checkpoint 48 vs now 32" in message and "n_layers: checkpoint 2 vs now 1" in message
    assert "species: checkpoint ['a', 'b'] vs data now ['a', 'c']" in message
    assert "--resume=none" in message
    plm.check_compatible(dataclasses.asdict(tiny_config()), tiny_config(), ["a"], ["a"], "ck.pt")


def test_train_resume_from_another_d_model_names_the_field_and_exits_2(genome_dir, tmp_path):
    cfg48 = tiny_config(d_model=48, data_dir=genome_dir, global_memory="none")
    path = str(tmp_path / "d48.pt")
    plm.save_checkpoint(path, tiny_payload(cfg48))
    proc = run_train(train_args(genome_dir, "--max_steps=1", f"--log_dir={tmp_path / 'logs'}",
                                f"--checkpoint_dir={tmp_path / 'ckpt'}"), cwd=tmp_path, env=train_env(RESUME=path))
    assert proc.returncode == 2, describe(proc)
    assert "d_model: checkpoint 48 vs now 32" in proc.stderr
    assert "size mismatch" not in proc.stderr and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr)[0].startswith(f"error: {path} does not match this run's model")


def test_run_sh_reports_a_mismatched_checkpoint_once_before_torchrun(genome_dir, tmp_path):
    """A changed model size is the commonest resume error; from the ranks, every torchrun restart repeated it (and
    on gloo a restart after it could hang)."""
    cfg48 = tiny_config(d_model=48, data_dir=genome_dir, global_memory="none")
    ckpt_dir = tmp_path / "ckpt"
    plm.save_checkpoint(str(ckpt_dir / "model_latest.pt"), tiny_payload(cfg48))
    proc = run_sh(train_args(genome_dir, f"--checkpoint_dir={ckpt_dir}", f"--log_dir={tmp_path / 'logs'}"), tmp_path,
                  timeout=120, WORLD_SIZE=1, MAX_RESTARTS=1)
    assert proc.returncode == 2, describe(proc)
    assert (proc.stdout + proc.stderr).count("d_model: checkpoint 48 vs now 32") == 1, describe(proc)
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "logs").exists(), "torchrun was started"


@pytest.mark.parametrize("field, value", [("chunk_size", 1200), ("val_fraction", 0.5)])
def test_resume_refuses_a_changed_validation_split(field, value):
    """Either field moves chunks between the splits: trained-on sequence would be scored as validation."""
    saved = dataclasses.asdict(tiny_config())
    with pytest.raises(ValueError, match=rf"{field}: checkpoint {saved[field]!r} vs now {value!r}"):
        plm.check_compatible(saved, tiny_config(**{field: value}), ["a"], ["a"], "ck.pt")


def test_resume_none_on_the_command_line_beats_resume_auto_in_the_environment(genome_dir, tmp_path):
    """The incompatibility message advises --resume=none: with RESUME=auto exported (as a launcher script might),
    the flag on the command line must still win, or the advice fails again on the same checkpoint."""
    cfg48 = tiny_config(d_model=48, data_dir=genome_dir, global_memory="none")
    ckpt_dir = tmp_path / "ckpt"
    plm.save_checkpoint(str(ckpt_dir / "model_latest.pt"), tiny_payload(cfg48))
    proc = run_train(train_args(genome_dir, "--max_steps=1", "--resume=none", f"--log_dir={tmp_path / 'logs'}",
                                f"--checkpoint_dir={ckpt_dir}"), cwd=tmp_path, env=train_env(RESUME="auto"))
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" not in proc.stdout and load(ckpt_dir / "model_latest.pt")["config"]["d_model"] == 32


# ----------------------------------------------------------------------------- 11. atomic saves

def test_find_latest_checkpoint_skips_temporary_and_truncated_files(tmp_path):
    cfg = tiny_config()
    folder = tmp_path / "ckpt"
    good = str(folder / "model_latest.pt")
    plm.save_checkpoint(good, tiny_payload(cfg, step=5))
    later = tmp_path / "later.pt"
    plm.save_checkpoint(str(later), tiny_payload(cfg, step=50))
    data = later.read_bytes()
    (folder / "model_latest.pt.tmp12345").write_bytes(data)  # a complete temporary file: not a checkpoint yet
    (folder / "model_epoch_3.pt").write_bytes(data[:len(data) // 2])  # a torn write under the final name
    (folder / "model_epoch_4.pt").write_bytes(b"")
    warnings = []
    assert plm.find_latest_checkpoint(str(folder), warn=warnings.append) == good
    assert sorted(re.search(r"model_epoch_\d", w).group() for w in warnings) == ["model_epoch_3", "model_epoch_4"]
    assert all("unreadable checkpoint" in w for w in warnings)


def test_find_latest_checkpoint_prefers_a_regular_checkpoint_to_model_best_at_the_same_step(tmp_path):
    cfg = tiny_config()
    folder = tmp_path / "ckpt"
    plm.save_checkpoint(str(folder / "model_best.pt"), tiny_payload(cfg, step=7))
    plm.save_checkpoint(str(folder / "model_epoch_1.pt"), tiny_payload(cfg, step=5))
    assert plm.find_latest_checkpoint(str(folder)) == str(folder / "model_best.pt")  # the most steps wins
    plm.save_checkpoint(str(folder / "model_latest.pt"), tiny_payload(cfg, step=7))
    assert plm.find_latest_checkpoint(str(folder)) == str(folder / "model_latest.pt")


KILLED_WRITER = r"""
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import plant_lm_train as plm
path = sys.argv[1]
plm.save_checkpoint(path, {{"model_state_dict": {{"w": torch.ones(1000)}}, "step": 1}})
real_save = torch.save
def save_then_die(obj, f):
    real_save(obj, f)
    f.truncate(f.tell() // 2)  # half of the new checkpoint is on disk ...
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # ... when the process is killed
torch.save = save_then_die
plm.save_checkpoint(path, {{"model_state_dict": {{"w": torch.zeros(1000)}}, "step": 2}})
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt" / "model_latest.pt"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=REPO), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, describe(proc)
    leftovers = glob.glob(str(path) + ".tmp*")
    assert len(leftovers) == 1, "test setup: the killed save should have left its temporary file"
    ckpt = plm.load_checkpoint(str(path))
    assert ckpt["step"] == 1 and torch.equal(ckpt["model_state_dict"]["w"], torch.ones(1000))
    assert plm.find_latest_checkpoint(str(path.parent), warn=lambda m: None) == str(path)


def test_ctrl_c_during_a_save_waits_for_the_whole_checkpoint_then_interrupts(tmp_path, monkeypatch):
    """A SIGINT that lands inside torch.save (Ctrl-C, or torchrun passing one on) once cut the checkpoint off and
    torch's zip writer replaced the KeyboardInterrupt with an unrelated RuntimeError and a traceback."""
    cfg = tiny_config()
    path = str(tmp_path / "ckpt" / "model_latest.pt")
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the Python handler runs at the next bytecode boundary: inside the save
        real_save(obj, f)

    monkeypatch.setattr(plm.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        plm.save_checkpoint(path, tiny_payload(cfg, step=3))
    monkeypatch.setattr(plm.torch, "save", real_save)
    assert plm.load_checkpoint(path)["step"] == 3
    assert os.listdir(tmp_path / "ckpt") == ["model_latest.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_leftover_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited, so its pid is free (reuse within the test is unlikely)
    stale = folder / f"model_latest.pt.tmp{dead_pid}"
    live = folder / f"model_epoch_2.pt.tmp{os.getpid()}"
    other = folder / "notes.tmp1"
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    assert plm.remove_stale_temporaries(str(folder)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_a_run_removes_the_temporary_file_a_killed_save_left(genome_dir, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(repo=REPO), str(ckpt_dir / "model_latest.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, describe(proc)
    (leftover,) = glob.glob(str(ckpt_dir / "model_latest.pt.tmp*"))
    run = run_train(train_args(genome_dir, "--max_steps=1", "--resume=none", f"--log_dir={tmp_path / 'logs'}",
                               f"--checkpoint_dir={ckpt_dir}"), cwd=tmp_path)
    assert run.returncode == 0, describe(run)
    assert not os.path.exists(leftover)
    assert f"removed {leftover}" in run.stdout + run.stderr


# ----------------------------------------------------------------------------- 12. failed saves

def test_save_checkpoint_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config()
    path = str(tmp_path / "ckpt" / "model_latest.pt")
    plm.save_checkpoint(path, tiny_payload(cfg, step=1))
    before = open(path, "rb").read()
    real_save = torch.save

    def disk_full(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plm.torch, "save", disk_full)
    with pytest.raises(OSError) as exc:
        plm.save_checkpoint(path, tiny_payload(cfg, step=2))
    monkeypatch.setattr(plm.torch, "save", real_save)
    message = str(exc.value)
    assert f"cannot write checkpoint {path}" in message and "No space left on device" in message
    assert "the previous checkpoint is kept" in message
    assert open(path, "rb").read() == before and plm.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path / "ckpt") == ["model_latest.pt"], "the partial temporary file was not removed"


def test_save_checkpoint_into_a_path_under_a_regular_file_gives_the_clear_message(tmp_path):
    """Root ignores permissions, so the unwritable directory is one whose parent is a regular file: os.makedirs
    fails there with NotADirectoryError, which save_checkpoint must report like any failed write, not let escape."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    path = str(blocker / "ckpt" / "model_latest.pt")
    with pytest.raises(OSError, match=re.escape(f"cannot write checkpoint {path}") + ".*previous checkpoint is kept"):
        plm.save_checkpoint(path, tiny_payload(tiny_config()))


def test_train_stops_with_a_clear_message_when_it_cannot_write_a_checkpoint(genome_dir, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    ckpt_dir = blocker / "ckpt"
    proc = run_train(train_args(genome_dir, "--max_steps=3", "--checkpoint_every=1", f"--checkpoint_dir={ckpt_dir}",
                                f"--log_dir={tmp_path / 'logs'}"), cwd=tmp_path)
    assert proc.returncode != 0, "training continued although no checkpoint could be written"
    assert "done: 3 steps" not in proc.stdout
    assert f"cannot write checkpoint {ckpt_dir / 'model_latest.pt'}" in proc.stderr, describe(proc)


# ----------------------------------------------------------------------------- 13. non-finite weights

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_checkpoint_refuses_non_finite_weights_and_writes_nothing(tmp_path, bad):
    payload = tiny_payload(tiny_config())
    payload["model_state_dict"]["blocks.0.mlp.fc.weight"][3, 5] = bad
    path = tmp_path / "ckpt" / "model_latest.pt"
    with pytest.raises(RuntimeError, match=r"refusing to write .*model_latest\.pt: blocks\.0\.mlp\.fc\.weight holds "
                                           r"non-finite values"):
        plm.save_checkpoint(str(path), payload)
    assert not path.exists()
    assert not path.parent.exists() or os.listdir(path.parent) == [], "a temporary file was left behind"


# ----------------------------------------------------------------------------- 14. non-finite steps

def test_non_finite_steps_are_skipped_counted_and_stop_training_after_max_bad_steps(genome_dir, tmp_path):
    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    proc = run_train(train_args(genome_dir, "--max_steps=20", "--learning_rate=1e30", "--grad_clip=1e30",
                                "--max_bad_steps=3", "--checkpoint_every=1", f"--checkpoint_dir={ckpt_dir}",
                                f"--log_dir={log_dir}"), cwd=tmp_path)
    assert proc.returncode != 0, describe(proc)
    last = ckpt_dir / "model_latest.pt"
    assert re.search(r"3 consecutive non-finite steps up to step 4 \(Config\.max_bad_steps = 3\); last good "
                     rf"checkpoint: {re.escape(str(last))}", proc.stderr), describe(proc)
    skipped = [r["skipped_steps"] for r in read_jsonl(log_dir) if "skipped_steps" in r]
    assert skipped[0] == 0 and max(skipped) >= 2, skipped
    assert re.search(r"warning: 1 step\(s\) up to step 2 had non-finite gradients and were skipped", proc.stdout)
    for path in glob.glob(str(ckpt_dir / "*.pt")):
        ckpt = load(path)
        assert all(torch.isfinite(t).all() for t in ckpt["model_state_dict"].values() if t.is_floating_point())
        # fp32 and bf16 need no loss scale: a skipped step must not halve it (it would never grow back)
        assert ckpt["scaler_state_dict"]["scale"] == 1.0, (path, ckpt["scaler_state_dict"])


def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_to_resume_from(genome_dir, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, SCRIPT,
                             *train_args(genome_dir, "--max_steps=100000", "--checkpoint_every=2",
                                         f"--checkpoint_dir={ckpt_dir}", f"--log_dir={tmp_path / 'logs'}")],
                            cwd=str(tmp_path), env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (ckpt_dir / "model_latest.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted: the same command resumes from {ckpt_dir / 'model_latest.pt'}" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def test_the_closing_log_line_between_log_every_steps_reports_the_last_steps_gradient_norm(genome_dir, tmp_path):
    """3 steps with log_every 50: the only training record is the closing one, which once read grad_norm nan, a figure
    that looks like a diverged run."""
    log_dir = tmp_path / "logs"
    proc = run_train(train_args(genome_dir, "--max_steps=3", "--log_every=50", f"--log_dir={log_dir}",
                                f"--checkpoint_dir={tmp_path / 'ckpt'}"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    (record,) = [r for r in read_jsonl(log_dir) if "grad_norm" in r]
    assert record["step"] == 3 and math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0, record


def test_rerunning_a_finished_run_says_there_is_nothing_to_train(genome_dir, tmp_path):
    args = train_args(genome_dir, "--max_steps=2", f"--checkpoint_dir={tmp_path / 'ckpt'}",
                      f"--log_dir={tmp_path / 'logs'}")
    first = run_train(args, cwd=tmp_path)
    assert first.returncode == 0, describe(first)
    again = run_train(args, cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    output = again.stdout + again.stderr
    assert re.search(r"nothing to train: \S+\.pt is at step 2 of this run's 2; to train further raise --max_steps", output), \
        describe(again)
    assert re.search(r"done: 2 steps.*\n.*best \d\.\d{4} bits/base at step \d, kept in \S+model_best\.pt", output) \
        and "nan" not in output, describe(again)


def test_a_run_without_validation_windows_says_so_and_trains_without_scoring_zero(tmp_path):
    """One species whose genome fits in one chunk: the chunk trains, nothing is held out. A validation loss of 0
    would be a lie, and would pin model_best.pt to the first evaluation."""
    data_dir = tmp_path / "data"
    write_fasta(data_dir / "s" / "s.fa.gz", [("s_chr1", random_dna(540, seed=12))])  # < chunk_size 600
    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    proc = run_train(train_args(str(data_dir), "--max_steps=4", "--eval_every=2", f"--checkpoint_dir={ckpt_dir}",
                                f"--log_dir={log_dir}"), cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    output = proc.stdout + proc.stderr
    assert "warning: no validation windows" in output and "--chunk_size" in output, describe(proc)
    assert "done: 4 steps" in output and "no validation set" in output, describe(proc)
    assert not [r for r in read_jsonl(log_dir) if "val_loss" in r]
    saved = sorted(os.listdir(ckpt_dir))
    assert saved and "model_best.pt" not in saved, saved


# ----------------------------------------------------------------------------- 15. bad input data

def scan(data_dir, **overrides):
    warnings = []
    index = plm.scan_genomes(tiny_config(data_dir=data_dir, **overrides), warn=warnings.append, progress=False)
    return index, warnings


def write_raw(path, content):
    """Write text or bytes as they are (malformed FASTA, binary junk), creating the directory; returns the path."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    return str(path)


def all_tokens(path, cfg):
    return [chunk.tokens.tolist() for chunk in plm.chunk_file(str(path), "x", "f", cfg)]


GOOD = random_dna(3_000, seed=21)


def good_species(root, name="good"):
    return write_fasta(os.path.join(str(root), name, "good.fa.gz"), [("good_chr1", GOOD)])


def test_missing_and_empty_data_dirs_are_data_errors_naming_the_path(tmp_path):
    with pytest.raises(plm.DataError, match=re.escape(str(tmp_path / "nope")) + ": data directory not found"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(plm.DataError, match=re.escape(str(tmp_path / "empty")) + ": no species directories"):
        scan(tmp_path / "empty")


def test_species_directory_without_fasta_is_skipped_with_a_warning(tmp_path):
    good_species(tmp_path)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "README.txt").write_text("no genome here")
    index, warnings = scan(tmp_path)
    assert index.species == ["good"]
    assert any(str(tmp_path / "nothing") in w and "no FASTA file" in w for w in warnings), warnings


@pytest.mark.parametrize("name, content, reason", [
    ("x.fa", np.random.default_rng(3).integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "binary content"),
    ("trunc.fa.gz", gzip.compress(f">t\n{GOOD}\n".encode())[:600], "cannot read"),
    ("corrupt.fa.gz", bytes(b ^ 0xFF if 200 <= i < 300 else b
                            for i, b in enumerate(gzip.compress(f">t\n{GOOD * 4}\n".encode(), mtime=0))),
     "cannot read"),
    ("notfasta.fa.gz", gzip.compress(b"gene_id\tstart\tend\nAT1G01010\t3631\t5899\n"), "not FASTA"),
    ("named.fa.gz", b">r\nACGT\n", "named .gz but is not gzip-compressed"),
    ("protein.fa", (">sp|P69905|HBA_HUMAN\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHV"
                    "DDMPNALSALSDLHAHKLRVDPVNFKLLSHCLLVTLAAHLPAEFTPAVHASLDKFLASVSTVLTSKYR\n").encode() * 10,
     "looks like protein"),
    ("empty.fa", b"", "no FASTA records"),
])
def test_a_bad_file_is_skipped_with_a_warning_naming_it(tmp_path, name, content, reason):
    good_species(tmp_path, "s")
    bad = write_raw(tmp_path / "s" / name, content)
    index, warnings = scan(tmp_path)
    assert [w for w in warnings if bad in w and reason in w and "file skipped" in w], warnings
    assert [p for p, _ in index.skipped] == [bad]
    assert {c.key[1] for c in index.train_chunks + index.val_chunks} == {"s/good.fa.gz"}


def test_a_data_dir_of_only_bad_files_fails_before_training(tmp_path):
    write_raw(tmp_path / "s" / "x.fa", b"\0\1\2" * 1000)
    write_fasta(tmp_path / "t" / "n.fa", [("n", "N" * 5000)], line_width=None)
    with pytest.raises(plm.DataError, match=re.escape(str(tmp_path)) + ": no usable sequence in any genome"):
        scan(tmp_path)


def test_empty_records_and_records_of_only_n_are_counted_not_fatal(tmp_path):
    write_raw(tmp_path / "s" / "g.fa", f">e1\n>e2 empty too\n\n>r\n{GOOD}\n>e3\n")
    write_fasta(tmp_path / "n" / "n.fa", [("n1", "N" * 3000), ("n2", "n" * 700)], line_width=None)
    index, warnings = scan(tmp_path)
    # (FileStats.records counts records that hold sequence: 1 here, although the file has 4 records)
    assert index.species == ["s"] and index.stats["s"].records >= 1
    assert {c.key[2] for c in index.train_chunks + index.val_chunks} == {2}  # every chunk comes from record 'r'
    assert any("n/n.fa" in w and "no A/C/G/T run" in w for w in warnings), warnings
    assert any("species 'n' has no usable sequence and is dropped" in w for w in warnings), warnings


def test_lowercase_only_genome_trains_like_uppercase(tmp_path):
    cfg = tiny_config(data_dir=tmp_path)
    upper = write_fasta(tmp_path / "u.fa", [("u", GOOD)], line_width=None)
    lower = write_fasta(tmp_path / "l.fa", [("l", GOOD.lower())], line_width=None)
    assert all_tokens(lower, cfg) == all_tokens(upper, cfg) and all_tokens(upper, cfg)
    assert all(repeat_flags(chunk).all() for chunk in plm.chunk_file(lower, "x", "f", cfg))
    (tmp_path / "d" / "soft").mkdir(parents=True)
    os.replace(lower, tmp_path / "d" / "soft" / "l.fa")
    index, warnings = scan(tmp_path / "d", species_distribution={"soft": 1.0})
    assert index.species == ["soft"] and index.train_chunks and not warnings


def test_crlf_blank_lines_and_comment_lines_read_like_clean_fasta(tmp_path):
    cfg = tiny_config(data_dir=tmp_path)
    clean = write_fasta(tmp_path / "clean.fa", [("r desc", GOOD)], line_width=None)
    crlf = write_fasta(tmp_path / "crlf.fa", [("r desc", GOOD)], line_width=70, newline="\r\n")
    lines = [GOOD[i:i + 70] for i in range(0, len(GOOD), 70)]
    messy = write_raw(tmp_path / "messy.fa", ";comment before the header\n\n>r desc\n" + "\n\n".join(
        lines[:10]) + "\n;a comment inside the record\n" + "\n".join(lines[10:]) + "\n\n\n")
    expected = all_tokens(clean, cfg)
    assert expected and all_tokens(crlf, cfg) == expected and all_tokens(messy, cfg) == expected
    assert [rid for _, rid, _ in plm.read_fasta(crlf)][:1] == ["r"]


def test_a_chromosome_on_one_line_streams_in_bounded_pieces(tmp_path):
    n = 5_000_000
    seq = random_dna(n, seed=4).encode()
    path = tmp_path / "one_line.fa"
    path.write_bytes(b">chr1 one line\n" + seq + b"\n")
    for block in (1 << 20, 1 << 22):
        lengths = [len(piece) for _, _, piece in plm.read_fasta(str(path), block_size=block)]
        assert sum(lengths) == n
        # the docstring promises block_size pieces; the carry of a line without newline makes it up to 2x
        assert max(lengths) <= 2 * block, (block, max(lengths))


def test_duplicate_record_ids_are_both_used_with_a_warning(tmp_path):
    path = write_fasta(tmp_path / "s" / "dup.fa", [("chr1", GOOD), ("chr1 again", GOOD[::-1]), ("chr2", GOOD)],
                       line_width=None)
    index, warnings = scan(tmp_path, species_distribution={"s": 1.0})
    assert {c.key[2] for c in index.train_chunks + index.val_chunks} == {0, 1, 2}
    assert index.stats["s"].records == 3
    assert [w for w in warnings if path in w and "1 record(s) repeat an earlier record id" in w], warnings


def test_species_directory_names_with_spaces_and_unicode(tmp_path):
    name = "Arabidopsis thaliana ü"
    good_species(tmp_path, name)
    good_species(tmp_path, "Brassica_rapa")
    weights = plm.parse_overrides([f"--species_distribution={name}:2,Brassica_rapa:1"])["species_distribution"]
    index, warnings = scan(tmp_path, species_distribution=weights)
    assert index.species == sorted([name, "Brassica_rapa"]) and not warnings
    assert index.weights[index.species.index(name)] == 2.0
    assert {c.key[0] for c in index.train_chunks} == {name, "Brassica_rapa"}


def test_symlinked_genomes_are_read_and_broken_links_skipped(tmp_path):
    target = good_species(tmp_path / "elsewhere", "x")
    (tmp_path / "data" / "s").mkdir(parents=True)
    os.symlink(target, tmp_path / "data" / "s" / "linked.fa.gz")
    os.symlink(tmp_path / "missing.fa", tmp_path / "data" / "s" / "broken.fa")
    index, warnings = scan(tmp_path / "data")
    assert index.files["s"] == [(str(tmp_path / "data" / "s" / "linked.fa.gz"), "s/linked.fa.gz")]
    assert index.train_chunks
    assert any("broken.fa" in w and "broken link" in w for w in warnings), warnings


@pytest.mark.parametrize("case", ["missing", "empty", "only_bad_files"])
def test_entry_point_reports_bad_data_in_one_line_and_exits_2(tmp_path, case):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "only_bad_files":
        write_raw(data / "s" / "x.fa", np.random.default_rng(5).integers(0, 256, 5000, np.uint8).tobytes())
        write_raw(data / "s" / "t.fa.gz", gzip.compress(f">t\n{GOOD}\n".encode())[:500])
    proc = run_train(train_args(data, "--max_steps=1", f"--log_dir={tmp_path / 'logs'}",
                                f"--checkpoint_dir={tmp_path / 'ckpt'}"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: {data}: "), errors
    assert "model:" not in proc.stdout, "the model was built before the data error"
    if case == "only_bad_files":
        assert f"{data / 's' / 'x.fa'}: binary content" in proc.stdout
        assert f"{data / 's' / 't.fa.gz'}: cannot read" in proc.stdout


# ----------------------------------------------------------------------------- 16. errors inside DataLoader workers

def test_a_genome_corrupted_after_the_scan_fails_in_the_worker_with_a_one_line_message(tmp_path):
    data = tmp_path / "data"
    path = write_fasta(data / "s" / "s.fa.gz", [("s_chr1", random_dna(6_000, seed=12))])
    start = time.time()
    proc = run_train(train_args(data, "--num_workers=1", "--max_steps=5", f"--log_dir={tmp_path / 'logs'}",
                                f"--checkpoint_dir={tmp_path / 'ckpt'}"), cwd=tmp_path, timeout=120,
                     script=os.path.join(TESTS, "_corrupt_after_scan.py"), script_args=[path])
    assert time.time() - start < 120
    assert proc.returncode == 2, describe(proc)
    assert path in proc.stderr and "not gzip-compressed" in proc.stderr
    # the worker's DataError reaches the main process wrapped in the worker's whole traceback ("Caught DataError in
    # DataLoader worker process 0.\nOriginal Traceback ..."): main() must print only the error's own line
    assert "Traceback" not in proc.stderr, describe(proc)
    assert error_lines(proc.stderr)[0] == f"error: {path}: named .gz but is not gzip-compressed"


# ----------------------------------------------------------------------------- 17. Config errors before heavy work

def test_an_invalid_config_exits_2_before_reading_data_or_writing_logs(genome_dir, tmp_path):
    start = time.time()
    proc = run_train(train_args(genome_dir, "--chunk_size=1000"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip() == "error: Config.chunk_size = 1000: must be a multiple of 6"
    assert not os.listdir(tmp_path), "logs or checkpoints were created before the Config was checked"
    assert time.time() - start < 60

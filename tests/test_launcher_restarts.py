"""run.sh when a training process dies (OOM-killer, preemption, crash) on the CPU.

torchrun's restart of gloo ranks after a failure hangs (up to the 30-minute process-group timeout) or crashes in
the process-group set-up more often than not, so on the CPU run.sh defaults to MAX_RESTARTS=0: a killed rank must
end the run within seconds, with a non-zero exit and one line naming the checkpoint to resume from. An explicit
MAX_RESTARTS still wins; a single process has no process group, and its restart resumes from the checkpoint.

Each run is `bash run.sh` with the tiny config of tests/_helpers.py; a rank is SIGKILLed once its first
checkpoint exists. Every process a test starts carries a tag in its environment, and is killed by id at the end
if it is still there (torchrun starts the ranks in sessions of their own, so they would outlive a killed launcher).
"""

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from _helpers import REPO, TINY_ARGS, describe, load, train_env

TAG = "PLANT_LM_TEST_LAUNCHER_TAG"


# ----------------------------------------------------------------------------- processes, from /proc

def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:  # gone, or not ours
        return {}


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tagged(tag):
    """The live processes whose environment carries this test's tag: run.sh, torchrun and the ranks."""
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and _environ(p).get(TAG.encode()) == tag.encode() and _alive(p)]


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def ranks(tag):
    """{RANK: pid} of the training processes: torchrun's children (not their own helpers, which share the env)."""
    return {int(_environ(pid)[b"RANK"]): pid for pid in tagged(tag)
            if b"torch.distributed.run" in _cmdline(_ppid(pid)) and b"RANK" in _environ(pid)}


class Launch:
    """bash run.sh in the background, output to files (a full pipe would stall the ranks); a context manager that
    kills whatever the run left behind."""

    def __init__(self, args, cwd, **env):
        self.tag, self.cwd = uuid.uuid4().hex, cwd
        self.out, self.err = open(cwd / "stdout.txt", "w+"), open(cwd / "stderr.txt", "w+")
        self.proc = subprocess.Popen(["bash", os.path.join(REPO, "run.sh"), *args], cwd=str(cwd),
                                     env=train_env(PYTHON=sys.executable, **{TAG: self.tag}, **env),
                                     stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _ in range(3):  # torchrun first, so that it starts no rank after the scan
            for pid in sorted(tagged(self.tag), key=lambda p: b"torch.distributed.run" not in _cmdline(p)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        self.out.close()
        self.err.close()

    def wait_for_checkpoint(self, ckpt_dir, n_ranks, timeout=120):
        """Block until the first complete checkpoint exists and all n_ranks ranks run; {RANK: pid}."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"run.sh ended before its first checkpoint\n{describe(self.result())}"
            found = ranks(self.tag)
            if len(found) == n_ranks and ckpt_dir.is_dir() and any(
                    name.startswith("model_") and name.endswith(".pt") for name in os.listdir(ckpt_dir)):
                return found
            time.sleep(0.05)
        pytest.fail(f"no checkpoint in {ckpt_dir} after {timeout} s\n{describe(self.result())}")

    def result(self):
        self.out.seek(0)
        self.err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read(), self.err.read())


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def train_args(data_dir, tmp_path, *extra):
    return [f"--data_dir={data_dir}", *TINY_ARGS, "--species_distribution=s:1", "--global_memory=none",
            f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}", "--checkpoint_every=2",
            *extra]


# ----------------------------------------------------------------------------- tests

def test_a_killed_rank_ends_a_cpu_run_promptly_naming_the_checkpoint(genome_dir, tmp_path):
    """Two gloo ranks, MAX_RESTARTS unset: killing rank 1 ends the run within 60 s (it took ~2 s), not a restart
    that hangs in gloo's connect (the old default, MAX_RESTARTS=3, hung in 4 of 6 tries for over 100 s)."""
    ckpt_dir = tmp_path / "ckpt"
    # a run far longer than the test: a restart that works goes on training, and fails the test as a hang would
    args = train_args(genome_dir, tmp_path, "--max_steps=1000000", "--n_epochs=1000000")
    with Launch(args, tmp_path, WORLD_SIZE=2) as run:
        victim = run.wait_for_checkpoint(ckpt_dir, n_ranks=2)[1]
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        try:
            run.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run.sh still running 60 s after rank 1 was killed; ranks now {ranks(run.tag)}\n"
                        f"{describe(run.result())}")
        took = time.time() - killed
        proc = run.result()
        leftovers = [pid for pid in tagged(run.tag) if pid != run.proc.pid]
    assert proc.returncode != 0, describe(proc)
    assert "A failed process ends the run (MAX_RESTARTS=0)" in proc.stdout, describe(proc)
    match = re.search(r"error: training stopped \(torchrun exit status \d+\); the same command resumes from (\S+) "
                      r"\(once the cause above is fixed\)", proc.stderr)
    assert match, describe(proc)
    assert os.path.dirname(match.group(1)) == str(ckpt_dir) and load(match.group(1))["step"] >= 2, describe(proc)
    assert not leftovers, f"processes left running {took:.1f} s after the kill: {leftovers}\n{describe(proc)}"


def test_an_explicit_max_restarts_still_restarts_and_resumes(genome_dir, tmp_path):
    """MAX_RESTARTS=1 on the CPU: torchrun restarts the killed (single) process, which resumes from the checkpoint
    and finishes the run."""
    ckpt_dir = tmp_path / "ckpt"
    args = train_args(genome_dir, tmp_path, "--max_steps=24", "--n_epochs=1000", "--eval_every=1000")
    with Launch(args, tmp_path, WORLD_SIZE=1, MAX_RESTARTS=1) as run:
        victim = run.wait_for_checkpoint(ckpt_dir, n_ranks=1)[0]
        os.kill(victim, signal.SIGKILL)
        try:
            run.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run.sh still running 120 s after the kill\n{describe(run.result())}")
        proc = run.result()
    assert proc.returncode == 0, describe(proc)
    assert "MAX_RESTARTS=1: torchrun restarts the processes after a failure." in proc.stdout, describe(proc)
    output = proc.stdout + proc.stderr
    assert re.search(rf"resumed from {re.escape(str(ckpt_dir))}/model_\w+\.pt at step \d+", output), describe(proc)
    assert max(load(path)["step"] for path in ckpt_dir.glob("model_*.pt")) == 24, describe(proc)


def test_sigint_to_run_sh_stops_the_run_and_names_the_checkpoint(genome_dir, tmp_path):
    """kill -INT on run.sh (a scheduler, a parent script, or Ctrl-C reaching the script) ends the run with the
    trainer's one line, instead of being lost: a script's background child ignores SIGINT unless it gets its own
    process group, and the training then ran to its end."""
    ckpt_dir = tmp_path / "ckpt"
    args = train_args(genome_dir, tmp_path, "--max_steps=1000000", "--n_epochs=1000000")
    with Launch(args, tmp_path, WORLD_SIZE=1) as run:
        run.wait_for_checkpoint(ckpt_dir, n_ranks=1)
        os.kill(run.proc.pid, signal.SIGINT)
        try:
            run.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run.sh still running 60 s after SIGINT\n{describe(run.result())}")
        proc = run.result()
    assert proc.returncode != 0, describe(proc)
    assert re.search(rf"interrupted: the same command resumes from {re.escape(str(ckpt_dir))}/model_\w+\.pt",
                     proc.stderr), describe(proc)

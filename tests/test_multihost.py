"""Real multi-process training on localhost: N JAX processes (CPU, gloo collectives), 2 simulated devices
each, the demo config shrunk, with sampling, evaluation and checkpoints every 2 steps.

What a pod run depends on: sample grids and eval losses computed over FSDP-sharded parameters that span
other processes' devices; the synthetic data set made by process 0 while the others wait (no test set-up
makes it); SIGTERM to ONE process → every process saves the same step and exits 0 within 60 s; re-running
resumes to the losses of an uninterrupted run (rtol 1e-5: same programs, same data, fp32 CPU — only the
collectives' reduction order may differ between runs of one configuration, and it does not here).
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

FSDP = ("--config.mesh.strategy=fsdp", "--config.mesh.ici.data=1", "--config.mesh.ici.fsdp=-1")
DP = ("--config.mesh.strategy=dp", "--config.mesh.ici.data=-1", "--config.mesh.ici.fsdp=1")
TOTAL = 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n, workdir, data_dir, *extra, total_steps=TOTAL):
    """Starts `n` processes of launch/train.py (2 CPU devices each) → list of Popen (stdout+stderr merged)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               SKETCHCOMP_CPU_COLLECTIVES="gloo", JAX_LOG_COMPILES="1")
    procs = []
    logs = pathlib.Path(workdir).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for pid in range(n):
        cmd = [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--config", str(REPO_ROOT / "configs" / "demo.py"),
               "--workdir", str(workdir), f"--config.data.dir={data_dir}", "--config.data.synthetic_images=48",
               "--config.batch_size=8", f"--config.total_steps={total_steps}", "--config.log_every=1",
               "--config.checkpoint_every=2", "--config.sample_every=2", "--config.eval_every=2",
               "--config.sample_steps=2", "--config.eval_batches=1", "--config.optim.warmup_steps=2",
               f"--config.distributed.coordinator=127.0.0.1:{port}", f"--config.distributed.num_processes={n}",
               f"--config.distributed.process_id={pid}", *extra]
        # Output to files, not pipes: a pipe nobody drains yet (the test waits on process 0 first) fills up and
        # blocks its writer, which then stalls every other process in the next collective.
        log_path = logs / f"process{pid}.{time.time_ns()}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        proc.log_path = log_path
        procs.append(proc)
    return procs


def _finish(procs, timeout=1800):
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    outs = [p.log_path.read_text() for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outs


def _rows(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
    return [json.loads(line) for line in lines]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _check_complete_run(workdir):
    assert sorted(_losses(workdir)) == list(range(1, TOTAL + 1))
    evals = {r["step"]: r["eval_loss"] for r in _rows(workdir) if "eval_loss" in r}
    assert sorted(evals) == list(range(2, TOTAL + 1, 2)) and all(np.isfinite(list(evals.values()))), evals
    grids = sorted(p.name for p in (workdir / "samples").glob("*.png"))
    assert grids == [f"step_{s:07d}.png" for s in range(2, TOTAL + 1, 2)]
    from PIL import Image

    grid = np.asarray(Image.open(workdir / "samples" / grids[-1]))
    assert grid.shape == (4 * 64, 5 * 64, 3) and grid[:, 4 * 64:].std() > 0  # 4 rows, the result column drawn


def _preempt_and_resume(n, strategy, tmp_path, reference):
    """Interrupts an n-process run with SIGTERM to its LAST process, checks the agreed stop, resumes, and
    compares every loss with `reference` (the uninterrupted run's workdir)."""
    workdir, data_dir = tmp_path / "run", tmp_path / "data"
    procs = _launch(n, workdir, data_dir, *strategy)
    # signal once the first grid is written: every program is compiled, so the 60 s bound measures the stop
    first_grid = workdir / "samples" / "step_0000002.png"
    deadline = time.time() + 1800
    while time.time() < deadline and not first_grid.exists() and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert first_grid.exists(), "the run did not reach its first sample grid"
    procs[-1].send_signal(signal.SIGTERM)
    signalled = time.time()
    outs = _finish(procs, timeout=60)
    assert time.time() - signalled < 60
    stops = {int(m) for out in outs for m in re.findall(r"train.py: preempted at step (\d+)", out)}
    assert len(stops) == 1 and sum("preempted at step" in out for out in outs) == n, [o[-1500:] for o in outs]
    stop = stops.pop()
    assert stop < TOTAL, "the run ended before the signal was handled: nothing was tested"
    assert _steps(workdir)[-1] == stop
    assert sorted(_losses(workdir)) == list(range(1, stop + 1))  # every row up to the saved step, none lost
    _finish(_launch(n, workdir, data_dir, *strategy))
    ours, ref = _losses(workdir), _losses(reference)
    assert sorted(ours) == list(range(1, TOTAL + 1))
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    _check_complete_run(workdir)


def _complete_reference_run(n: int, strategy, tmp_path):
    """An uninterrupted n-process run in tmp_path/ref (checked complete); returns its work dir."""
    reference = tmp_path / "ref"
    _finish(_launch(n, reference / "run", reference / "data", *strategy))
    _check_complete_run(reference / "run")
    return reference / "run"


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    """An uninterrupted 2-process FSDP run (the data set is made by process 0 during the run)."""
    tmp = tmp_path_factory.mktemp("fsdp_ref")
    outs = _finish(_launch(2, tmp / "run", tmp / "data", *FSDP))
    return tmp / "run", outs


@pytest.mark.slow  # a 2-process run: ~8 min on a 2-core machine (each process compiles every program)
def test_two_process_fsdp_run_samples_and_evaluates(fsdp_reference):
    workdir, outs = fsdp_reference
    _check_complete_run(workdir)
    assert _steps(workdir)[-1] == TOTAL
    assert all("finished at step 8" in out for out in outs)
    for out in outs:  # the eval loss and the sampler are compiled once per run, not at each of the 4 uses
        assert out.count("compiled the eval loss program") == 1 and out.count("compiled the sample grid program") == 1
        assert len(re.findall(r"Compiling jit\(loss_of\)", out)) <= 1, re.findall(r".*Compiling jit\(loss_of.*", out)


@pytest.mark.slow  # two more 2-process launches: ~4 min on an idle 2-core machine
def test_two_process_fsdp_sigterm_to_one_process_then_resume(fsdp_reference, tmp_path):
    _preempt_and_resume(2, FSDP, tmp_path, fsdp_reference[0])


@pytest.mark.slow
def test_two_process_dp_sigterm_then_resume(tmp_path):
    _preempt_and_resume(2, DP, tmp_path, _complete_reference_run(2, DP, tmp_path))


@pytest.mark.slow
def test_four_process_fsdp_sigterm_then_resume(tmp_path):
    _preempt_and_resume(4, FSDP, tmp_path, _complete_reference_run(4, FSDP, tmp_path))

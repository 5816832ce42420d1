"""benchmarks/tpu_aot.py: AOT compilation for a real TPU topology with libtpu, on a machine without a TPU.

The compile tests run the script as users do (a subprocess: libtpu must be configured before jax starts) on a
tiny model for `v5e:2x2`; they take minutes on 2 shared cores, hence `slow`. They skip, with the reason, when
libtpu cannot be installed (no network and no wheel). The flag and message-parsing tests are fast.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import tpu_aot

REPO = tpu_aot.REPO
SCRIPT = os.path.join(REPO, "benchmarks", "tpu_aot.py")
GIB = 2**30


def run_script(*flags: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile for real, never a cached executable
    env.pop("XLA_FLAGS", None)  # the CPU-device count of conftest is not for a TPU compile
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@pytest.fixture(scope="module")
def libtpu():
    try:
        return tpu_aot.libtpu_path(install=True)
    except tpu_aot.UserError as e:
        pytest.skip(f"libtpu unavailable: {e}")


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_chip_gib(stdout: str) -> tuple[float, float, float]:
    m = re.search(r"per chip: args ([\d.]+) GiB\s+temp ([\d.]+) GiB\s+total ([\d.]+) GiB", stdout)
    assert m, stdout
    return tuple(float(x) for x in m.groups())


@pytest.mark.slow
def test_tiny_train_step_compiles_for_v5e_with_splash(libtpu):
    """The shipped train step of the demo-size model, FSDP over 4 v5e chips, splash attention forced (the
    64² demo model's 256-token level would pick xla under auto): the Pallas kernel must lower for TPU inside
    the sharded step, and the chip's memory plan must be positive, consistent and far below 16 GiB."""
    proc = run_script("--topology", "v5e:2x2", "--model", "tiny", "--per_device_batch", "2", "--attention", "splash")
    result = result_of(proc)
    assert result["benchmark"] == "tpu_aot_train" and result["unit"] == "bytes"
    assert result["anchor"] == 16 * GIB and "v5e" in result["anchor_name"]
    args, temp, total = per_chip_gib(proc.stdout)
    assert args > 0 and temp > 0 and total == pytest.approx(args + temp, abs=0.011)
    assert 0 < result["ours"] < 1 * GIB  # a 64² demo model: megabytes, not gigabytes
    assert result["speedup"] == pytest.approx(result["anchor"] / result["ours"], rel=1e-3)
    flops = float(re.search(r"FLOPs per chip-step: ([\d.e+]+)", proc.stdout).group(1))
    assert flops > 1e6
    assert "4 × TPU v5 lite" in proc.stdout


@pytest.mark.slow
def test_tiny_sampler_compiles_for_v5e(libtpu):
    """The sampling program (encode, CLIP, PLMS with CFG, decode) compiles for TPU; 2 steps keep it short."""
    proc = run_script("--topology", "v5e:2x2", "--model", "tiny", "--program", "sample", "--per_device_batch", "1",
                      "--steps", "2")
    result = result_of(proc)
    assert result["benchmark"] == "tpu_aot_sample" and 0 < result["ours"] < 1 * GIB
    args, temp, _ = per_chip_gib(proc.stdout)
    assert args > 0 and temp > 0


@pytest.mark.parametrize("flags, words", [
    (["--topology", "v5x"], "--topology"),
    (["--attention", "flash"], "--attention"),
    (["--dtype", "fp8"], "--dtype"),
    (["--per_device_batch", "0"], "--per_device_batch"),
    (["--strategy", "tp"], "--strategy"),
    (["--program", "eval"], "--program"),
    (["--resolution", "500"], "--resolution"),
])
def test_bad_flag_values_give_one_line_errors(flags, words):
    proc = run_script(*flags, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_oom_message_parsing():
    """The bytes needed, from the two forms of the TPU compiler's out-of-memory message."""
    used = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 23.18G of 15.75G hbm. Exceeded by 7.43G."
    assert tpu_aot.parse_oom_bytes(used) == int(23.18 * GIB)
    temps = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. CompileTimeHbmOom: HLO temporaries (21.63G) "
             "exceeds available HBM (15.75G)")
    assert tpu_aot.parse_oom_bytes(temps) == int(21.63 * GIB)
    assert tpu_aot.parse_oom_bytes("RESOURCE_EXHAUSTED: something else") is None

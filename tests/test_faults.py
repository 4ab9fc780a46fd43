"""Faults and bad input: run folders, checkpoints, caches and configs never fail silently and never lose work.

Concurrency and crashes use real processes (subprocess, SIGKILL) on the real Sprites data.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsvae_lib as dsae

ROOT = dsae.ROOT
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PRELUDE = "import io, os, signal, sys, time\nfrom pathlib import Path\nimport torch\ntorch.set_num_threads(1)\n" \
          "import dsvae_lib as dsae\n"
WALL = ("seconds", "seq_per_s")  # wall-time fields of a history row


def spawn(code, *args, env=None):
    """A real Python process running `code` (after PRELUDE) with sys.argv[1:] = args."""
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
                            env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "dsvae_lib.py"), *map(str, args)], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def wait_for(path, proc, timeout=120):
    """Wait until `path` exists while `proc` is alive."""
    t0 = time.time()
    while not Path(path).exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def smoke(tmp_path, name, **overrides):
    return dsae.make_config("smoke", run_dir=str(tmp_path / name), **{"train_limit": 25, **overrides})


def without_wall_time(history):
    return [{k: v for k, v in row.items() if k not in WALL} for row in history]


# ----------------------------------------------------------------------------- 7. config validation
@pytest.mark.parametrize("field, value, allowed", [
    ("epochs", -1, "integer >= 1"), ("batch_size", 0, "integer >= 1"), ("train_limit", 0, "integer >= 1"),
    ("epochs", "abc", "integer >= 1"), ("lr", -1, "> 0"), ("lr", float("nan"), "> 0"), ("epochs", 2.5, "integer"),
    ("bf16", "maybe", "true or false"), ("betas", (0.9,), "two numbers"), ("device", "gpu", "cuda"),
    ("q_z", "lstm", "'factorised' or 'full'")])
def test_bad_config_value_is_one_clear_error(field, value, allowed):
    with pytest.raises(ValueError) as err:
        dsae.make_config("smoke", **{field: value})
    msg = str(err.value)
    assert f"{field} must be" in msg and repr(value) in msg and allowed in msg, msg


def test_config_values_are_coerced_and_the_command_line_writes_nothing_when_bad(tmp_path):
    config = dsae.make_config("smoke", epochs="3", lr="1e-3", train_limit=50.0, run_dir=tmp_path / "r")
    assert (config.epochs, config.lr, config.train_limit, config.run_dir) == (3, 1e-3, 50, str(tmp_path / "r"))
    assert type(config.epochs) is int and type(config.lr) is float
    for bad in ("epochs=-1", "batch_size=0", "train_limit=0", "epochs=abc", "lr=-1"):
        run = tmp_path / bad.replace("=", "_")
        out = cli("train", "--profile", "smoke", "--set", f"run_dir={run}", bad)
        assert out.returncode != 0 and bad.split("=")[0] in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not run.exists()


# ----------------------------------------------------------------------------- 10. sheet sizes
def test_sheet_of_the_wrong_size_is_refused_without_checksums(tmp_path, copy_sheets):
    sheets = copy_sheets(tmp_path / "sheets")
    Image.new("RGBA", (100, 100), (255, 0, 0, 255)).save(sheets / "topwear/2.png")
    cache = tmp_path / "cache"
    with pytest.raises(dsae.SheetError) as err:
        dsae.load_sprites("test", sheets=sheets, cache=cache, verify=False)
    msg = str(err.value)
    assert str(sheets / "topwear/2.png") in msg and "100x100" in msg and "832x1344" in msg
    assert not cache.exists() or not any(cache.iterdir())


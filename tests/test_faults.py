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


# ----------------------------------------------------------------------------- 4. damaged cache
def private_copy(cache_folder, dest_cache, copy=("test_frames.npy",)):
    """A cache holding the session cache's files: hard links, except real copies of `copy` (to damage)."""
    folder = dest_cache / cache_folder.name
    folder.mkdir(parents=True)
    for p in cache_folder.iterdir():
        (shutil.copyfile if p.name in copy else os.link)(p, folder / p.name)
    return folder


def test_damaged_cache_is_reported_with_path_and_fix(tmp_path, sheets_dir, cache_folder):
    """Truncated frames: loading and `data` fail naming the file and the fix; frames zeroed in place: `data
    --verify` fails naming the file; an intact cache verifies."""
    cache = tmp_path / "cache"
    folder = private_copy(cache_folder, cache)
    env = {"DSVAE_SHEETS": str(sheets_dir), "DSVAE_CACHE": str(cache)}
    frames = folder / "test_frames.npy"
    t0 = time.perf_counter()
    assert len(dsae.load_sprites("test", sheets=sheets_dir, cache=cache)) == 2664
    print(f"load with checks: {time.perf_counter() - t0:.3f} s")

    with open(frames, "r+b") as f:
        f.truncate(frames.stat().st_size - 4096)
    with pytest.raises(dsae.CacheError) as err:
        dsae.load_sprites("test", sheets=sheets_dir, cache=cache)
    msg = str(err.value)
    assert str(frames) in msg and str(folder) in msg and "dsvae_lib.py data" in msg
    data = cli("data", env=env)
    assert data.returncode != 0 and str(frames) in data.stderr, data.stderr

    shutil.copyfile(cache_folder / "test_frames.npy", frames)
    zeroed = np.load(frames, mmap_mode="r+")
    zeroed[1000] = 0  # one sequence blanked in place, size unchanged
    zeroed.flush()
    del zeroed
    verify = cli("data", "--verify", env=env)
    assert verify.returncode != 0 and str(frames) in verify.stderr and "checksum" in verify.stderr, verify.stderr

    shutil.copyfile(cache_folder / "test_frames.npy", frames)
    t0 = time.perf_counter()
    dsae.verify_cache(folder)
    print(f"full verification: {time.perf_counter() - t0:.2f} s")
    assert cli("data", "--verify", env=env).returncode == 0


# ----------------------------------------------------------------------------- 5. concurrent builders
BUILD = """
sheets, cache = sys.argv[1], sys.argv[2]
dsae.build_cache(sheets=sheets, cache=cache)
"""
READ = """
import json
sheets, cache, name, stop = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
final = cache / name
while not (final / "manifest.json").exists():
    time.sleep(0.01)
first, loads, errors = (final.stat().st_ino, (final / "train_frames.npy").stat().st_ino), 0, []
while not stop.exists() or loads < 3:
    try:
        data = dsae.load_sprites("test", sheets=sheets, cache=cache)
        assert data.frames[-1].any()
        loads += 1
        time.sleep(0.02)
    except Exception as e:
        errors.append(repr(e))
last = (final.stat().st_ino, (final / "train_frames.npy").stat().st_ino)
print(json.dumps({"loads": loads, "errors": errors[:3], "same": first == last}))
"""


def test_racing_builders_never_remove_a_finished_cache(tmp_path, sheets_dir, cache_folder):
    """Two builders race into an empty cache while a third process loads in a loop: the first complete build
    stays in place (same inodes), the reader never fails, no temporary build is left."""
    cache, stop = tmp_path / "cache", tmp_path / "stop"
    builders = [spawn(BUILD, sheets_dir, cache) for _ in range(2)]
    reader = spawn(READ, sheets_dir, cache, cache_folder.name, stop)
    for b in builders:
        _, err = b.communicate(timeout=600)
        assert b.returncode == 0, err
    stop.touch()
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["errors"] == [] and seen["loads"] >= 3 and seen["same"], seen
    assert sorted(p.name for p in cache.iterdir()) == [cache_folder.name]


# ----------------------------------------------------------------------------- 6. stale temporary builds
def test_stale_temporary_build_of_a_killed_builder_is_cleaned(tmp_path, copy_sheets, sheets_dir, cache_dir,
                                                               cache_folder):
    """A builder killed -9 leaves its temporary folder; the next build_cache in that cache removes it, but
    never the folder of a live builder."""
    sheets = copy_sheets(tmp_path / "sheets")
    img = Image.open(sheets / "hair/1.png").convert("RGBA")
    img.putpixel((0, 0), (1, 2, 3, 255))  # another key: a real build into the shared session cache
    img.save(sheets / "hair/1.png")
    before = {p.name for p in cache_dir.iterdir()}
    builder = spawn("dsae.build_cache(sheets=sys.argv[1], cache=sys.argv[2], verify=False)", sheets, cache_dir)
    t0 = time.time()
    while not [p for p in cache_dir.glob(".building-*") if (p / "train_frames.npy").exists()]:
        assert builder.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    builder.kill()
    builder.wait()
    stale = [p for p in cache_dir.glob(".building-*")]
    assert stale
    live = cache_dir / f".building-{socket.gethostname()}-{os.getpid()}-live"  # this process: alive
    live.mkdir()
    try:
        assert dsae.build_cache(sheets=sheets_dir, cache=cache_dir) == cache_folder
        assert not [p for p in stale if p.exists()]
        assert live.is_dir()
    finally:
        shutil.rmtree(live, ignore_errors=True)
    assert {p.name for p in cache_dir.iterdir()} == before


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


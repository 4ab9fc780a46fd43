"""Faults and bad input: run folders, checkpoints, caches and configs never fail silently and never lose work.

Concurrency and crashes use real processes (subprocess, SIGKILL) on the real Sprites data.
"""
import contextlib
import json
import os
import random
import shlex
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


def wait_for(path, proc, timeout=300):
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


# ----------------------------------------------------------------------------- 1. one training per run folder
HELD = """
run, started = sys.argv[1], Path(sys.argv[2])
step = dsae.train_step
def held(*args, **kwargs):  # hold the run folder: signal, then wait (to be killed)
    started.touch()
    time.sleep(600)
dsae.train_step = held
dsae.train(dsae.make_config("smoke", run_dir=run, epochs=1, train_limit=25), progress=False)
"""


def test_second_training_on_a_run_folder_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    """While a training holds a run folder, a second one (other lr) stops naming the holder's pid and writes
    nothing; once the holder is killed -9, the folder is free and ends up entirely from the second run."""
    run = tmp_path / "run"
    holder = spawn(HELD, run, tmp_path / "started")
    try:
        wait_for(tmp_path / "started", holder)
        config_before = (run / "config.json").read_text()
        second = cli("train", "--profile", "smoke", "--set", f"run_dir={run}", "lr=0.002", "epochs=1", "train_limit=25")
        assert second.returncode != 0
        assert f"pid {holder.pid}" in second.stderr and str(run) in second.stderr, second.stderr
        assert (run / "config.json").read_text() == config_before
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    again = cli("train", "--profile", "smoke", "--set", f"run_dir={run}", "lr=0.002", "epochs=1", "train_limit=25")
    assert again.returncode == 0, again.stderr
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert json.loads((run / "config.json").read_text())["lr"] == ckpt["config"]["lr"] == 0.002
    assert json.loads((run / "metrics.json").read_text()) == ckpt["history"] and ckpt["history"][0]["lr"] == 0.002


# ----------------------------------------------------------------------------- 2. the lr schedule on resume
def test_changing_epochs_of_a_cosine_run_is_refused_and_constant_runs_extend(tmp_path):
    cosine = smoke(tmp_path, "cosine", lr_schedule="cosine", epochs=2)
    _, history = dsae.train(cosine, progress=False)
    assert [row["lr"] for row in history] == pytest.approx([5e-4, 0.0], abs=1e-12)
    good = (tmp_path / "cosine" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError) as err:
        dsae.train(smoke(tmp_path, "cosine", lr_schedule="cosine", epochs=4), progress=False)
    msg = str(err.value)
    assert "cosine" in msg and "epochs=2" in msg and "epochs=4" in msg and "run_dir" in msg
    assert (tmp_path / "cosine" / "checkpoint.pt").read_bytes() == good

    dsae.train(smoke(tmp_path, "constant", epochs=1), progress=False)
    _, extended = dsae.train(smoke(tmp_path, "constant", epochs=3), progress=False)
    assert [row["epoch"] for row in extended] == [1, 2, 3] and [row["lr"] for row in extended] == [1e-3] * 3


# ----------------------------------------------------------------------------- 3. evaluation labels
def test_checkpoint_in_the_folder_of_another_profile_or_q_is_refused(tmp_path, monkeypatch):
    """A `cpu`/factorised checkpoint placed in runs/smoke-full/ is an error naming both, before any judge
    is trained or metrics written."""
    monkeypatch.setattr(dsae, "ROOT", tmp_path)
    monkeypatch.setattr(dsae, "train_judge", lambda *a, **k: pytest.fail("judge trained before the runs were checked"))
    config = dsae.make_config("cpu")
    misplaced = dsae.make_config("smoke", q_z="full").path / "checkpoint.pt"
    misplaced.parent.mkdir(parents=True)
    dsae._atomic_save({"config": config.__dict__, "model": dsae.build_model(config, "cpu").state_dict(),
                       "epoch": 1, "history": [{"epoch": 1, "seconds": 1.0}]}, misplaced)
    out = tmp_path / "metrics.json"
    with pytest.raises(ValueError) as err:
        dsae.evaluate_profile("smoke", out=out, progress=False)
    msg = str(err.value)
    assert str(misplaced) in msg and "'cpu'" in msg and "'factorised'" in msg and "'full'" in msg
    assert not out.exists()


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
    shutil.rmtree(cache)


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
    try:
        for b in builders:
            _, err = b.communicate(timeout=600)
            assert b.returncode == 0, err
        stop.touch()
        out, err = reader.communicate(timeout=300)
        assert reader.returncode == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen["errors"] == [] and seen["loads"] >= 3 and seen["same"], seen
        assert sorted(p.name for p in cache.iterdir()) == [cache_folder.name]
    finally:
        for proc in (*builders, reader):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(cache, ignore_errors=True)  # 1.2 GB


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
        assert builder.poll() is None and time.time() - t0 < 300
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
    ("q_z", "lstm", "'factorised' or 'full'"), ("epochs", 1e9, "integer >= 1 and <= 10000"),
    ("batch_size", 10 ** 6, "<= 9000"), ("eval_limit", 5000, "<= 2664"), ("run_dir", "", "a non-empty path")])
def test_bad_config_value_is_one_clear_error(field, value, allowed):
    with pytest.raises(ValueError) as err:
        dsae.make_config("smoke", **{field: value})
    msg = str(err.value)
    assert f"{field} must be" in msg and repr(value) in msg and allowed in msg, msg


def test_config_values_are_coerced_and_the_command_line_writes_nothing_when_bad(tmp_path):
    config = dsae.make_config("smoke", epochs="3", lr="1e-3", train_limit=50.0, run_dir=tmp_path / "r")
    assert (config.epochs, config.lr, config.train_limit, config.run_dir) == (3, 1e-3, 50, str(tmp_path / "r"))
    assert type(config.epochs) is int and type(config.lr) is float
    for bad in ("epochs=-1", "batch_size=0", "train_limit=0", "epochs=abc", "lr=-1", f"init={tmp_path}/none.pt",
                "epochs=1e9"):
        run = tmp_path / bad.replace("=", "_").replace("/", "_")
        out = cli("train", "--profile", "smoke", "--set", f"run_dir={run}", bad)
        assert out.returncode != 0 and bad.split("=")[0] in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert not run.exists()


# ----------------------------------------------------------------------------- 8. non-finite loss
def test_non_finite_loss_messages_are_true_and_their_advice_works(tmp_path, monkeypatch):
    with pytest.raises(FloatingPointError) as err:  # a fresh run that diverges at once
        dsae.train(smoke(tmp_path, "fresh", lr=1e9, train_limit=50), progress=False)
    msg = str(err.value)
    assert "no checkpoint" in msg and "still holds" not in msg
    assert not (tmp_path / "fresh" / "checkpoint.pt").exists()
    _, history = dsae.train(smoke(tmp_path, "fresh", train_limit=50), progress=False)  # the advice: lower lr, rerun
    assert len(history) == 2

    dsae.train(smoke(tmp_path, "late", epochs=1), progress=False)
    elbo = dsae.elbo_terms
    monkeypatch.setattr(dsae, "elbo_terms", lambda m, x, p=None: {**elbo(m, x, p), "loss": torch.tensor(float("inf"))})
    with pytest.raises(FloatingPointError) as err:
        dsae.train(smoke(tmp_path, "late", epochs=2), progress=False)
    msg = str(err.value)
    assert "last good epoch (1)" in msg and "change_lr=True" in msg and "--change-lr" in msg
    monkeypatch.setattr(dsae, "elbo_terms", elbo)
    with pytest.raises(ValueError, match="change_lr=True"):  # a lower lr alone is a different configuration
        dsae.train(smoke(tmp_path, "late", epochs=2, lr=5e-4), progress=False)
    _, history = dsae.train(smoke(tmp_path, "late", epochs=2, lr=5e-4), progress=False, change_lr=True)
    assert [row["lr"] for row in history] == [1e-3, 5e-4]
    ckpt = torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=False)
    assert ckpt["lr_changes"] == [{"epoch": 1, "from": 1e-3, "to": 5e-4}] and ckpt["config"]["lr"] == 5e-4


# ----------------------------------------------------------------------------- 9. unreadable checkpoint
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_checkpoint_names_the_file_and_the_fix(tmp_path, damage):
    config = smoke(tmp_path, "run", epochs=1)
    dsae.train(config, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2] if damage == "truncated" else b"")
    for call in (lambda: dsae.train(config, progress=False), lambda: dsae.load_checkpoint(path)):
        with pytest.raises(dsae.CheckpointError) as err:
            call()
        assert str(path) in str(err.value) and "delete it" in str(err.value)
    path.unlink()  # the advice
    assert len(dsae.train(config, progress=False)[1]) == 1


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


# ----------------------------------------------------------------------------- kill -9 anywhere, then resume
KILLABLE = """
run, point = sys.argv[1], sys.argv[2]
kind, _, n = point.partition(":")
calls = [0]
def die_at_call():
    calls[0] += 1
    if calls[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
if kind == "step":  # before the n-th train step of this process
    step = dsae.train_step
    def killing_step(*args, **kwargs):
        die_at_call()
        return step(*args, **kwargs)
    dsae.train_step = killing_step
elif kind == "save":  # half-way through writing the n-th checkpoint of this process
    save = torch.save
    def killing_save(obj, f, *args, **kwargs):  # f: a path, or the open temporary file of an atomic write
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        out.flush()
        die_at_call()
        out.write(buf.getvalue()[len(buf.getvalue()) // 2:])
        if out is not f:
            out.close()
    torch.save = killing_save
elif kind == "metrics":  # after the n-th checkpoint is in place, before its metrics.json
    write = dsae._atomic_write_text
    def killing_write(path, text):
        if Path(path).name == "metrics.json":
            die_at_call()
        write(path, text)
    dsae._atomic_write_text = killing_write
model, history = dsae.train(dsae.make_config("smoke", run_dir=run, epochs=2, train_limit=50), progress=False)
torch.save({"model": model.state_dict(), "history": history}, Path(run) / "final.pt")
"""


def test_kill_9_at_any_point_then_resume_gives_identical_weights_and_history(tmp_path):
    """SIGKILL during epochs, during checkpoint writes, between checkpoint and metrics and at a random moment;
    each rerun resumes; the end equals an uninterrupted run bit for bit (wall times aside)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed processes: the same float reductions
    try:
        model, history = dsae.train(dsae.make_config("smoke", run_dir=str(tmp_path / "reference"), epochs=2,
                                                     train_limit=50), progress=False)
    finally:
        torch.set_num_threads(threads)
    expected = {"model": model.state_dict(), "history": history}

    run = tmp_path / "killed"
    rng = random.Random(11)
    # 2 steps per epoch: mid epoch 1; writing its checkpoint; between it and metrics.json; mid epoch 2; anywhere;
    # after the last checkpoint (or, if the random kill came late, in the resume of the finished run); to the end
    for point in ("step:2", "save:1", "metrics:1", "step:2", "random", "metrics:1", "none"):
        proc = spawn(KILLABLE, run, point)
        if point == "random":  # a real external kill at a random moment (import, data, an epoch or a write)
            time.sleep(rng.uniform(1.0, 4.0))
            proc.kill()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == (0 if point == "none" else -signal.SIGKILL) or point == "random", (point, err)
    got = torch.load(run / "final.pt", weights_only=False)
    assert got["model"].keys() == expected["model"].keys()
    for k, v in expected["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert len(got["history"]) == 2
    assert without_wall_time(got["history"]) == without_wall_time(expected["history"])
    assert without_wall_time(json.loads((run / "metrics.json").read_text())) == without_wall_time(got["history"])
    assert sorted(p.name for p in run.iterdir() if p.name != "final.pt") == \
           sorted(p.name for p in (tmp_path / "reference").iterdir())  # no temporary file left


# ============================================================================= faults, round two
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A finished 1-epoch smoke run (its folder), trained once for the tests below; copy it before changing it."""
    base = tmp_path_factory.mktemp("smoke-run")
    dsae.train(smoke(base, "run", epochs=1), progress=False)
    return base / "run"


def module_copy(tmp_path):
    """dsvae_lib.py alone in tmp_path/repo: ROOT is there, with no ../shared/sprites-lpc, data/ or runs/ beside it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(ROOT / "dsvae_lib.py", repo / "dsvae_lib.py")
    return repo / "dsvae_lib.py"


@contextlib.contextmanager
def tmpfs(path, options):
    """A real tmpfs mounted at `path` (root only; the test is skipped where the kernel refuses)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}): a full or read-only file system needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# ----------------------------------------------------------------------------- 1. the report's copy-back
COPY_BACK = """
import dataclasses, json, shutil
import papermill as pm
root, point = Path(sys.argv[1]), sys.argv[2]
dsae.PROFILES["smoke"] = dataclasses.replace(dsae.PROFILES["smoke"], figures=str(root / "figures"))
def run_notebook(src, dest, **kwargs):  # a notebook's run, without a kernel: its output and a figure
    nb = json.loads(Path(src).read_text())
    nb["cells"][-1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["new\\n"]}]
    Path(dest).write_text(json.dumps(nb))
    dsae.atomic_write(Path(os.environ["DSVAE_FIGURES"]) / f"{Path(src).stem}.png", b"new" * 4096)
pm.execute_notebook = run_notebook
dsae._export_html = lambda notebook, folder: None  # not what is tested
kind, _, n = point.partition(":")
calls = [0]
def dies(dst):  # the n-th write (copy or rename) into the repository's notebooks or figures
    calls[0] += Path(dst).parent in (root / "notebooks", root / "figures")
    return calls[0] == int(n)
copyfile, replace = shutil.copyfile, os.replace
def killing_copyfile(src, dst, **kwargs):  # killed half-way through the copy
    if kind == "copy" and dies(dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        os.kill(os.getpid(), signal.SIGKILL)
    return copyfile(src, dst, **kwargs)
def killing_replace(src, dst):  # killed before the rename
    if kind == "replace" and dies(dst):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)
shutil.copyfile, os.replace = killing_copyfile, killing_replace
dsae.run_report("smoke", record=True, notebooks=sorted((root / "notebooks").glob("*.ipynb")), out=root / "reports",
                progress=False)
"""


@pytest.mark.parametrize("point", ["copy:2", "replace:2"])
def test_a_kill_during_the_copy_back_leaves_every_file_whole_and_all_or_none_replaced(tmp_path, point):
    """`report --record` killed -9 inside the copy-back (half-way through copying the 2nd file, or before renaming
    it): every notebook is still valid JSON, and once the next report has started (finish_copy_back) either every
    notebook and figure is the new one or every one is the old one, with no temporary file left."""
    import nbformat
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    old = {}
    for name in ("01_a", "02_b"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("profile = None",
                                                                       metadata={"tags": ["parameters"]}),
                                             nbformat.v4.new_code_cell("print('new')")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, root / "notebooks" / f"{name}.ipynb")
        dsae.atomic_write(root / "figures" / f"{name}.png", b"old")
        old |= {p: p.read_bytes() for p in (root / "notebooks" / f"{name}.ipynb", root / "figures" / f"{name}.png")}
    proc = spawn(COPY_BACK, root, point)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    for path in old:
        if path.suffix == ".ipynb":
            json.loads(path.read_text())  # never half-written
    dsae.finish_copy_back(root / "reports" / dsae.COPY_BACK)  # what the next report does first
    new = {p: (root / "reports" / p.relative_to(root / "notebooks") if p.suffix == ".ipynb" else
               root / "reports" / "figures" / p.name).read_bytes() for p in old}
    replaced = {p.name: p.read_bytes() == new[p] for p in old}
    kept = {p.name: p.read_bytes() == old[p] for p in old}
    assert all(replaced.values()) or all(kept.values()), (replaced, kept)
    assert all(replaced.values()) == (point == "replace:2")  # killed after the commit: completed
    assert sorted(p.name for p in (root / "notebooks").iterdir()) == ["01_a.ipynb", "02_b.ipynb"]
    assert sorted(p.name for p in (root / "figures").iterdir()) == ["01_a.png", "02_b.png"]
    assert not (root / "reports" / dsae.COPY_BACK).exists()


EXPORT = """
out, checkpoint = sys.argv[1], sys.argv[2]
save = torch.save
def killing_save(obj, f, *args, **kwargs):  # half the weights file written, then killed
    buf = io.BytesIO()
    save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killing_save
dsae.export_weights(checkpoint, out)
"""


def test_the_next_export_removes_what_a_killed_export_left(tmp_path, smoke_run):
    out = tmp_path / "weights" / "smoke-factorised.pt"
    killed = spawn(EXPORT, out, smoke_run / "checkpoint.pt")
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err
    assert list(out.parent.glob(f".{out.name}.*.part")) and not out.exists()
    dsae.export_weights(smoke_run / "checkpoint.pt", out)
    assert not list(out.parent.glob("*.part")) and dsae.load_checkpoint(out)[1]["epoch"] == 1


# ----------------------------------------------------------------------------- 2. weights of another architecture
def test_weights_of_another_architecture_name_the_file_the_fields_and_the_fix(tmp_path, smoke_run, monkeypatch,
                                                                             capsys):
    """A weights file whose config describes another architecture than its state: load_checkpoint and `evaluate`
    (before any judge) name the file, each differing field with both values, and the fix."""
    path = dsae.export_weights(smoke_run / "checkpoint.pt", tmp_path / "smoke-factorised.pt")
    weights = torch.load(path, weights_only=False)
    torch.save({**weights, "config": {**weights["config"], "f_dim": 32, "channels": 16, "q_z": "full"}}, path)
    with pytest.raises(dsae.CheckpointError) as err:
        dsae.load_checkpoint(path)
    msg = str(err.value)
    for part in (str(path), "f_dim=16 in its model state, 32 in its config", "channels=8 in its model state, 16",
                 "q_z='factorised' in its model state, 'full'", "python dsvae_lib.py export"):
        assert part in msg, msg
    assert "z_dim" not in msg and "size mismatch" not in msg
    monkeypatch.setattr(dsae, "train_judge", lambda *a, **k: pytest.fail("judge trained before the file was read"))
    with pytest.raises(SystemExit) as exit_:
        dsae.main(["evaluate", str(path), "--profile", "smoke", "--out", str(tmp_path / "evaluations.json")])
    printed = capsys.readouterr().err
    assert exit_.value.code == 1 and str(path) in printed and "f_dim=16" in printed, printed
    assert not (tmp_path / "evaluations.json").exists()


# ----------------------------------------------------------------------------- 3. config fields of other versions
def test_a_config_field_this_version_lacks_is_named_and_a_retired_default_loads(tmp_path, smoke_run, monkeypatch):
    monkeypatch.setitem(dsae.RETIRED, "old_flag", (False, "abc1234"))
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    path = run / "checkpoint.pt"
    saved = torch.load(path, weights_only=False)
    config = smoke(tmp_path, "run", epochs=2)
    for extra, expected in (({"old_flag": True}, ["old_flag=True", "only its default, False, loads",
                                                  "run it from commit abc1234 (git worktree add ../old abc1234)"]),
                            ({"new_flag": 3}, ["new_flag=3", "written by another version of dsvae_lib"])):
        dsae._atomic_save({**saved, "config": {**saved["config"], **extra}}, path)
        for call in (lambda: dsae.load_checkpoint(path), lambda: dsae.train(config, progress=False),
                     lambda: dsae.export_weights(path, tmp_path / "w.pt")):
            with pytest.raises(dsae.CheckpointError) as err:
                call()
            assert str(path) in str(err.value) and all(e in str(err.value) for e in expected), str(err.value)
    dsae._atomic_save({**saved, "config": {**saved["config"], "old_flag": False}}, path)  # retired, at its default
    assert dsae.load_checkpoint(path)[1]["epoch"] == 1
    assert [row["epoch"] for row in dsae.train(config, progress=False)[1]] == [1, 2]  # resumes


# ----------------------------------------------------------------------------- 4. no sheets, no network
def test_no_sheets_and_no_network_say_where_sheets_are_looked_for_and_leave_nothing(tmp_path):
    module = module_copy(tmp_path)
    proxy = "http://127.0.0.1:9"  # nothing listens there: every download fails, as offline
    env = {**ENV, "DSVAE_SHEETS": "", "XDG_CACHE_HOME": str(tmp_path / "user-cache"), "DSVAE_CACHE":
           str(tmp_path / "cache"), "https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}
    out = subprocess.run([sys.executable, str(module), "data"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    for part in ("`sheets=`", "$DSVAE_SHEETS", str(tmp_path / "shared" / "sprites-lpc"),
                 dsae.SPRITES_URL.format(path=""), f"https://github.com/{dsae.SPRITES_REPO}", dsae.SPRITES_COMMIT[:7]):
        assert part in out.stderr, out.stderr
    assert not (tmp_path / "user-cache").exists() and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- 5. disk full
def test_a_full_disk_while_saving_a_checkpoint_is_one_error_and_keeps_the_last_one(tmp_path, smoke_run):
    """A real tmpfs with room for one checkpoint, not two: epoch 2's atomic write fails; one error names the
    folder and says no space is left; epoch 1's checkpoint stays, with no temporary file beside it."""
    size = (smoke_run / "checkpoint.pt").stat().st_size * 3 // 2 // 1024
    with tmpfs(tmp_path / "disk", f"size={size}k") as disk:
        run = disk / "run"
        out = cli("train", "--profile", "smoke", "--set", f"run_dir={run}", "epochs=2", "train_limit=25")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot write in {run}: no space left on device"), line
        assert f"{run / 'checkpoint.pt'} keeps the last complete epoch, 1 of 2" in line, line
        assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
        assert not list(run.glob(".*.part"))


# ----------------------------------------------------------------------------- 6. read-only run folder
def test_a_read_only_run_folder_is_one_clear_error(tmp_path):
    with tmpfs(tmp_path / "ro", "size=1m") as ro:
        (ro / "run").mkdir()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if remount.returncode:
            pytest.skip(f"cannot remount read-only here ({remount.stderr.strip()})")
        out = cli("train", "--profile", "smoke", "--set", f"run_dir={ro / 'run'}", "epochs=1", "train_limit=25")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == f"error: cannot write in {ro / 'run'}: the file system is read-only; nothing was " \
                                 f"trained. Make it writable, or train into another run_dir (--set run_dir=...)."


# ----------------------------------------------------------------------------- 7. truncated sheet
def test_a_truncated_sheet_is_named_without_checksums(tmp_path, copy_sheets):
    sheets = copy_sheets(tmp_path / "sheets")
    sheet = sheets / "hair/3.png"
    sheet.write_bytes(sheet.read_bytes()[:sheet.stat().st_size // 2])  # its header (size) intact
    cache = tmp_path / "cache"
    with pytest.raises(dsae.SheetError) as err:
        dsae.load_sprites("test", sheets=sheets, cache=cache, verify=False)
    msg = str(err.value)
    assert str(sheet) in msg and "truncated" in msg and dsae.SPRITES_URL.format(path="hair/3.png") in msg, msg
    assert not cache.exists() or not any(cache.iterdir())


# ----------------------------------------------------------------------------- 8. invalid JSON files
def test_invalid_json_files_are_named_and_evaluate_checks_its_out_first(tmp_path, smoke_run, monkeypatch, capsys):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "metrics.json").write_text("{\n")
    readme = (ROOT / "README.md").read_bytes()
    out = cli("readme", "--profile", "cpu", env={"DSVAE_FIGURES": str(figures)})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"error: {figures / 'metrics.json'} is not valid JSON (Expecting property name" in out.stderr, out.stderr
    assert (ROOT / "README.md").read_bytes() == readme

    evaluations = tmp_path / "evaluations.json"
    evaluations.write_text('{"runs": \n')
    monkeypatch.setattr(dsae, "train_judge", lambda *a, **k: pytest.fail("judge trained before --out was checked"))
    monkeypatch.setattr(dsae, "load_checkpoint", lambda *a, **k: pytest.fail("run read before --out was checked"))
    with pytest.raises(SystemExit) as exit_:
        dsae.main(["evaluate", str(smoke_run), "--profile", "smoke", "--out", str(evaluations)])
    printed = capsys.readouterr().err
    assert exit_.value.code == 1 and f"error: {evaluations} is not valid JSON" in printed, printed
    assert "--out" in printed and evaluations.read_text() == '{"runs": \n'


# ----------------------------------------------------------------------------- 9. notebook parameters
def test_a_bad_notebook_parameter_stops_the_notebook_at_once_naming_it(tmp_path):
    """papermill -p seeds abc on notebook 04 fails in the first cell after the parameters, before the judge or any
    data is loaded, naming the parameter."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "papermill", str(dsae.NOTEBOOKS / "04_evaluation.ipynb"),
                          str(tmp_path / "04.ipynb"), "-p", "profile", "smoke", "-p", "seeds", "abc",
                          "--cwd", str(dsae.NOTEBOOKS)], env=ENV, capture_output=True, text=True, timeout=300)
    print(f"papermill failed after {time.perf_counter() - t0:.1f} s")
    assert run.returncode != 0
    code = [c for c in json.loads((tmp_path / "04.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    errors = [(i, o) for i, c in enumerate(code) for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert [i for i, _ in errors] == [2], errors  # parameters, papermill's injected cell, then the first cell
    assert errors[0][1]["ename"] == "ValueError" and "seeds must be a non-empty list of integers >= 0" in \
        errors[0][1]["evalue"] and "'abc'" in errors[0][1]["evalue"]


@pytest.mark.parametrize("name, value, allowed", [
    ("seeds", "abc", "a non-empty list of integers >= 0"), ("seeds", [], "non-empty"), ("seeds", [0, -1], ">= 0"),
    ("seeds", 3, "list"), ("q_z", "lstm", "'factorised' or 'full'"), ("profile", "bogus", "one of"),
    ("weights", "yes", "True or False"), ("overrides", "{epochs: 1}", "JSON object"),
    ("embedding_method", "umap", "'pca' or 'tsne'"), ("epochs", "1e9", "<= 10000")])
def test_notebook_parameters_are_checked_by_name(name, value, allowed):
    with pytest.raises(ValueError) as err:
        dsae.check_parameters(**{name: value})
    assert f"{name} must be" in str(err.value) and allowed in str(err.value) and repr(value) in str(err.value)
    dsae.check_parameters(profile=None, q_z="full", overrides='{"epochs": 1}', weights=False, seeds=(0, 1),
                          embedding_method="tsne", title="any parameter not known here")


# ----------------------------------------------------------------------------- 10. Ctrl-C
def test_ctrl_c_during_training_prints_one_line_saying_what_was_kept_and_how_to_resume(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--profile", "smoke", "--set", f"run_dir={run}", "epochs=200", "train_limit=25"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "dsvae_lib.py"), *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        wait_for(run / "checkpoint.pt", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    epoch = torch.load(run / "checkpoint.pt", weights_only=False)["epoch"]
    assert err.splitlines()[-1] == f"interrupted: {run / 'checkpoint.pt'} keeps the last complete epoch, {epoch} of " \
                                   f"200. To resume, run the same command again: python dsvae_lib.py " \
                                   f"{shlex.join(args)}", err



SWALLOWED = """
import os, signal, threading, time, weakref
import dsvae_lib

class Model:
    pass

def slow_callback(_):
    time.sleep(3)  # the Ctrl-C lands here, inside a weakref callback, where Python would print and drop it

t0 = time.time()
try:
    with dsvae_lib._ctrl_c_is_never_lost():
        model = Model()
        ref = weakref.ref(model, slow_callback)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        del model
        time.sleep(10)  # a blocking call, as a long kernel is
    print("went on")
except KeyboardInterrupt:
    print(f"stopped after {time.time() - t0:.1f} s")
"""


def test_a_ctrl_c_that_lands_in_a_callback_still_stops_training():
    out = subprocess.run([sys.executable, "-c", SWALLOWED], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's
    assert out.stdout.startswith("stopped after") and "Exception ignored" not in out.stderr, (out.stdout, out.stderr)
    assert float(out.stdout.split()[2]) < 3, out.stdout  # at once, not after the blocking call: 0.5 s + 50 ms

# ----------------------------------------------------------------------------- a user's slips
def test_an_empty_run_dir_is_refused_and_nothing_is_written(tmp_path, sheets_dir):
    with pytest.raises(ValueError, match="run_dir must be None or a non-empty path, not ''"):
        dsae.make_config("smoke", run_dir="")
    module = module_copy(tmp_path)  # its default run folder: tmp_path/repo/runs/smoke-factorised
    out = subprocess.run([sys.executable, str(module), "train", "--profile", "smoke", "--set", "run_dir=", "epochs=1",
                          "train_limit=25"], env={**ENV, "DSVAE_SHEETS": str(sheets_dir), "DSVAE_CACHE":
                                                  str((ROOT / "data").resolve())}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "run_dir must be None or a non-empty path" in out.stderr, out.stderr
    assert not (module.parent / "runs").exists()


# ----------------------------------------------------------------------------- evaluate while training
TRAINING = """
import json
run, sums = sys.argv[1], Path(sys.argv[2])
save = dsae._atomic_save
def noting_sums(obj, path):  # the SHA-256 of every checkpoint, by epoch
    save(obj, path)
    with open(sums, "a") as f:
        f.write(json.dumps([obj["epoch"], dsae.sha256(path)]) + "\\n")
    time.sleep(0.2)
dsae._atomic_save = noting_sums
dsae.train(dsae.make_config("smoke", run_dir=run, epochs=5000, train_limit=25), progress=False)
"""


def test_evaluate_reads_a_training_runs_last_complete_checkpoint_and_says_which_epoch(tmp_path, monkeypatch, capsys):
    """`evaluate` of a run that a real process is training, which writes another checkpoint while the evaluation
    runs: the record is of the one checkpoint read (its SHA-256 and its epoch agree) and the output says which
    epoch that was and that the run is still training."""
    run, sums = tmp_path / "run", tmp_path / "sums.jsonl"
    written = lambda: dict(json.loads(line) for line in sums.read_text().splitlines())  # noqa: E731
    evaluate_run, protocol = dsae.evaluate_run, dsae._judge_protocol

    def after_another_checkpoint(model, ckpt, *args, **kwargs):
        while max(written()) <= ckpt["epoch"]:
            time.sleep(0.05)
        return evaluate_run(model, ckpt, *args, **kwargs)
    monkeypatch.setattr(dsae, "evaluate_run", after_another_checkpoint)
    monkeypatch.setattr(dsae, "_judge_protocol", lambda *a, **k: (lambda judge, test, head: (  # 27 test sequences
        judge, test, {**head, "test sequences": 27}))(*protocol(*a, **k)))
    dsae.train_judge(dsae.judge_config("smoke"), progress=False)  # cached: the evaluation does not train it
    trainer = spawn(TRAINING, run, sums)
    try:
        wait_for(sums, trainer)
        dsae.main(["evaluate", str(run), "--profile", "smoke", "--seeds", "0", "--out", str(tmp_path / "e.json")])
        assert trainer.poll() is None  # still training
    finally:
        trainer.kill()
        trainer.wait()
    record = json.loads((tmp_path / "e.json").read_text())["runs"]["run"]
    epoch = record["epochs"]
    assert written()[epoch] == record["checkpoint sha256"] and max(written()) > epoch
    assert f"run: {run / 'checkpoint.pt'}, epoch {epoch} of 5000; its run is still training, so this is its last " \
           f"complete checkpoint" in capsys.readouterr().out

"""Shared fixtures: the real LPC sheets and one Sprites cache built once per test session in a temp folder."""
import os
import shutil
from pathlib import Path

import pytest

import dsvae_lib  # installed editable by `make venv` (pip install -e .)

ROOT = dsvae_lib.ROOT

# The real sheets: $DSVAE_SHEETS if set when the tests start, else the workplace's shared copy.
SHEETS = Path(os.environ.get("DSVAE_SHEETS") or ROOT.parent / "shared" / "sprites-lpc")


@pytest.fixture(scope="session")
def sheets_dir():
    """Folder of the real LPC sheets (must hold every sheet the protocol pins)."""
    missing = [rel for rel in dsvae_lib.SHEET_SHA256 if not (SHEETS / rel).is_file()]
    if missing:
        pytest.fail(f"real sprite sheets not found under {SHEETS} (missing {missing[:3]}...)")
    return SHEETS


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Session cache folder (never /work/main/data); removed at the end, as it holds ~1.2 GB."""
    folder = tmp_path_factory.mktemp("sprites-cache")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_folder(sheets_dir, cache_dir):
    """The cache built once from the real, verified sheets (~8 s)."""
    return dsvae_lib.build_cache(sheets=sheets_dir, cache=cache_dir, verify=True)


@pytest.fixture(scope="session")
def train(sheets_dir, cache_dir, cache_folder):
    return dsvae_lib.load_sprites("train", sheets=sheets_dir, cache=cache_dir)


@pytest.fixture(scope="session")
def test_split(sheets_dir, cache_dir, cache_folder):
    return dsvae_lib.load_sprites("test", sheets=sheets_dir, cache=cache_dir)


@pytest.fixture
def copy_sheets(sheets_dir):
    """copy_sheets(dest, skip=()) copies only the protocol's sheets (SHEET_SHA256) into dest."""
    def copy(dest, skip=()):
        for rel in dsvae_lib.SHEET_SHA256:
            if rel not in skip:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(sheets_dir / rel, dest / rel)
        return dest
    return copy


@pytest.fixture(scope="session")
def smoke_runs():
    """The smoke profile's runs of both q variants as notebook 03 trains them (runs/smoke-factorised, its default,
    and runs/smoke-full, which notebook 05 shows by default; `make test` removes them first), trained once per test
    session and shared, read-only, by every test that needs some trained model and by the notebooks that run after
    the tests: {q_z: (config, history)}."""
    configs = {q: dsvae_lib.make_config("smoke", q_z=q) for q in ("factorised", "full")}
    return {q: (config, dsvae_lib.train(config, progress=False)[1]) for q, config in configs.items()}


@pytest.fixture(scope="session")
def smoke_run(smoke_runs):
    """The smoke run of notebook 03's default q (runs/smoke-factorised): (config, history)."""
    return smoke_runs["factorised"]


@pytest.fixture(scope="session")
def smoke_metrics(smoke_runs):
    """The smoke profile's metrics.json of record (runs/smoke-figures), as notebook 04 writes it with its default
    sampling seeds (0, 1, 2), evaluated once per session (reused, spot-checked, when it already holds these runs):
    notebook 05 and the browser test read it, notebook 04 under nbval reuses it, and the cache tests start from a
    copy of its text, which is returned."""
    import json
    metrics = dsvae_lib.figures_dir("smoke") / "metrics.json"
    dsvae_lib.evaluate_profile("smoke", seeds=(0, 1, 2), progress=False)
    assert json.loads(metrics.read_text())["seeds"] == [0, 1, 2]
    return metrics.read_text()

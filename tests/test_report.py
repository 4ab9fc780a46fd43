"""The report contract: notebook parameters, profile precedence, clean committed notebooks, `make report`."""
import dataclasses
import json
import shutil

import nbformat
import papermill as pm
import pytest
import torch

import dsvae_lib as dsae

NOTEBOOKS = sorted(dsae.NOTEBOOKS.glob("0*.ipynb"))


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


# ----------------------------------------------------------------------------- parameters and profiles
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell_first_and_is_clean(path):
    """One `parameters` cell, the first code cell, with `profile = None` (so $DSVAE_PROFILE applies); no injected
    cell, no papermill metadata, no saved widget state, no sys.path hack (the module is installed)."""
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params = [c for c in code if "parameters" in _tags(c)]
    assert len(params) == 1 and params[0] is code[0], "exactly one parameters cell, first among code cells"
    assert "profile = None" in "".join(params[0]["source"])
    assert not [c for c in nb["cells"] if "injected-parameters" in _tags(c)]
    assert "papermill" not in nb["metadata"] and "widgets" not in nb["metadata"]
    for cell in nb["cells"]:
        assert not {"papermill", "execution"} & set(cell.get("metadata", {})), cell.get("id")
        assert "sys.path" not in "".join(cell["source"])
        for output in cell.get("outputs", []):
            assert dsae.WIDGET_VIEW not in output.get("data", {})
    assert path.stat().st_size <= 1.5 * 2 ** 20, f"{path.name} is {path.stat().st_size / 2 ** 20:.2f} MB"


def test_profile_precedence(monkeypatch):
    """Explicit parameter, then $DSVAE_PROFILE, then auto-detection; unknown names are rejected from either."""
    monkeypatch.setenv("DSVAE_PROFILE", "smoke")
    assert dsae.default_profile("cpu") == "cpu"
    assert dsae.default_profile(None) == "smoke"
    monkeypatch.delenv("DSVAE_PROFILE")
    assert dsae.default_profile(None) == ("gpu" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown profile 'bogus'; choose one of"):
        dsae.default_profile("bogus")
    monkeypatch.setenv("DSVAE_PROFILE", "bogus")
    with pytest.raises(ValueError, match="unknown profile 'bogus'"):
        dsae.default_profile(None)


def test_cli_rejects_an_unknown_profile_before_running(monkeypatch):
    monkeypatch.setattr(dsae, "run_report", lambda *a, **k: pytest.fail("the report ran"))
    monkeypatch.setattr(dsae, "build_cache", lambda *a, **k: pytest.fail("the data was built"))
    with pytest.raises(SystemExit) as e:
        dsae.main(["report", "--profile", "bogus"])
    assert e.value.code == 2
    monkeypatch.setenv("DSVAE_PROFILE", "bogus")
    with pytest.raises(SystemExit) as e:
        dsae.main(["report"])
    assert e.value.code == 2


def test_overrides_from_a_dict_or_a_json_string():
    assert dsae.parse_overrides({"epochs": 1}) == {"epochs": 1}
    assert dsae.parse_overrides('{"epochs": 1, "q_z": "full"}') == {"epochs": 1, "q_z": "full"}
    assert dsae.parse_overrides("") == {} and dsae.parse_overrides(None) == {}
    with pytest.raises(ValueError, match="JSON object"):
        dsae.parse_overrides("epochs=1")
    with pytest.raises(ValueError, match="dict or a JSON object"):
        dsae.parse_overrides("[1]")


def test_profile_record_holds_config_judge_limit_and_figures(monkeypatch):
    smoke = dsae.get_profile("smoke")
    assert dsae.make_config("smoke").train_limit == smoke.config["train_limit"]
    assert dsae.judge_config("smoke").test_limit == smoke.test_limit == 135
    assert dsae.judge_config("smoke").width == smoke.judge["width"]
    assert dsae.judge_config("cpu").test_limit is None and dsae.get_profile("cpu").of_record
    mirror, cpu = dsae.make_config("cpu-mirror").__dict__, dsae.make_config("cpu").__dict__
    # the same model, warm-started from the cpu profile's weights of record of its own q variant: 6 epochs, lr 3e-4
    assert {k for k in cpu if cpu[k] != mirror[k]} == {"profile", "f_mirror", "epochs", "lr", "judge_every", "init"}
    assert mirror["f_mirror"] and (mirror["epochs"], mirror["lr"], cpu["epochs"]) == (6, 3e-4, 32)
    for q in ("factorised", "full"):
        init = dsae.make_config("cpu-mirror", q_z=q).init
        assert init == f"weights/cpu-{q}.pt" and (dsae.ROOT / init).is_file()
    assert dsae.make_config("cpu-mirror", q_z="full", init=None).init is None  # a --set init=... is taken as given
    monkeypatch.chdir(dsae.ROOT.parent)  # the profile's warm start is found from any working folder
    record = dsae._warm_start(dsae.make_config("cpu-mirror", q_z="full", run_dir=str(dsae.ROOT / "runs" / "none")))
    assert record["record"]["sha256"] == dsae.sha256(dsae.weights_path("cpu", "full")) and record["record"]["epochs"] == 32
    monkeypatch.chdir(dsae.ROOT)
    assert dsae.faithful_to_paper(cpu) and not dsae.faithful_to_paper(mirror)
    assert not dsae.get_profile("cpu-mirror").of_record  # its report is never the one of record
    assert dsae.judge_config("cpu-mirror") == dsae.judge_config("cpu")  # read by the same judge
    for name in dsae.get_profile("cpu").ablations:  # where the report of record writes them, they are kept
        assert dsae.ROOT / dsae.get_profile(name).figures == dsae.ROOT / dsae.get_profile("cpu").figures / name
    assert not smoke.of_record
    monkeypatch.delenv("DSVAE_FIGURES", raising=False)
    assert dsae.figures_dir("smoke") == dsae.ROOT / "runs" / "smoke-figures"
    assert dsae.figures_dir("cpu") == dsae.ROOT / "figures"
    monkeypatch.setenv("DSVAE_FIGURES", "/somewhere/else")
    assert str(dsae.figures_dir("cpu")) == "/somewhere/else"


# ----------------------------------------------------------------------------- cleaning
def _executed(stamp, model_id):
    """A notebook as papermill leaves it; `stamp` and `model_id` stand for what differs between two runs."""
    meta = {"papermill": {"start_time": stamp, "status": "completed"}, "execution": {"iopub.status.busy": stamp},
            "tags": []}
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "papermill": {"parameters": {"profile": "smoke"}, "start_time": stamp},
                         "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {model_id: {}}}}},
            "cells": [
                {"id": "p", "cell_type": "code", "metadata": {**meta, "tags": ["parameters"]}, "execution_count": 1,
                 "outputs": [], "source": "profile = None"},
                {"id": "i", "cell_type": "code", "metadata": {**meta, "tags": ["injected-parameters"]},
                 "execution_count": 2, "outputs": [], "source": '# Parameters\nprofile = "smoke"\n'},
                {"id": "c", "cell_type": "code", "metadata": dict(meta), "execution_count": 3, "source": "run()",
                 "outputs": [
                     {"output_type": "stream", "name": "stdout", "text": "epoch 1: loss 3\n"},
                     {"output_type": "display_data", "metadata": {},  # a progress bar
                      "data": {dsae.WIDGET_VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 0},
                               "text/plain": f"epoch 1/2: 100%| 8/8 [{stamp}]"}},
                     {"output_type": "execute_result", "execution_count": 3, "metadata": {},  # a view with a still
                      "data": {dsae.WIDGET_VIEW: {"model_id": model_id, "version_major": 2, "version_minor": 0},
                               "text/plain": "VBox()", "text/html": "<img src='data:image/png;base64,AAAA'/>"}},
                     {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo="}}]},
                {"id": "m", "cell_type": "markdown", "metadata": {"papermill": {"duration": 0.1}}, "source": "# A"}]}


def test_clean_notebook_keeps_outputs_and_drops_run_noise():
    nb = dsae.clean_notebook(_executed("2026-01-01T00:00:00", "aaaa"))
    assert [c["id"] for c in nb["cells"]] == ["p", "c", "m"]
    assert set(nb["metadata"]) == {"kernelspec"}
    assert nb["cells"][0]["metadata"] == {"tags": ["parameters"]}
    assert all(c["metadata"] == {} for c in nb["cells"][1:])
    outputs = nb["cells"][1]["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "execute_result", "display_data"]
    assert set(outputs[1]["data"]) == {"text/plain", "text/html"}  # the still stays, the dead view goes
    assert dsae.clean_notebook(nb) == nb


def test_clean_notebook_names_where_staged_figures_end_up():
    nb = _executed("2026-01-01T00:00:00", "aaaa")
    nb["cells"][2]["outputs"][0]["text"] = ["figures -> reports/.run-x1/figures\n", "saved reports/.run-x1/figures/a.png"]
    cleaned = dsae.clean_notebook(nb, {"reports/.run-x1/figures": "figures", "reports/.run-x1": "reports"})
    assert cleaned["cells"][1]["outputs"][0]["text"] == "figures -> figures\nsaved figures/a.png"
    assert dsae.clean_notebook(nb)["cells"][1]["outputs"][0]["text"] == nb["cells"][2]["outputs"][0]["text"]


def test_rerun_with_unchanged_results_writes_identical_notebooks(tmp_path):
    first = dsae.write_notebook(dsae.clean_notebook(_executed("2026-01-01T00:00:00", "aaaa")), tmp_path / "a.ipynb")
    second = dsae.write_notebook(dsae.clean_notebook(_executed("2026-02-02T11:11:11", "bbbb")), tmp_path / "b.ipynb")
    assert first.read_text() == second.read_text()
    nbformat.validate(nbformat.read(first, as_version=4))


# ----------------------------------------------------------------------------- the views carry a still
def test_views_carry_a_still_of_their_state(test_split):
    browser = dsae.sprite_browser()
    bundle = browser._repr_mimebundle_()
    assert dsae.WIDGET_VIEW in bundle and 'src="data:image/gif;base64,' in bundle["text/html"]
    assert "character 0 (" in bundle["text/html"]
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke")).eval()
    for view in (dsae.explorer(model, test_split), dsae.latent_walker(model, test_split)):
        html = view._repr_mimebundle_()["text/html"]
        assert 'src="data:image/png;base64,' in html and "rows:" in html


# ----------------------------------------------------------------------------- papermill parameters
@pytest.fixture
def smoke_full_run(smoke_runs, monkeypatch, tmp_path):
    """runs/smoke-full free for the test: the session's run (`smoke_runs`) moved aside and back afterwards; figures
    and metrics.json staged in a temp folder; $DSVAE_PROFILE names another profile, so only the explicit parameter
    can select smoke."""
    run, aside = dsae.make_config("smoke", q_z="full").path, tmp_path / "smoke-full-of-the-session"
    shutil.move(run, aside)
    monkeypatch.setenv("DSVAE_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("DSVAE_PROFILE", "cpu")
    yield run
    shutil.rmtree(run, ignore_errors=True)
    shutil.move(aside, run)


def _stdout(nb_path):
    nb = json.loads(nb_path.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def test_papermill_parameters_reach_the_run(smoke_full_run, tmp_path):
    """03 with q_z=full and overrides as papermill's -p gives them (a JSON string) trains smoke-full for 1 epoch;
    04 takes seeds (its cells up to the evaluation that writes metrics.json; notebook 04 runs whole under nbval);
    05 with q_z=factorised (its default is full) shows the session's smoke-factorised run instead of that one."""
    run = smoke_full_run
    nb = dsae.NOTEBOOKS
    pm.execute_notebook(nb / "03_training.ipynb", tmp_path / "03.ipynb", cwd=nb, progress_bar=False,
                        parameters={"profile": "smoke", "q_z": "full", "overrides": '{"epochs": 1, "train_limit": 50}'})
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["config"]["q_z"] == "full" and ckpt["config"]["profile"] == "smoke"
    assert "model of record: runs/smoke-full/checkpoint.pt" in _stdout(tmp_path / "03.ipynb")
    evaluation = json.loads((nb / "04_evaluation.ipynb").read_text())  # its cells up to the one writing metrics.json
    end = next(i for i, c in enumerate(evaluation["cells"]) if "dsae.evaluate_profile(" in "".join(c["source"]))
    evaluation["cells"] = evaluation["cells"][:end + 1]
    (tmp_path / "04-head.ipynb").write_text(json.dumps(evaluation))
    pm.execute_notebook(tmp_path / "04-head.ipynb", tmp_path / "04.ipynb", cwd=nb, progress_bar=False,
                        parameters={"profile": "smoke", "seeds": [7]})
    metrics = json.loads((tmp_path / "figures" / "metrics.json").read_text())
    assert metrics["seeds"] == [7] and metrics["runs"]["full"]["epochs"] == 1
    pm.execute_notebook(nb / "05_disentanglement_figures.ipynb", tmp_path / "05.ipynb", cwd=nb, progress_bar=False,
                        parameters={"profile": "smoke", "q_z": "factorised"})
    assert "profile smoke, q(z) factorised, 2 epochs" in _stdout(tmp_path / "05.ipynb")
    assert (tmp_path / "figures" / "swap_grid.png").is_file()
    cleaned = dsae.write_notebook(dsae.clean_notebook(json.loads((tmp_path / "05.ipynb").read_text())),
                                  tmp_path / "05-clean.ipynb")  # a barely trained model: the noisiest figures
    assert cleaned.stat().st_size <= 1.5 * 2 ** 20, f"05 cleaned is {cleaned.stat().st_size / 2 ** 20:.2f} MB"


# ----------------------------------------------------------------------------- make report
def _notebook(path, code):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("profile = None", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_report_failure_changes_nothing_and_names_the_notebook(tmp_path):
    good = _notebook(tmp_path / "01_good.ipynb", "print('profile', profile)")
    bad = _notebook(tmp_path / "02_bad.ipynb", "raise RuntimeError('broken on purpose')")
    before = {p: p.read_bytes() for p in (good, bad)}
    out = tmp_path / "reports"
    with pytest.raises(dsae.ReportError, match=r"notebook 02_bad.ipynb failed \(PapermillExecutionError.*failed"):
        dsae.run_report("smoke", record=True, notebooks=[good, bad], out=out, progress=False)
    assert {p: p.read_bytes() for p in (good, bad)} == before
    assert sorted(p.name for p in out.iterdir()) == ["failed"]  # no half report, no staging folder left
    assert "broken on purpose" in (out / "failed" / "02_bad.ipynb").read_text()


def test_report_copies_back_the_figures_of_ablations_in_their_folders(tmp_path, monkeypatch):
    """The report of record writes an ablation's metrics into <figures>/<ablation>/; copying back keeps the folder,
    and drops that of an ablation the report did not evaluate, so no stale result outlives it."""
    monkeypatch.setitem(dsae.PROFILES, "smoke", dataclasses.replace(dsae.get_profile("smoke"),
                                                                     ablations=("an-ablation", "gone")))
    nb = _notebook(tmp_path / "01_nested.ipynb", "import os, pathlib\n"
                   "folder = pathlib.Path(os.environ['DSVAE_FIGURES']) / 'an-ablation'\n"
                   "folder.mkdir(parents=True)\n(folder / 'metrics.json').write_text('{}')")
    figures = dsae.ROOT / dsae.get_profile("smoke").figures
    kept, gone = figures / "an-ablation", figures / "gone"
    for folder in (kept, gone):
        shutil.rmtree(folder, ignore_errors=True)
    dsae.atomic_write(gone / "metrics.json", "{}")
    try:
        dsae.run_report("smoke", record=True, notebooks=[nb], out=tmp_path / "reports", progress=False)
        assert (kept / "metrics.json").read_text() == "{}" and not gone.exists()
    finally:
        for folder in (kept, gone):
            shutil.rmtree(folder, ignore_errors=True)


def test_index_shows_the_ablations_beside_the_paper_only_when_evaluated(tmp_path):
    metrics = json.loads((dsae.ROOT / "figures" / "metrics.json").read_text())
    (tmp_path / "figures" / "cpu-mirror").mkdir(parents=True)
    (tmp_path / "figures" / "metrics.json").write_text(json.dumps(metrics))
    dsae.write_index(tmp_path, "cpu", ["04_evaluation.ipynb"])
    assert "Beyond the paper" not in (tmp_path / "index.html").read_text()
    init = {"path": "weights/cpu-full.pt", "sha256": "0" * 64, "epochs": 32, "seconds": 6000.0}  # a warm start
    mirror = {**metrics, "profile": "cpu-mirror", "runs": {q: {**run, "config": {**run["config"], "f_mirror": True},
                                                               "init": init} for q, run in metrics["runs"].items()}}
    (tmp_path / "figures" / "cpu-mirror" / "metrics.json").write_text(json.dumps(mirror))
    dsae.write_index(tmp_path, "cpu", ["04_evaluation.ipynb"])
    page = (tmp_path / "index.html").read_text()
    assert "Beyond the paper" in page and "<code>cpu-mirror</code>" in page
    table = dsae.profile_comparison({"cpu": metrics, "cpu-mirror": mirror}).round(1)
    assert table.to_html() in page.split("Beyond the paper", 1)[1]
    assert table["paper's model and objective"].to_dict() == {
        ("cpu", "factorised"): "yes", ("cpu", "full"): "yes", ("cpu-mirror", "factorised"): "no",
        ("cpu-mirror", "full"): "no"}
    for q, run in metrics["runs"].items():  # a warm start's training time counts the file's, and so do its epochs
        assert table.loc[("cpu-mirror", q), "train min"] == pytest.approx((run["train seconds"] + 6000) / 60, abs=0.05)
        assert f"| ours: `cpu-mirror`, {q} q, 32 + {run['epochs']} epochs, training seed 0, " in \
            dsae.results_markdown(metrics, {"cpu-mirror": mirror})


def test_report_copies_back_only_when_of_record_or_asked(tmp_path):
    nb = _notebook(tmp_path / "01_good.ipynb", "print('profile', profile)")
    before = nb.read_bytes()
    out = tmp_path / "reports"
    dsae.run_report("smoke", notebooks=[nb], out=out, progress=False)
    assert nb.read_bytes() == before  # smoke is not a profile of record
    assert {"01_good.ipynb", "01_good.html", "index.html", "no-input"} <= {p.name for p in out.iterdir()}
    assert "profile smoke" in (out / "01_good.ipynb").read_text()
    index = (out / "index.html").read_text()
    assert 'href="01_good.html"' in index and 'href="no-input/01_good.html"' in index
    dsae.run_report("smoke", record=True, notebooks=[nb], out=out, progress=False)
    cleaned = json.loads(nb.read_text())
    assert len(cleaned["cells"]) == 2 and "papermill" not in cleaned["metadata"]  # no injected cell, no metadata
    assert "profile smoke" in "".join(cleaned["cells"][1]["outputs"][0]["text"])


def test_index_shows_both_swap_grids_when_the_report_drew_them(tmp_path):
    """index.html shows swap_grids.png (the profile's model above its ablation's) in place of swap_grid.png, which it
    holds; a report without an ablation shows swap_grid.png."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "swap_grid.png").write_bytes(b"png")
    dsae.write_index(tmp_path, "smoke", [])
    assert 'src="figures/swap_grid.png"' in (tmp_path / "index.html").read_text()
    (tmp_path / "figures" / "swap_grids.png").write_bytes(b"png")
    dsae.write_index(tmp_path, "smoke", [])
    page = (tmp_path / "index.html").read_text()
    assert 'src="figures/swap_grids.png"' in page and 'src="figures/swap_grid.png"' not in page

"""bf16 on the CPU, disentanglement tracked during training, and the weights of record (smoke, real data)."""
import dataclasses
import inspect
import json
import shutil

import numpy as np
import pytest
import torch

import dsvae_lib as dsae


@pytest.fixture(scope="module")
def batch():
    return dsae.to_model_input(dsae.load_sprites("train").frames[:25])


@pytest.mark.parametrize("q_z", ["factorised", "full"])
def test_bf16_elbo_is_within_one_percent_of_fp32(batch, q_z):
    """On a fixed batch and fixed noise, the bf16 autocast + channels_last ELBO and its terms stay in fp32 and
    within 1 % of the fp32 eager ELBO, at the cpu profile's widths. Where the CPU has no native bf16, training runs
    fp32, and the same autocast is checked emulated (slower, with the same bf16 rounding)."""
    torch.manual_seed(0)
    config = dsae.make_config("cpu", q_z=q_z)
    model = dsae.build_model(config, "cpu").eval()
    terms = {}
    for bf16 in (False, True):
        torch.manual_seed(1)
        autocast = dsae._autocast(torch.device("cpu"), bf16) if dsae.bf16_supported("cpu") else \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with torch.no_grad(), autocast:
            terms[bf16] = dsae.elbo_terms(model, batch)
    assert all(v.dtype == torch.float32 for v in terms[True].values())
    assert terms[True]["loss"].item() == pytest.approx(terms[False]["loss"].item(), rel=0.01)
    assert terms[True]["loss"].item() != terms[False]["loss"].item()  # bf16 really ran
    assert next(model.encoder.conv.parameters()).is_contiguous(memory_format=torch.channels_last)


def test_bf16_falls_back_to_fp32_with_a_notice(monkeypatch, capsys):
    """Without native bf16 the CPU runs fp32, and says so once."""
    dsae.bf16_supported.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    try:
        assert dsae.bf16_supported("cpu") is False
        with dsae._autocast(torch.device("cpu"), True):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        dsae.bf16_supported("cpu")
        assert capsys.readouterr().out.count("running in fp32") == 1
    finally:
        dsae.bf16_supported.cache_clear()


def test_compile_is_used_where_it_pays_and_as_asked(monkeypatch, tmp_path):
    """compile=None compiles the training step only on a CPU with a C++ compiler, in bf16 or fp32, for a run long
    enough to repay it; True/False are obeyed; the smoke profile never compiles; and train() follows the decision
    with the steps its run has left."""
    cpu = torch.device("cpu")
    auto = dsae.make_config("cpu")
    assert auto.compile is None and dsae.make_config("smoke").compile is False
    assert dsae.make_config("cpu", compile="none").compile is None  # as `--set compile=none` gives it
    assert dsae.compile_pays(dsae.make_config("cpu", compile=True), "cuda") is True
    assert dsae.compile_pays(dsae.make_config("cpu", compile=False), cpu) is False
    assert dsae.compile_pays(auto, "cuda") is False
    # whether a C++ compiler is on the path, without touching $CXX (torch reads it once, when inductor loads)
    monkeypatch.setattr(dsae.shutil, "which", lambda name: f"/usr/bin/{name}")
    for bf16 in (True, False):
        monkeypatch.setattr(dsae, "bf16_supported", lambda device_type: bf16)
        assert dsae.compile_pays(auto, cpu) is True
        assert dsae.compile_pays(auto, cpu, steps=11520) is True
        assert dsae.compile_pays(auto, cpu, steps=dsae.COMPILE_STEPS - 1) is False  # too short to repay compiling
    monkeypatch.setattr(dsae.shutil, "which", lambda name: None)
    assert dsae.compile_pays(auto, cpu) is False
    monkeypatch.setattr(dsae.shutil, "which", lambda name: f"/usr/bin/{name}")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    smoke = dict(compile=None, epochs=1, train_limit=50, eval_limit=25)  # 2 steps an epoch
    dsae.train(dsae.make_config("smoke", **smoke, run_dir=str(tmp_path / "short")), progress=False)
    assert compiled == []  # 2 steps
    monkeypatch.setattr(dsae, "COMPILE_STEPS", 2)
    dsae.train(dsae.make_config("smoke", **smoke, run_dir=str(tmp_path / "auto")), progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], dsae.DSAE)
    dsae.train(dsae.make_config("smoke", **{**smoke, "compile": False}, run_dir=str(tmp_path / "off")),
               progress=False)
    assert len(compiled) == 1
    monkeypatch.setattr(dsae, "COMPILE_STEPS", 3)
    dsae.train(dsae.make_config("smoke", **{**smoke, "epochs": 2}, run_dir=str(tmp_path / "auto")), progress=False)
    assert len(compiled) == 1  # resumed with 2 steps left of 4: fewer than 3


@pytest.mark.parametrize("q_z, bf16", [("factorised", False), ("full", True)])
def test_compiled_training_steps_match_eager(batch, q_z, bf16):
    """torch.compile of the training step (graph breaks at the RNNs of the full q included) gives the eager step's
    loss, step after step (smoke widths; each loss after the first also checks the updates before it), given the
    same noise: compiled code draws its own random numbers unless told to take eager's (fallback_random). In fp32 to
    1e-4; in bf16 autocast (where the CPU has it; compiled code rounds its fused intermediates less) to 1e-2. Each q
    and each arithmetic once (compiling costs 10-40 s a case): the full q in bf16, as the runs of record train."""
    import copy
    import torch._inductor.config
    config = dsae.make_config("smoke", q_z=q_z, bf16=bf16)
    torch.manual_seed(0)
    eager = dsae.build_model(config, "cpu")
    compiled = copy.deepcopy(eager)
    losses = {}
    for name, model, step in (("eager", eager, eager), ("compiled", compiled, torch.compile(compiled))):
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        torch.manual_seed(1)
        with torch._inductor.config.patch(fallback_random=True):
            losses[name] = [dsae.train_step(step, optimizer, x, config)["loss"].item()
                            for x in (batch, batch[:10], batch)]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2 if bf16 else 1e-4)


def test_fused_adam_takes_pytorchs_default_adam_step_and_training_uses_it(batch, tmp_path, monkeypatch):
    """dsae.adam with fused_adam takes the step PyTorch's default multi-tensor Adam (the default) takes, to rounding
    (later steps drift apart as any two roundings of a chaotic trajectory do); train() builds its optimiser with it,
    and a run resumed with another fused_adam uses the kernel its config asks for."""
    import copy
    config = dsae.make_config("smoke", bf16=False)
    torch.manual_seed(0)
    models = {True: dsae.build_model(config, "cpu")}
    models[False], initial = copy.deepcopy(models[True]), copy.deepcopy(models[True])
    for fused, model in models.items():
        optimizer = dsae.adam(model, dataclasses.replace(config, fused_adam=fused))
        assert optimizer.param_groups[0]["fused"] is (True if fused else None)
        torch.manual_seed(1)
        dsae.train_step(model, optimizer, batch, config)
    for a, b in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(a, b) for a, b in zip(models[True].parameters(), initial.parameters()))  # all moved
    built = []
    adam = dsae.adam
    monkeypatch.setattr(dsae, "adam", lambda model, c: built.append(adam(model, c)) or built[-1])
    run = str(tmp_path / "run")
    dsae.train(dsae.make_config("smoke", epochs=1, run_dir=run), progress=False)
    dsae.train(dsae.make_config("smoke", epochs=2, fused_adam=True, run_dir=run), progress=False)
    assert [o.param_groups[0]["fused"] for o in built] == [None, True]


def test_disentanglement_is_logged_during_training(tmp_path, smoke_run):
    """judge_every=1: every epoch's row carries the judge-protocol metrics, and tracking does not change the
    training trajectory (it samples from its own generator)."""
    config = dsae.make_config("smoke", run_dir=str(tmp_path / "tracked"), judge_every=1, judge_limit=90)
    _, history = dsae.train(config, progress=False)
    keys = ["z kept: motion", "z kept: IS", "f kept: skin", "f kept: attributes", "recon: motion",
            "swap: motion of b", "judge_seconds"]
    assert all(k in row for row in history for k in keys)
    assert all(0.0 <= row["f kept: attributes"] <= 1.0 and 1.0 <= row["z kept: IS"] <= 9.0 for row in history)
    judge_file, = (dsae.ROOT / "runs").glob(f"judge-*-{dsae.judge_config('smoke').key()}.pt")
    assert {row["judge sha256"] for row in history} == {dsae.sha256(judge_file)}  # which judge read them
    csv = (tmp_path / "tracked" / "metrics.csv").read_text().splitlines()[0]
    assert "z kept: motion" in csv and "f kept: attributes" in csv
    plain_config, plain = smoke_run  # the same run without tracking
    assert [r["loss"] for r in plain] == [r["loss"] for r in history]
    assert len(dsae.plot_disentanglement_history(history).axes) == 2  # against epochs and wall time
    with pytest.raises(ValueError, match="judge_every"):
        dsae.plot_disentanglement_history(plain)
    study = dsae.collect_study([tmp_path / "tracked"], out=tmp_path / "study.json")
    row = dsae.study_table(study, reference="smoke").loc["tracked"]
    assert row["changes"] == "(profile values)" and row["paper's model and objective"] == "yes" and row["epochs"] == "2 of 2"
    for change in ({"f_mirror": True}, {"f_first": True}, {"f_shuffle": 8}, {"f_pool": True}, {"z_grey": True},
                   {"f_partner": True}, {"f_film": True}, {"beta_z": 2.0}):  # q(f|x) and q(z|x) variants, FiLM, a KL weight
        other = dsae.study_table({"x": {**study["tracked"], "config": {**study["tracked"]["config"], **change}}},
                                 reference="smoke").loc["x"]
        assert other["paper's model and objective"] == "no" and other["changes"] == "{}={}".format(*change.popitem())
    assert row["z kept: motion %"] == pytest.approx(100 * history[-1]["z kept: motion"])
    assert row["judge"] == dsae.sha256(judge_file)[:12]
    assert json.loads((tmp_path / "study.json").read_text())["tracked"]["history"] == history
    many = {f"run {i}": study["tracked"] for i in range(13)}  # every run of a study is told apart in its figure
    lines = [line for line in dsae.plot_study(many).axes[0].get_lines() if line.get_label().startswith("run")]
    assert len({(tuple(line.get_color()), line.get_marker()) for line in lines}) == 13
    grown = dsae.collect_study([plain_config.path], out=tmp_path / "study.json")  # earlier runs stay
    assert list(grown) == ["tracked", "smoke-factorised"] and grown["tracked"]["history"] == history
    assert list(json.loads((tmp_path / "study.json").read_text())) == ["tracked", "smoke-factorised"]
    assert grown["smoke-factorised"]["commit"] == dsae.git_commit()  # whose code reruns it


def test_study_runs_are_evaluated_by_the_protocol_of_the_weights_of_record(tmp_path, capsys, smoke_run):
    """`dsvae evaluate` gives a run the same per-seed rows as `evaluate` with its profile's judge, and names what it
    read; its file grows run by run (a run evaluated again replaces its entry), refuses rows of another protocol
    without touching what it holds, and a path that is no run is refused before anything is read."""
    run = tmp_path / "a"
    run.mkdir()
    shutil.copyfile(smoke_run[0].path / "checkpoint.pt", run / "checkpoint.pt")
    out = tmp_path / "evaluations.json"
    dsae.main(["evaluate", str(run), "--profile", "smoke", "--seeds", "0", "--out", str(out)])
    got = json.loads(out.read_text())
    model, ckpt = dsae.load_checkpoint(run / "checkpoint.pt")
    judge = dsae.train_judge(dsae.judge_config("smoke"), progress=False)[0]
    rows, confusions = dsae.evaluate(model, judge, dsae.load_sprites("test"), (0,), 135, progress=False)
    assert got["runs"]["a"]["rows"] == json.loads(json.dumps(rows))
    assert got["runs"]["a"]["motion breakdown (first seed)"] == dsae.motion_breakdown(confusions["motion"])
    assert got["judge"]["sha256"] == judge.sha256 and got["test sequences"] == 135 and got["seeds"] == [0]
    assert got["runs"]["a"]["checkpoint sha256"] == dsae.sha256(run / "checkpoint.pt")
    assert got["runs"]["a"]["processor"] == dsae.processor_name("cpu") and got["runs"]["a"]["arithmetic"] == \
        ("bf16" if dsae.bf16_supported("cpu") else "fp32")  # where and in what it was read
    assert "z kept: motion" in capsys.readouterr().out
    weights = dsae.export_weights(run / "checkpoint.pt", tmp_path / "b.pt")
    dsae.main(["evaluate", str(weights), str(run), "--profile", "smoke", "--seeds", "0", "--out", str(out)])
    grown = json.loads(out.read_text())
    assert list(grown["runs"]) == ["a", "b"] and grown["runs"]["a"]["rows"] == got["runs"]["a"]["rows"]
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        dsae.main(["evaluate", str(run), "--profile", "smoke", "--seeds", "1", "--out", str(out)])
    assert "another judge, data, test sequences or seeds" in capsys.readouterr().err and out.read_bytes() == before
    with pytest.raises(SystemExit):
        dsae.main(["evaluate", str(tmp_path / "nothing"), "--profile", "smoke", "--out", str(out)])
    assert "no checkpoint.pt there" in capsys.readouterr().err and out.read_bytes() == before


def test_weights_file_round_trips(tmp_path, batch, smoke_run):
    """export_weights keeps the model in half precision (plus config, epochs, history); load_checkpoint gives
    back a model whose outputs equal the trained model's with its parameters rounded to half precision."""
    config, history = smoke_run
    model, _ = dsae.load_checkpoint(config.path / "checkpoint.pt")
    out = dsae.export_weights(config.path / "checkpoint.pt", tmp_path / "w" / "smoke-factorised.pt")
    saved = torch.load(out, weights_only=False)
    assert {v.dtype for v in saved["model"].values() if v.is_floating_point()} == {torch.float16}
    assert saved["epoch"] == 2 and saved["history"] == history and saved["config"]["f_dim"] == 16
    assert out.stat().st_size < (config.path / "checkpoint.pt").stat().st_size / 3
    loaded, ckpt = dsae.load_checkpoint(out)
    rounded = dsae.DSAE(config)
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in model.state_dict().items()})
    rounded.eval()
    with torch.no_grad():
        a, b = loaded.encode(batch, sample=False), rounded.encode(batch, sample=False)
        torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(a.f, a.z), rounded.decode(b.f, b.z), rtol=0, atol=0)
        assert (loaded.decode(a.f, a.z) - model.decode(*model.encode(batch, sample=False)[2::3])).abs().max() < 0.05


def test_committed_weights_are_used_without_training(tmp_path, monkeypatch, smoke_run):
    """With a weights file of record present, the report's models come from it: train() is never called, and
    no run folder is created; weights=False (make reproduce) trains instead."""
    dsae.export_weights(smoke_run[0].path / "checkpoint.pt", dsae.weights_path("smoke", "factorised", tmp_path / "w"))
    fresh = dsae.make_config("smoke", run_dir=str(tmp_path / "fresh"))

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a weights file of record exists")

    monkeypatch.setattr(dsae, "train", no_training)
    model, history, source = dsae.trained_model(fresh, folder=tmp_path / "w")
    assert source == tmp_path / "w" / "smoke-factorised.pt" and len(history) == 2
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(AssertionError, match="trained although"):
        dsae.trained_model(fresh, weights=False, folder=tmp_path / "w")
    with pytest.raises(AssertionError, match="trained although"):  # no weights for the full q: train
        dsae.trained_model(dsae.make_config("smoke", q_z="full", run_dir=str(tmp_path / "f")), folder=tmp_path / "w")
    with pytest.raises(ValueError, match="another configuration"):
        dsae.trained_model(dsae.make_config("smoke", lr=0.5), folder=tmp_path / "w")


def test_a_committed_judge_is_read_and_never_retrained(tmp_path, monkeypatch):
    """weights/judge-<key>.pt, when committed, is the judge of every metric (training's too), in place of the
    machine's cached or retrained one; without it the cache under runs/ is used as before."""
    cached = dsae.train_judge(dsae.judge_config("smoke"), progress=False)[0]
    name = f"judge-{dsae.load_sprites('train').source}-{dsae.judge_config('smoke').key()}.pt"
    saved = torch.load(dsae.ROOT / "runs" / name, weights_only=False)
    marked = {**saved, "test_accuracy": {"skin": 0.123}}  # what only the committed file says
    torch.save(marked, tmp_path / name)
    monkeypatch.setattr(dsae, "WEIGHTS", tmp_path)
    judge, accuracy = dsae.train_judge(dsae.judge_config("smoke"), progress=False)
    assert accuracy == {"skin": 0.123} and judge.sha256 == dsae.sha256(tmp_path / name) != cached.sha256
    (tmp_path / name).unlink()
    assert dsae.train_judge(dsae.judge_config("smoke"), progress=False)[0].sha256 == cached.sha256


def test_export_refuses_a_run_of_another_configuration_or_unfinished(tmp_path, smoke_run):
    """Weights of record always hold the profile's own configuration, fully trained; nothing is written otherwise."""
    config, _ = smoke_run
    checkpoint = config.path / "checkpoint.pt"
    out = tmp_path / "w" / "smoke-factorised.pt"
    with pytest.raises(ValueError, match="another configuration than profile 'smoke'"):
        dsae.export_weights(checkpoint, out, expected=dsae.make_config("smoke", channels=4))
    with pytest.raises(ValueError, match="holds 2 of 3 epochs"):
        dsae.export_weights(checkpoint, out, expected=dsae.make_config("smoke", epochs=3))
    assert not out.exists()
    assert dsae.export_weights(checkpoint, out, expected=config) == out


def test_export_writes_another_training_seeds_run_to_a_file_of_its_own(tmp_path, smoke_run, capsys):
    """`dsvae export --set seed=1 run_dir=... --out FILE`: a run of another training seed is exported beside the
    weights of record, never over them; without the seed it was trained with, it is refused."""
    config, _ = smoke_run
    run = tmp_path / "smoke-seed1"
    shutil.copytree(config.path, run)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    checkpoint["config"]["seed"] = 1  # as a run trained with --set seed=1 holds it
    torch.save(checkpoint, run / "checkpoint.pt")
    out = tmp_path / "smoke-seed1.pt"
    with pytest.raises(SystemExit):
        dsae.main(["export", "--profile", "smoke", "--set", f"run_dir={run}", "--out", str(out)])
    assert "another configuration than profile 'smoke'" in capsys.readouterr().err and not out.exists()
    dsae.main(["export", "--profile", "smoke", "--set", "seed=1", f"run_dir={run}", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert torch.load(out, weights_only=False)["config"]["seed"] == 1
    assert not dsae.weights_path("smoke", "factorised").exists()  # the weights of record's place stays untouched


def test_generations_draw_from_a_local_generator(batch):
    """Figures' generations are reproducible from their seed and leave the global RNG untouched."""
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke")).eval()
    state = torch.get_rng_state()
    rows = dsae.generations(model, batch[:2], "f", draws=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(rows, dsae.generations(model, batch[:2], "f", draws=2, seed=3))
    assert not np.array_equal(rows, dsae.generations(model, batch[:2], "f", draws=2, seed=4))


@pytest.mark.parametrize("profile, q_z", [('cpu', 'factorised'), ('cpu', 'full'), ('cpu-mirror', 'factorised'), ('cpu-mirror', 'full')])
def test_committed_weights_hold_their_profile_and_fit_the_limit(profile, q_z):
    """Each weights file of record (the cpu profile's and its ablation's) holds its profile's configuration, trained
    for the profile's epochs, in half precision within 20 MB; a changed profile without new weights fails here, not
    in the report."""
    path = dsae.weights_path(profile, q_z)
    assert path.stat().st_size <= 20_000_000
    saved = torch.load(path, map_location="cpu", weights_only=False)
    expected = dsae.make_config(profile, q_z=q_z)
    assert dsae._comparable(dsae.config_from_dict(saved["config"], path)) == dsae._comparable(expected)
    assert saved["epoch"] == expected.epochs == len(saved["history"])
    assert {v.dtype for v in saved["model"].values() if v.is_floating_point()} == {torch.float16}


def test_other_training_seeds_stand_beside_the_run_of_record_only_when_trained_and_read_alike(tmp_path):
    """training_seeds adds to a profile's runs of record the evaluations of its other training seeds, refusing one
    trained otherwise or repeating a seed, and leaving out another profile's and those read by another judge
    protocol; seed_table and the README give each seed's numbers and, from 3 seeds on, their mean and standard
    deviation over the training seeds. The records are copies of the metrics of record with the seed and one number
    changed."""
    metrics = json.loads((dsae.ROOT / "figures" / "metrics.json").read_text())
    record = metrics["runs"]["full"]
    head = {k: metrics[k] for k in ("judge", "data", "test sequences", "seeds")}
    path = tmp_path / "training-seeds.json"

    def seed(s, motion, **config):
        run = json.loads(json.dumps(record))
        run["config"].update(seed=s, run_dir=f"runs/cpu-full-seed{s}", **config)
        run["summary"]["z kept: motion"]["mean"] = motion
        return run
    path.write_text(json.dumps({**head, "runs": {"cpu-full-seed1": seed(1, 0.99), "cpu-full-seed2": seed(2, 0.91)}}))
    seeds = dsae.training_seeds(metrics, path)
    assert sorted(seeds["full"]) == [0, 1, 2] and list(seeds["factorised"]) == [record["config"]["seed"]]
    table = dsae.seed_table(seeds)
    motions = [100 * record["summary"]["z kept: motion"]["mean"], 99.0, 91.0]
    assert table.loc[("full", "mean"), "z kept: motion"] == pytest.approx(np.mean(motions))
    assert table.loc[("full", "std"), "z kept: motion"] == pytest.approx(np.std(motions, ddof=1))
    assert ("factorised", "mean") not in table.index  # one seed: no spread
    readme = dsae.results_markdown(metrics, seeds=seeds)
    assert (f"| ours: `cpu`, full q, mean ± std over training seeds 0, 1, 2 | {np.mean(motions):.2f} ± "
            f"{np.std(motions, ddof=1):.2f} |") in readme
    assert f"`cpu`'s motion reads {max(motions) - min(motions):.2f} points apart over 3 training seeds of its full q (" \
        in readme and "each row one training seed except a mean ± std over training seeds" in readme
    noisy = {q: dict(runs) for q, runs in seeds.items()}  # the caveat's spread over sampling seeds counts every row
    noisy["full"][1] = json.loads(json.dumps(seeds["full"][1]))
    noisy["full"][1]["summary"]["f kept: pants"]["std"] = 0.0987
    assert "sampling seeds is at most 9.87 points" in dsae.results_markdown(metrics, seeds=noisy)
    lines = readme.splitlines()
    at = next(i for i, line in enumerate(lines) if "full q, 32 epochs, training seed 0" in line)
    assert "training seed 1" in lines[at + 1] and "training seed 2" in lines[at + 2]  # after their q's row
    two = dsae.seed_table({"full": {s: seeds["full"][s] for s in (0, 1)}})
    assert ("full", "1") in two.index and ("full", "mean") not in two.index  # two seeds: their values, no std
    path.write_text(json.dumps({**head, "runs": {"other": seed(1, 0.99, profile="cpu-mirror")}}))
    assert sorted(dsae.training_seeds(metrics, path)["full"]) == [0]  # another profile's run is not a seed of this one
    path.write_text(json.dumps({**head, "seeds": [0], "runs": {"cpu-full-seed1": seed(1, 0.99)}}))
    assert sorted(dsae.training_seeds(metrics, path)["full"]) == [0]  # read by another protocol: does not compare
    for bad, match in (({"cpu-full-seed1": seed(1, 0.99, epochs=16)}, "not trained as the run of record"),
                       ({"cpu-full-seed0": seed(0, 0.99)}, "repeats training seed 0")):
        path.write_text(json.dumps({**head, "runs": bad}))
        with pytest.raises(ValueError, match=f"{next(iter(bad))}.*{match}"):
            dsae.training_seeds(metrics, path)
    late = json.loads(json.dumps(metrics))  # a run of record with a higher seed than the others
    late["runs"]["full"]["config"]["seed"] = 3
    path.write_text(json.dumps({**head, "runs": {"cpu-full-seed1": seed(1, 0.99)}}))
    readme = dsae.results_markdown(late, seeds=dsae.training_seeds(late, path))
    assert "training seed 1, `" in readme and readme.count("full q, 32 epochs, training seed 3") == 1


def test_readme_results_are_the_metrics_of_record_and_name_their_weights(tmp_path):
    """The README's results section is results_markdown of figures/metrics.json and its ablations': each row of its
    table holds that row's numbers of the metrics files (read here without the writer) and names its profile, q
    variant, epochs, training seed and weights file, whose SHA-256 is the committed file's and is listed in the
    README; update_readme rewrites only what lies between the markers."""
    metrics = json.loads((dsae.ROOT / "figures" / "metrics.json").read_text())
    ablations = dsae.ablation_metrics("cpu")  # figures/<ablation>/metrics.json, shown after the paper's model
    readme = (dsae.ROOT / "README.md").read_text()
    section = readme.split(dsae.README_BEGIN, 1)[1].split(dsae.README_END, 1)[0]
    seeds = dsae.training_seeds(metrics)  # the other training seeds (study/training-seeds.json), after their q's row
    assert section.strip() == dsae.results_markdown(metrics, ablations, seeds).strip()
    table = {line.split(" | ")[0].lstrip("| "): [float(v) for v in line.rstrip(" |").split(" | ")[1:]]
             for line in section.splitlines() if line.startswith("| ours: ") and " ± " not in line}
    published = metrics["published"][dsae.PUBLISHED_ROW]
    assert f"| {dsae.PUBLISHED_ROW} | {published['accuracy %']:.4g} | {published['IS']:.4g} |" in section
    results = {"cpu": metrics, **ablations}
    others = {(q, s): run for q, runs in seeds.items() for s, run in runs.items() if s != metrics["runs"][q]["config"]["seed"]}
    assert len(table) == sum(len(m["runs"]) for m in results.values()) + len(others) == 4 + len(others)
    for (q, seed), run in others.items():  # a row of its own, read from the file that holds its evaluation
        label = (f"ours: `cpu`, {q} q, {run['epochs']} epochs, training seed {seed}, `{run['checkpoint']}` (weights "
                 f"not in the repository; [`study/training-seeds.json`](study/training-seeds.json))")
        assert table[label][0] == pytest.approx(100 * run["summary"]["z kept: motion"]["mean"], abs=0.0051), label
    for profile, m in results.items():
        for q, run in m["runs"].items():
            epochs = f"{run['init']['epochs']} + {run['epochs']}" if run.get("init") else f"{run['epochs']}"
            label = (f"ours: `{profile}`, {q} q, {epochs} epochs, training seed {run['config']['seed']}, "
                     f"`{run['checkpoint']}`")
            s = run["summary"]
            expected = [100 * s["z kept: motion"]["mean"], s["z kept: IS"]["mean"],
                        *(100 * s[f"f kept: {a}"]["mean"] for a in dsae.ATTRIBUTES)]
            assert table[label] == pytest.approx(expected, abs=0.0051), label  # printed to 2 (IS: 3) decimals
            assert dsae.sha256(dsae.ROOT / run["checkpoint"]) == run["checkpoint sha256"], label
            assert f"`{run['checkpoint sha256'][:12]}`" in readme, label  # the weights table names its hash
    bumped = json.loads(json.dumps(metrics))
    bumped["runs"]["full"]["summary"]["f kept: skin"]["mean"] += 0.0001  # one number of the metrics moves by 0.01
    assert dsae.results_markdown(bumped, ablations).strip() != section.strip()
    judges = {dsae.sha256(path) for path in dsae.WEIGHTS.glob("judge-*.pt")}
    for m in results.values():  # a judge recorded by the metrics of record is the committed one
        assert m["judge"].get("sha256") in judges | {None}
    judged = {**metrics, "judge": {**metrics["judge"], "sha256": "0123456789abcdef" * 4}}
    assert "(judge file SHA-256 `0123456789abcdef…`)" in dsae.results_markdown(judged)  # when it is recorded
    placed = {**judged, "runs": {q: {**r, "processor": "Some CPU", "arithmetic": "bf16"}
                                 for q, r in judged["runs"].items()}}
    assert "`0123456789abcdef…`); evaluated on Some CPU in bf16." in dsae.results_markdown(placed)  # and where, how
    copy = tmp_path / "README.md"
    copy.write_text(f"before\n{dsae.README_BEGIN}\nold\n{dsae.README_END}\nafter\n")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    dsae.update_readme(tmp_path / "metrics.json", copy)
    assert copy.read_text() == (f"before\n{dsae.README_BEGIN}\n{dsae.results_markdown(metrics, seeds=seeds)}\n"
                                f"{dsae.README_END}\nafter\n")
    dsae.update_readme(tmp_path / "metrics.json", copy, ablations)
    assert copy.read_text().split(dsae.README_BEGIN, 1)[1].split(dsae.README_END, 1)[0] == section


def test_study_log_reads_the_judged_epochs_of_the_study():
    """study_log (notebook 06): one row per judged epoch of the named runs of study/study.json, in %, whose last
    row is the run's row of study_table; `epochs` keeps only those epochs."""
    study = json.loads((dsae.STUDY / "study.json").read_text())
    log = dsae.study_log(study, ["full-32", "fact-32"])
    judged = [r["epoch"] for r in study["full-32"]["history"] if "z kept: motion" in r]
    assert list(log.loc["full-32"].index) == judged and len(judged) == 16
    table = dsae.study_table(study)
    for name in ("full-32", "fact-32"):
        last = log.loc[(name, 32)]
        for column in ("z kept: motion %", "f kept: skin %", "swap: motion of b %", "KL_z", "test -ELBO"):
            assert last[column] == pytest.approx(table.loc[name, column])
    assert list(dsae.study_log(study, ["full-32"], epochs=[16, 32]).index) == [("full-32", 16), ("full-32", 32)]


def test_profile_comparison_puts_the_ablations_beside_the_paper_and_says_which_is_which():
    """profile_comparison: one row per profile and q with the metrics of record (means over seeds, in %), the
    motion split of the first seed, and "no" under the paper's model and objective for a profile beyond it."""
    metrics = json.loads((dsae.ROOT / "figures" / "metrics.json").read_text())
    results = {"cpu": metrics, **dsae.ablation_metrics("cpu")}
    table = dsae.profile_comparison(results)
    assert list(table.index) == [(p, q) for p, r in results.items() for q in r["runs"]]
    for (p, q), row in table.iterrows():
        run = results[p]["runs"][q]
        assert row["z kept: motion %"] == pytest.approx(100 * run["summary"]["z kept: motion"]["mean"])
        assert row["f kept: pants %"] == pytest.approx(100 * run["summary"]["f kept: pants"]["mean"])
        split = dsae.motion_breakdown(run["confusions (first seed)"]["motion"])
        assert row["direction %"] == pytest.approx(split["direction"])
        assert row["paper's model and objective"] == ("no" if run["config"].get("f_mirror") else "yes")
    assert (table.loc["cpu", "paper's model and objective"] == "yes").all()
    beyond = {**metrics["runs"]["full"]["config"], "f_mirror": True}
    assert dsae.profile_comparison({"x": {"runs": {"full": {**metrics["runs"]["full"], "config": beyond}}}}
                                   ).loc[("x", "full"), "paper's model and objective"] == "no"


def test_the_ablations_of_a_profile_are_evaluated_into_its_figures(tmp_path, monkeypatch):
    """evaluate_ablations (notebook 04): each ablation of the profile that has a trained run is evaluated with the
    profile's judge and written to <figures>/<ablation>/metrics.json, where the report keeps it and from which the
    README and the index read it, its latent probe fitted on the profile's probe_limit training sequences; an ablation
    without weights or runs is skipped, and one with another judge or probe is refused."""
    smoke = dsae.get_profile("smoke")
    monkeypatch.setitem(dsae.PROFILES, "smoke", dataclasses.replace(smoke, ablations=("smoke-mirror", "smoke-none")))
    for name in ("smoke-mirror", "smoke-none"):
        monkeypatch.setitem(dsae.PROFILES, name, dataclasses.replace(  # one epoch of two steps: any trained run
            smoke, config={**smoke.config, "f_mirror": True, "epochs": 1, "train_limit": 50}))
    monkeypatch.setenv("DSVAE_FIGURES", str(tmp_path / "figures"))
    run = dsae.make_config("smoke-mirror", q_z="full").path
    shutil.rmtree(run, ignore_errors=True)
    try:
        dsae.train(dsae.make_config("smoke-mirror", q_z="full"), progress=False)
        assert dsae.evaluate_ablations("smoke", seeds=(0,), progress=False) == {}  # a run is not a weights file
        probe, fitted = dsae.latent_probe, []
        monkeypatch.setattr(dsae, "latent_probe", lambda *a, **k: fitted.append(
            inspect.signature(probe).bind(*a, **k).arguments["train_limit"]) or probe(*a, **k))
        results = dsae.evaluate_ablations("smoke", seeds=(0,), progress=False, weights=False)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    assert list(results) == ["smoke-mirror"] and list(results["smoke-mirror"]["runs"]) == ["full"]
    assert fitted == [smoke.probe_limit] and smoke.probe_limit == 450
    saved = json.loads((tmp_path / "figures" / "smoke-mirror" / "metrics.json").read_text())
    assert dsae.ablation_metrics("smoke", tmp_path / "figures") == {"smoke-mirror": saved}
    assert saved["runs"]["full"]["config"]["f_mirror"] and saved["profile"] == "smoke-mirror"
    assert saved["judge"]["sha256"] == dsae.train_judge(dsae.judge_config("smoke"), progress=False)[0].sha256
    table = dsae.profile_comparison(results)
    assert table.loc[("smoke-mirror", "full"), "paper's model and objective"] == "no"
    monkeypatch.setitem(dsae.PROFILES, "smoke-none", dataclasses.replace(smoke, judge={**smoke.judge, "epochs": 1}))
    with pytest.raises(ValueError, match="ablation 'smoke-none' of profile 'smoke' has another judge"):
        dsae.evaluate_ablations("smoke", seeds=(0,), progress=False, weights=False)
    monkeypatch.setitem(dsae.PROFILES, "smoke-none", dataclasses.replace(smoke, probe_limit=2700))
    with pytest.raises(ValueError, match="ablation 'smoke-none' of profile 'smoke' has another judge or latent probe"):
        dsae.evaluate_ablations("smoke", seeds=(0,), progress=False, weights=False)


def test_warm_start_begins_from_the_given_weights_and_refuses_another_architecture(tmp_path, smoke_run):
    """init=<weights file>: the run starts from that model state (with a fresh optimiser), records the file's
    SHA-256, epochs and training time, and the study counts them; a file of another architecture, or no file, is
    refused before a run folder exists."""
    weights = dsae.export_weights(smoke_run[0].path / "checkpoint.pt", tmp_path / "w.pt")
    saved = torch.load(weights, weights_only=False)
    source = saved["model"]
    warm = dsae.make_config("smoke", run_dir=str(tmp_path / "b"), init=str(weights), epochs=1, lr=1e-12,
                            judge_every=1, judge_limit=90)
    model, _ = dsae.train(warm, progress=False)
    for name, p in model.named_parameters():  # lr 1e-12: the weights are still those of the file
        torch.testing.assert_close(p.detach(), source[name].float(), rtol=0, atol=1e-6)
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert ckpt["init"] == {"path": str(weights), "sha256": dsae.sha256(weights), "epochs": 2,
                            "seconds": sum(r["seconds"] for r in saved["history"])}
    exported = dsae.export_weights(tmp_path / "b" / "checkpoint.pt", tmp_path / "b.pt")  # the record goes along
    assert torch.load(exported, weights_only=False)["init"] == ckpt["init"] and saved["init"] is None
    row = dsae.study_table(dsae.collect_study([tmp_path / "b"]), reference="smoke").loc["b"]
    assert row["changes"] == "warm start from w.pt (2 epochs), epochs=1, lr=1e-12" and row["epochs"] == "2 + 1 of 1"
    assert row["wall min"] == pytest.approx((ckpt["init"]["seconds"] + ckpt["history"][0]["seconds"]) / 60)
    cold, _ = dsae.train(dsae.make_config("smoke", run_dir=str(tmp_path / "c"), epochs=1, lr=1e-12), progress=False)
    assert max((p - source[n].float()).abs().max().item() for n, p in cold.named_parameters()) > 1e-3
    with pytest.raises(ValueError, match=r"another architecture \(channels=8 there, 4 here\)"):
        dsae.train(dsae.make_config("smoke", run_dir=str(tmp_path / "d"), init=str(weights), channels=4))
    with pytest.raises(FileNotFoundError, match="no such checkpoint or weights file"):
        dsae.train(dsae.make_config("smoke", run_dir=str(tmp_path / "e"), init=str(tmp_path / "none.pt")))
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()

"""The judge and the disentanglement metrics (smoke profile, real Sprites data)."""
import hashlib
import json

import numpy as np
import pytest
import torch
from scipy.stats import entropy

import dsvae_lib as dsae


def test_inception_score_limits():
    """One-hot predictions of 9 balanced classes reach the limits; constant uniform ones the opposite."""
    sharp = dsae.inception_score(np.eye(9))
    assert sharp["IS"] == pytest.approx(9.0) and sharp["H(y|x)"] == pytest.approx(0.0)
    assert sharp["H(y)"] == pytest.approx(np.log(9))
    flat = dsae.inception_score(np.full((9, 9), 1 / 9))
    assert flat["IS"] == pytest.approx(1.0) and flat["H(y|x)"] == pytest.approx(np.log(9))
    collapsed = dsae.inception_score(np.tile(np.eye(9)[2], (9, 1)))  # always the same class: sharp but no variety
    assert collapsed["IS"] == pytest.approx(1.0) and collapsed["H(y)"] == pytest.approx(0.0)


def test_inception_score_on_a_hand_made_table():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    marginal = probs.mean(0)
    expected_is = np.exp(np.mean([entropy(p, marginal) for p in probs]))  # exp E_x KL(p(y|x) || p(y))
    got = dsae.inception_score(probs)
    assert got["IS"] == pytest.approx(expected_is)
    assert got["H(y|x)"] == pytest.approx((0 + np.log(2) + entropy([0.2, 0.8])) / 3)
    assert got["H(y)"] == pytest.approx(entropy(marginal))


def test_balanced_subset():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    idx = dsae.balanced_subset(labels)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3] and len(set(idx)) == 9


def test_motion_breakdown_splits_action_and_direction():
    """Every motion read right; then half of spellcard-left read as spellcard-right and all of slash-front read as
    walk-front: the action loses the slashes, the direction and the left/right swaps only the spellcards."""
    m = lambda a, d: dsae.motion_index(dsae.ACTIONS.index(a), dsae.DIRECTIONS.index(d))
    confusion = np.eye(9) * 10
    assert dsae.motion_breakdown(confusion) == {"motion": 100, "action": 100, "direction": 100,
                                                "left/right swapped": 0}
    confusion[m("spellcard", "left"), m("spellcard", "left")] = 5
    confusion[m("spellcard", "left"), m("spellcard", "right")] = 5
    confusion[m("slash", "front"), m("slash", "front")] = 0
    confusion[m("slash", "front"), m("walk", "front")] = 10
    got = dsae.motion_breakdown(confusion.tolist())
    assert got == pytest.approx({"motion": 100 * 75 / 90, "action": 100 * 80 / 90, "direction": 100 * 85 / 90,
                                 "left/right swapped": 100 * 5 / 90})


def test_published_row_and_limits():
    table = dsae.judge_protocol_table({})
    assert table.loc[dsae.PUBLISHED_ROW].tolist() == ["90.73", "8.384", "0.072", "2.192"]
    assert table.loc["limit", "H(y)"] == "2.197"


@pytest.fixture(scope="module")
def judge():
    """The smoke profile's judge as every evaluation gets it: trained into its cache under runs/ when missing (as on a
    fresh clone), else loaded from there, so a test session trains it once."""
    config = dsae.judge_config("smoke")
    judge, accuracy = dsae.train_judge(config, progress=False)
    return judge, accuracy, config


def test_smoke_judge_reads_real_test_sequences(judge):
    """Trained on 200 real training characters, the judge reads held-out characters far above chance: measured here
    on the real test split, whether it was just trained or loaded from its cache, and as its file records it."""
    model, accuracy, config = judge
    assert config.test_limit == 135 and config.train_limit == 1800
    measured = dsae.judge_accuracy(model, dsae.load_sprites("test"), config.test_limit)
    assert measured == pytest.approx(accuracy, abs=0.01)  # to a few sequences where another CPU's rounding differs
    accuracy = measured
    assert accuracy["motion"] > 0.95
    for head in dsae.ATTRIBUTES:
        assert accuracy[head] > 0.8, (head, accuracy)


def test_judge_is_reused_not_retrained(judge, tmp_path, monkeypatch):
    first, accuracy, config = judge
    path = tmp_path / "judge.pt"
    dsae._atomic_save({"model": first.state_dict(), "test_accuracy": accuracy}, path)
    monkeypatch.setattr(dsae, "Batches", lambda *a, **k: pytest.fail("the saved judge was retrained"))
    again, acc2 = dsae.train_judge(config, path=path)
    assert acc2 == accuracy and again.sha256 == dsae.sha256(path)
    x = dsae.to_model_input(dsae.load_sprites("test").frames[:5])
    with torch.no_grad():
        assert all(torch.equal(first(x)[h], again(x)[h]) for h in dsae.HEADS)


def test_evaluate_is_deterministic_and_complete(judge):
    judge_model = judge[0]
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke")).eval()
    test = dsae.load_sprites("test")
    rng = torch.get_rng_state()
    rows, confusions = dsae.evaluate(model, judge_model, test, seeds=(0, 1), limit=45, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # sampling uses local generators, never the global RNG
    torch.manual_seed(123)
    again, _ = dsae.evaluate(model, judge_model, test, seeds=(0, 1), limit=45, progress=False)
    assert rows == again
    given, _ = dsae.evaluate(model, judge_model, test, seeds=(0, 1), limit=45, progress=False,
                             codes=dsae.encode_all(model, test, 45))  # codes computed once by the caller
    assert given == rows
    assert all(0.0 <= rows[0][f"recon: {h}"] <= 1.0 for h in dsae.HEADS)  # the judge on reconstructions
    assert rows[0]["recon: motion"] == rows[1]["recon: motion"]  # reconstructions draw no noise
    assert [r["seed"] for r in rows] == [0, 1]
    for key in ("f kept: skin", "f kept: attributes", "z kept: motion", "swap: attributes of a", "swap: motion of b"):
        assert 0.0 <= rows[0][key] <= 1.0
    assert 1.0 <= rows[0]["z kept: IS"] <= 9.0
    assert rows[0]["recon PSNR"] == pytest.approx(10 * np.log10(1 / rows[0]["recon MSE"]))
    assert np.asarray(confusions["motion"]).shape == (9, 9) and np.asarray(confusions["skin"]).shape == (6, 6)
    assert np.asarray(confusions["motion"]).sum(1).tolist() == [5] * 9  # 45 sequences = 5 characters x 9 motions
    assert np.trace(confusions["motion"]) / 45 == pytest.approx(rows[0]["z kept: motion"])  # first seed's counts
    for h in dsae.HEADS:  # the reconstructions' matrices count what the ceiling measures
        assert np.trace(confusions[f"recon: {h}"]) / 45 == pytest.approx(rows[0][f"recon: {h}"])
    readings = dsae.attribute_readings(model, {"j": judge_model}, test, limit=45)  # the same draws as seed 0
    for a in dsae.ATTRIBUTES:
        assert readings.loc["j", f"f kept: {a} %"] == pytest.approx(100 * rows[0][f"f kept: {a}"])
        assert readings.loc["j", f"recon: {a} %"] == pytest.approx(100 * rows[0][f"recon: {a}"])
    summary = dsae.summarise(rows)
    assert summary.loc["z kept: IS", "mean"] == pytest.approx(np.mean([r["z kept: IS"] for r in rows]))
    tempered = dsae.prior_temperature_readings(model, judge_model, test, temperatures=(1.0, 0.0), limit=45)
    for a in dsae.ATTRIBUTES:  # temperature 1 and another sequence's z are the paper's test and the swap of seed 0
        assert tempered.loc["z ~ p(z), temperature 1", a] == pytest.approx(100 * rows[0][f"f kept: {a}"])
        assert tempered.loc["z of another sequence", a] == pytest.approx(100 * rows[0][f"swap: {a} of a"])
        assert tempered.loc["z of the sequence (reconstruction)", a] == pytest.approx(100 * rows[0][f"recon: {a}"])


def test_prior_at_temperature_zero_is_its_mean_path_and_one_is_the_prior():
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke")).eval()
    draw = lambda seed, tau: model.sample_z(3, generator=torch.Generator().manual_seed(seed), temperature=tau)
    with torch.no_grad():
        assert torch.equal(draw(0, 0.0), draw(1, 0.0)) and torch.equal(draw(0, 0.0)[0], draw(0, 0.0)[2])
        assert torch.equal(draw(0, 1.0), model.sample_z(3, generator=torch.Generator().manual_seed(0)))
        assert not torch.equal(draw(0, 1.0), draw(1, 1.0))
        mean, _ = model.prior_z.head(model.prior_z.lstm(torch.zeros(1, 1, 8))[0])
        torch.testing.assert_close(draw(0, 0.0)[:1, :1], mean)
        spread = lambda tau: (draw(0, tau)[:, 0] - mean[0]).abs().mean()  # the first step: the same noise, scaled
        torch.testing.assert_close(spread(0.5), spread(1.0) / 2)


@pytest.mark.parametrize("source", ["z", "f"])
def test_motion_source_names_the_code_the_motion_comes_from(judge, test_split, monkeypatch, source):
    """motion_source: with a decoder that draws the real sequence whose z (or whose f) it is given, the judge reads
    z's motion (or f's) in the swap, for the motion and for each factor, over the pairs the swap of `evaluate` makes
    (sampling seed 1) where the two sequences differ in it."""
    n = 45  # 5 characters x 9 motions
    index = torch.arange(n, dtype=torch.float32)
    monkeypatch.setattr(dsae, "encode_all", lambda model, data, limit=None: (index[:, None], index[:, None, None]
                                                                            .expand(-1, dsae.T, 1)))
    frames = dsae.to_model_input(test_split.frames[:n])
    drawn = (lambda f, z: frames[z[:, 0, 0].long()]) if source == "z" else (lambda f, z: frames[f[:, 0].long()])
    monkeypatch.setattr(dsae, "_decode_all", lambda model, f, z: drawn(f, z))
    model = dsae.DSAE(dsae.make_config("smoke"))
    table = dsae.motion_source(model, judge[0], test_split, limit=n, seed=1)
    perm = dsae.swap_partners(n, 1)
    action, direction = dsae.decode_motion(test_split.motion[:n])
    assert table.loc["motion", "pairs"] == (test_split.motion[:n] != test_split.motion[:n][perm]).sum()
    assert table.loc["action", "pairs"] == (action != action[perm]).sum() > 0
    assert table.loc["direction", "pairs"] == (direction != direction[perm]).sum() > 0
    other = "f" if source == "z" else "z"
    for factor in ("motion", "action", "direction"):
        row = table.loc[factor]
        assert row[f"% from {source}"] > 90 and row[f"% from {other}"] < 10, (factor, row)
        assert row["% from z"] + row["% from f"] + row["% neither"] == pytest.approx(100)


def test_kl_per_step_splits_the_elbo_kl_terms_by_step_and_action(test_split):
    """kl_per_step: its steps add up to the ELBO's KL_z and its KL_f is the ELBO's, for the same posterior draws
    (one batch: the global RNG seeded as the local generator is); each step sums over z's dimensions (z_dim 5, not
    T), each action's column averages that action's sequences, and the global RNG is not touched."""
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke", z_dim=5)).eval()
    n = 27  # 3 characters x 9 motions
    rng = torch.get_rng_state()
    table = dsae.kl_per_step(model, test_split, limit=n, seed=3, batch_size=n)
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(table.index) == [f"KL_z, t = {t}" for t in range(1, dsae.T + 1)] + ["KL_f"]
    assert list(table.columns) == ["all", *dsae.ACTIONS]
    x = dsae.to_model_input(test_split.frames[:n])
    torch.manual_seed(3)
    with torch.no_grad(), dsae._autocast(model.device, model.config.bf16):
        terms = dsae.elbo_terms(model, x)
        post = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        prior = model.prior_z(post.z)
    assert table["all"].iloc[:-1].sum() == pytest.approx(float(terms["kl_z"]), rel=1e-4)
    assert table.loc["KL_f", "all"] == pytest.approx(float(terms["kl_f"]), rel=1e-4)
    per_sequence = dsae.kl_normal(post.z_mean.float(), post.z_logvar.float(), *(p.float() for p in prior)).sum(-1)
    action = np.asarray(test_split.action[:n])
    for k, name in enumerate(dsae.ACTIONS):  # (n, T) per sequence and step, averaged over that action's sequences
        expected = per_sequence[torch.from_numpy(action == k)].mean(0).numpy()
        np.testing.assert_allclose(table[name].iloc[:-1].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    assert table[list(dsae.ACTIONS)].nunique(axis=1).min() > 1  # the actions' columns are read apart


def test_judge_trains_on_the_data_it_is_given(train, test_split, monkeypatch, tmp_path):
    """Data passed in is what the judge uses: nothing is loaded, and without a cache key nothing is saved."""
    monkeypatch.setattr(dsae, "load_sprites", lambda *a, **k: pytest.fail("train_judge loaded data itself"))
    small = dsae.Sprites(train.frames[:90], train.character[:90], train.attributes[:90], train.action[:90],
                         train.direction[:90])
    config = dsae.JudgeConfig(width=4, epochs=1, train_limit=90, test_limit=18)
    judge, accuracy = dsae.train_judge(config, small, test_split, progress=False)
    assert set(accuracy) == set(dsae.HEADS) and not list((dsae.ROOT / "runs").glob("judge-None*"))
    assert judge.sha256 is None  # no file, so nothing to name it by
    saved, _ = dsae.train_judge(config, small, test_split, path=tmp_path / "j.pt", progress=False)
    assert (tmp_path / "j.pt").is_file() and saved.sha256 == dsae.sha256(tmp_path / "j.pt")


def test_judge_under_blur_measures_real_sequences_made_less_sharp(judge):
    """The blur keeps a flat frame, removes detail as sigma grows, and the judge is read on the blurred real split."""
    flat = torch.full((1, 2, 3, 64, 64), 0.25)
    torch.testing.assert_close(dsae.gaussian_blur(flat, 1.0), flat)
    x = dsae.to_model_input(dsae.load_sprites("test").frames[:2])
    assert (dsae.gaussian_blur(x, 1.0) - x).abs().mean() > (dsae.gaussian_blur(x, 0.3) - x).abs().mean() > 0
    table = dsae.judge_under_blur(judge[0], dsae.load_sprites("test"), sigmas=(0.3, 1.5), limit=45)
    assert list(table.index) == [0.3, 1.5] and table.loc[0.3, "PSNR dB"] > table.loc[1.5, "PSNR dB"]
    assert all(0 <= v <= 100 for h in dsae.HEADS for v in table[f"{h} %"])
    probs = dsae.judge_probs(judge[0], dsae.gaussian_blur(dsae.to_model_input(dsae.load_sprites("test").frames[:45]), 1.5))
    assert table.loc[1.5, "motion %"] == pytest.approx(100 * np.mean(probs["motion"].argmax(1) ==
                                                                     dsae.load_sprites("test").motion[:45]))


def test_a_judge_trained_with_blur_sees_blurred_batches_under_its_own_key(train, test_split):
    """blur > 0 changes what the judge is trained on (same data and seed, other weights) and its cache key; a
    judge without blur keeps the key of the judges cached before the option existed."""
    small = dsae.Sprites(train.frames[:90], train.character[:90], train.attributes[:90], train.action[:90],
                         train.direction[:90])
    plain = dsae.JudgeConfig(width=4, epochs=1, train_limit=90, test_limit=18)
    blurred = dsae.JudgeConfig(width=4, epochs=1, train_limit=90, test_limit=18, blur=1.0)
    assert plain.key() == hashlib.sha256(
        b"JudgeConfig(width=4, epochs=1, batch_size=50, lr=0.001, train_limit=90, test_limit=18, seed=0)").hexdigest()[:8]
    assert blurred.key() != plain.key()
    a, _ = dsae.train_judge(plain, small, test_split, progress=False)
    b, _ = dsae.train_judge(blurred, small, test_split, progress=False)
    again, _ = dsae.train_judge(blurred, small, test_split, progress=False)
    assert not torch.equal(a.attributes.weight, b.attributes.weight)
    assert torch.equal(b.attributes.weight, again.attributes.weight)  # the blur draws are seeded


class _PixelCodes(torch.nn.Module):
    """A stand-in encoder with known content: f is the real frames pooled to 4x4 and averaged over time (it holds the
    colours and the layout), z_1:T is all zeros (it holds nothing)."""
    config = dsae.make_config("smoke")
    device = torch.device("cpu")

    def encode(self, x, sample=True):
        f = torch.nn.functional.avg_pool2d(x.flatten(0, 1), 16).reshape(len(x), x.shape[1], -1).mean(1)
        z = torch.zeros(len(x), x.shape[1], 2)
        return dsae.Posterior(f, f, f, z, z, z)


def test_latent_probe_reads_what_a_code_holds_and_nothing_from_an_empty_one(train, test_split):
    """Fitted on training codes, scored on test codes: pixel codes read hair and motion; a constant code can do no
    better than the largest test class, and exactly chance on the balanced motion."""
    table = dsae.latent_probe(_PixelCodes(), train, test_split, train_limit=900, limit=270)
    assert list(table.index) == ["f", "z_1:T"] and list(table.columns) == list(dsae.HEADS)
    assert table.loc["f", "hair"] >= 95 and table.loc["f", "motion"] >= 95
    labels = dsae.labels_of(test_split)
    for h in dsae.HEADS:
        assert table.loc["z_1:T", h] <= 100 * np.bincount(labels[h][:270]).max() / 270 + 1e-9
    assert table.loc["z_1:T", "motion"] == pytest.approx(100 / 9)
    given = dsae.latent_probe(_PixelCodes(), train, test_split, train_limit=900, limit=270,
                              test_codes=dsae.encode_all(_PixelCodes(), test_split, 270))
    assert given.equals(table)


def test_latent_probe_stages_follow_a_factor_from_the_frames_to_a_sample_of_f(train, test_split):
    """With stages: h (the encoder's features) of an untrained model still reads hair from the real frames, while a
    sample of its q(f|x) (unit variance at initialisation) reads no head above chance; the samples come from the
    local generator `seed`, and only that row depends on it."""
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke", q_z="full")).eval()
    table = dsae.latent_probe(model, train, test_split, train_limit=540, limit=270, stages=True)
    assert list(table.index) == ["h", "f", "f sample", "z_1:T"] and list(table.columns) == list(dsae.HEADS)
    assert table.loc["h", "hair"] >= 80 and table.loc["h", "motion"] >= 95
    # the mean of f still reads the motion well above its samples (47 % against 11 % in bf16, over 60 % in fp32)
    assert (table.loc["f sample"] <= 30).all() and table.loc["f", "motion"] >= table.loc["f sample", "motion"] + 25
    other = dsae.latent_probe(model, train, test_split, train_limit=540, limit=270, stages=True, seed=1)
    assert other.drop("f sample").equals(table.drop("f sample")) and not other.loc["f sample"].equals(table.loc["f sample"])


class _NoisyPixelCodes(_PixelCodes):
    """_PixelCodes with a posterior of known variance exp(logvar) around them."""

    def __init__(self, logvar):
        super().__init__()
        self.logvar = logvar

    def encode(self, x, sample=True):
        post = super().encode(x, sample)
        return post._replace(f_logvar=torch.full_like(post.f_mean, self.logvar))


def test_code_separation_keeps_apart_what_a_code_holds_and_counts_the_posterior_noise(test_split):
    """Pixel codes hold the pants colour: light grey (0) and dark green (5) pants are far apart (d'^2 >= 9) in the
    means. With a near-zero posterior variance the samples are as far apart as the means; a wide posterior pulls
    them together, and a constant code separates nothing."""
    exact = dsae.code_separation(_NoisyPixelCodes(-30.0), test_split, "pants", limit=270)
    assert list(exact.columns) == ["means", "samples"] and exact.index.names == ["pants a", "pants b"]
    assert exact.loc[(0, 5), "means"] >= 9
    assert np.allclose(exact["samples"], exact["means"], rtol=1e-3)
    noisy = dsae.code_separation(_NoisyPixelCodes(2.0), test_split, "pants", limit=270)
    assert noisy["means"].equals(exact["means"]) and (noisy["samples"] < 0.5 * noisy["means"]).all()

    class Constant(_NoisyPixelCodes):
        def encode(self, x, sample=True):
            post = super().encode(x, sample)
            return post._replace(f_mean=torch.ones_like(post.f_mean))

    assert (dsae.code_separation(Constant(0.0), test_split, "pants", limit=270).to_numpy() == 0).all()
    with pytest.raises(ValueError, match="'shoes' is not one of the Sprites attributes"):
        dsae.code_separation(Constant(0.0), test_split, "shoes", limit=270)


def test_colour_readout_reads_the_colour_drawn_where_each_layer_shows(test_split, sheets_dir):
    """The judge-free colour reading: real sequences read right; the same sequences redrawn with another pants
    variant (composed from the sheets) read as that variant, and their skin still reads right; a grey smear reads
    one variant for all (no more than the share of that variant)."""
    n = 45
    real = test_split.frames[:n]
    accuracy, table = dsae.colour_readout(real, test_split, sheets=sheets_dir)
    assert accuracy == {"skin": 100.0, "pants": 100.0} and (table["read %"] == 100).all()
    strips = dsae._strips(str(sheets_dir))
    other = []
    for i in range(n):
        skin, pants, top, hair = test_split.attributes[i]
        c = dsae.encode_character(skin, (pants + 2) % 6, top, hair)
        other.append(dsae.compose_character(strips, int(c))[int(test_split.motion[i])])
    accuracy, _ = dsae.colour_readout(np.stack(other), test_split, sheets=sheets_dir)
    assert accuracy == {"skin": 100.0, "pants": 0.0}
    grey = np.full_like(real, 110)
    accuracy, _ = dsae.colour_readout(grey, test_split, sheets=sheets_dir)
    assert max(accuracy.values()) <= 100 * max(np.bincount(test_split.attributes[:n, i]).max() / n for i in (0, 1))
    with pytest.raises(ValueError, match="'shoes' is not one of the Sprites attributes"):
        dsae.colour_readout(real, test_split, attributes=("skin", "shoes"), sheets=sheets_dir)


def test_diagnose_writes_the_study_file_of_a_diagnostic_and_grows_it(smoke_run, tmp_path, capsys):
    """`dsvae diagnose KIND RUN...` (the command behind study/kl-per-step.json, motion-source.json and
    latent-probe-fp32.json): the diagnostic's table of each run in fp32, named by its file and SHA-256, under the
    head that says what was read; a second run joins the file, and a file of another protocol is refused."""
    config, _ = smoke_run
    checkpoint = config.path / "checkpoint.pt"
    out = tmp_path / "kl.json"
    dsae.main(["diagnose", "kl-per-step", str(checkpoint), "--profile", "smoke", "--out", str(out)])
    got = json.loads(out.read_text())
    model, _ = dsae.load_checkpoint(checkpoint)
    model.config.bf16 = False
    table = dsae.kl_per_step(model, dsae.load_sprites("test"), 135)
    assert got["runs"]["checkpoint"]["table"] == json.loads(json.dumps(table.to_dict()))  # {group: {step: nats}}
    assert got["what"] == dsae.DIAGNOSES["kl-per-step"] and got["test sequences"] == 135
    assert got["runs"]["checkpoint"]["sha256"] == dsae.sha256(checkpoint)
    assert got["runs"]["checkpoint"]["arithmetic"].startswith("fp32 (")
    weights = dsae.export_weights(checkpoint, tmp_path / "w.pt")
    dsae.main(["diagnose", "kl-per-step", str(weights), "--profile", "smoke", "--out", str(out)])
    assert list(json.loads(out.read_text())["runs"]) == ["checkpoint", "w"]
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        dsae.main(["diagnose", "motion-source", str(weights), "--profile", "smoke", "--out", str(out)])
    assert "another judge, data" in capsys.readouterr().err and out.read_bytes() == before


@pytest.fixture
def smoke_record(smoke_metrics, tmp_path, monkeypatch):
    """The smoke profile with the session's metrics.json of record (`smoke_metrics`) as its record in a temp folder;
    evaluate_run counted, the code version held (patching evaluate_run is itself an edit of the evaluation code):
    (figures folder, calls)."""
    import dataclasses
    monkeypatch.setitem(dsae.PROFILES, "smoke", dataclasses.replace(dsae.get_profile("smoke"), figures=str(tmp_path)))
    monkeypatch.setenv("DSVAE_FIGURES", str(tmp_path))
    (tmp_path / "metrics.json").write_text(smoke_metrics)
    version, evaluate_run, calls = dsae.evaluation_code(), dsae.evaluate_run, []
    monkeypatch.setattr(dsae, "evaluation_code", lambda names=None: version)
    monkeypatch.setattr(dsae, "evaluate_run", lambda *a, **k: calls.append(a[2]) or evaluate_run(*a, **k))
    return tmp_path, calls


def test_a_stored_evaluation_is_reused_says_so_and_passes_its_spot_check(smoke_record, capsys, monkeypatch):
    folder, calls = smoke_record
    stored = json.loads((folder / "metrics.json").read_text())
    capsys.readouterr()
    again = dsae.evaluate_profile("smoke", progress=False)
    out = capsys.readouterr().out
    assert calls == [] and again["runs"] == stored["runs"]
    assert f"the stored evaluation in {folder / 'metrics.json'}" in out and "at commit" in out
    assert "largest difference from the stored numbers 0.00 points" in out  # same CPU, same arithmetic
    monkeypatch.setattr(dsae, "evaluate_run", lambda model, *a, **k: calls.append(a[1]) or dict(  # its computation
        stored["runs"][model.config.q_z]))
    monkeypatch.setattr(dsae, "spot_rows",  # the spot rows it would compute: not what this test checks
                        lambda model, *a, **k: stored["runs"][model.config.q_z]["spot check"]["rows"])
    dsae.evaluate_profile("smoke", progress=False, fresh=True)  # make report FRESH=1 recomputes
    assert len(calls) == len(stored["runs"]) == 2


@pytest.mark.parametrize("field", ["weights sha256", "judge sha256", "data", "test sequences", "seeds", "code"])
def test_a_stale_evaluation_is_recomputed_when_any_part_of_its_key_changes(smoke_record, field, monkeypatch):
    folder, calls = smoke_record
    path = folder / "metrics.json"
    stored = json.loads(path.read_text())
    runs = json.loads(json.dumps(stored["runs"]))
    stored["runs"]["factorised"]["evaluation key"][field] = "something else"
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(dsae, "evaluate_run", lambda model, *a, **k: calls.append(a[1]) or dict(  # what it computes
        runs[model.config.q_z]))
    monkeypatch.setattr(dsae, "spot_rows", lambda model, *a, **k: runs[model.config.q_z]["spot check"]["rows"])
    again = dsae.evaluate_profile("smoke", progress=False)
    assert [p.parent.name for p in calls] == ["smoke-factorised"]  # the other run is still reused
    assert again["runs"]["factorised"]["evaluation key"][field] != "something else"


def test_the_evaluation_code_version_follows_the_code_and_not_its_docstrings(monkeypatch):
    version = dsae.evaluation_code()
    assert set(dsae.EVALUATION_CODE) <= set(vars(dsae)) and len(version) == 12

    def summarise(rows):
        """Another docstring."""
        import pandas as pd
        df = pd.DataFrame(rows).drop(columns="seed")
        return pd.DataFrame({"mean": df.mean(), "std": df.std(ddof=1) if len(df) > 1 else 0.0})

    monkeypatch.setattr(dsae, "summarise", summarise)  # the same code, another docstring
    assert dsae.evaluation_code() == version

    def summarise(rows):  # noqa: F811 (an edited evaluation: another spread)
        import pandas as pd
        df = pd.DataFrame(rows).drop(columns="seed")
        return pd.DataFrame({"mean": df.mean(), "std": df.std(ddof=0)})

    monkeypatch.setattr(dsae, "summarise", summarise)
    assert dsae.evaluation_code() != version


@pytest.mark.parametrize("edit", ["spot check", "headline"])
def test_a_stored_evaluation_edited_by_two_points_fails_loudly(smoke_record, edit):
    folder, calls = smoke_record
    path = folder / "metrics.json"
    stored = json.loads(path.read_text())
    run = stored["runs"]["factorised"]
    if edit == "spot check":  # the stored numbers the spot check recomputes, and the digest made to match
        for row in run["spot check"]["rows"].values():
            row["z kept: motion"] += 0.02
        run["digest"] = dsae._digest(run)
        match = r"largest difference from the stored numbers 2\.00 points \(z kept: motion\); tolerance"
    else:  # a headline number
        run["summary"]["z kept: motion"]["mean"] += 0.02
        match = "changed after it was computed"
    path.write_text(json.dumps(stored))
    with pytest.raises(dsae.EvaluationError, match=match):
        dsae.evaluate_profile("smoke", progress=False)
    assert calls == []


def test_gap_diagnostics_are_stored_reused_while_their_key_holds_and_read_back_alike(smoke_run, tmp_path,
                                                                                        monkeypatch, capsys):
    """gap_diagnostics (notebook 04): computed once into diagnostics.json beside metrics.json, reused while the models,
    the judge, the data and the code hold, recomputed when any changes or when asked; tables with multi-level
    labels come back as they went."""
    import dataclasses
    import pandas as pd
    monkeypatch.setitem(dsae.PROFILES, "smoke", dataclasses.replace(dsae.get_profile("smoke"), figures=str(tmp_path)))
    monkeypatch.setenv("DSVAE_FIGURES", str(tmp_path))
    table = pd.DataFrame([[1.5, 2], [3.25, 4]], columns=pd.Index(["a %", "b"], name="what"),
                         index=pd.MultiIndex.from_tuples([("full", "x"), ("full", "y")], names=["q(z)", "z_1:T"]))
    calls = []
    monkeypatch.setattr(dsae, "_gap_tables", lambda *a: calls.append(a) or {"t": table})
    first = dsae.gap_diagnostics("smoke")
    pd.testing.assert_frame_equal(first["t"], table, check_dtype=False)
    assert len(calls) == 1 and "diagnostics computed now" in capsys.readouterr().out
    again = dsae.gap_diagnostics("smoke")
    pd.testing.assert_frame_equal(again["t"], table, check_dtype=False)
    assert len(calls) == 1 and "the stored diagnostics in" in capsys.readouterr().out
    stored = json.loads((tmp_path / "diagnostics.json").read_text())
    for field in ("judge sha256", "code", "weights sha256"):
        changed = {**stored, "key": {**stored["key"], field: "something else"}}
        (tmp_path / "diagnostics.json").write_text(json.dumps(changed))
        dsae.gap_diagnostics("smoke")
    assert len(calls) == 4
    dsae.gap_diagnostics("smoke", fresh=True)
    assert len(calls) == 5

"""The judge and the disentanglement metrics (smoke profile, real Sprites data)."""
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


def test_published_row_and_limits():
    table = dsae.judge_protocol_table({})
    assert table.loc["DSVAE (published)"].tolist() == ["90.73", "8.384", "0.072", "2.192"]
    assert table.loc["limit", "H(y)"] == "2.197"


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    config = dsae.judge_config("smoke")
    judge, accuracy = dsae.train_judge(config, path=tmp_path_factory.mktemp("judge") / "judge.pt", progress=False)
    return judge, accuracy, config


def test_smoke_judge_reads_real_test_sequences(judge):
    """Trained on 200 real training characters, the judge reads held-out characters far above chance."""
    _, accuracy, config = judge
    assert config.test_limit == 270 and config.train_limit == 1800
    assert accuracy["motion"] > 0.95
    for head in dsae.ATTRIBUTES:
        assert accuracy[head] > 0.8, (head, accuracy)


def test_judge_is_reused_not_retrained(judge, tmp_path, monkeypatch):
    first, accuracy, config = judge
    path = tmp_path / "judge.pt"
    dsae._atomic_save({"model": first.state_dict(), "test_accuracy": accuracy}, path)
    monkeypatch.setattr(dsae, "Batches", lambda *a, **k: pytest.fail("the saved judge was retrained"))
    again, acc2 = dsae.train_judge(config, path=path)
    assert acc2 == accuracy
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
    summary = dsae.summarise(rows)
    assert summary.loc["z kept: IS", "mean"] == pytest.approx(np.mean([r["z kept: IS"] for r in rows]))


def test_judge_trains_on_the_data_it_is_given(train, test_split, monkeypatch, tmp_path):
    """Data passed in is what the judge uses: nothing is loaded, and without a cache key nothing is saved."""
    monkeypatch.setattr(dsae, "load_sprites", lambda *a, **k: pytest.fail("train_judge loaded data itself"))
    small = dsae.Sprites(train.frames[:90], train.character[:90], train.attributes[:90], train.action[:90],
                         train.direction[:90])
    config = dsae.JudgeConfig(width=4, epochs=1, train_limit=90, test_limit=18)
    judge, accuracy = dsae.train_judge(config, small, test_split, progress=False)
    assert set(accuracy) == set(dsae.HEADS) and not list((dsae.ROOT / "runs").glob("judge-None*"))
    dsae.train_judge(config, small, test_split, path=tmp_path / "j.pt", progress=False)
    assert (tmp_path / "j.pt").is_file()

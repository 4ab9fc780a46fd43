"""The DSAE model, its ELBO and the training loop (smoke profile on the real Sprites data)."""
import json

import numpy as np
import pytest
import torch

import dsvae_lib as dsae


def conv(c_in, c_out, k=5):
    return c_in * c_out * k * k + c_out


def lin(d_in, d_out):
    return d_in * d_out + d_out


def lstm(d_in, h, directions=1):
    return directions * 4 * (d_in * h + h * h + 2 * h)


def expected_counts(c):
    """Parameter counts written out from the architecture of the paper (BatchNorm: 2 per channel)."""
    ch, bn = c.channels, lambda n: 2 * n
    encoder = (conv(3, ch) + 3 * conv(ch, ch) + 4 * bn(ch) + lin(64 * ch, c.enc_hidden) + bn(c.enc_hidden)
               + lin(c.enc_hidden, c.frame_dim) + bn(c.frame_dim))
    q_f = lstm(c.frame_dim, c.rnn_hidden, 2) + 2 * lin(2 * c.rnn_hidden, c.f_dim)
    if c.q_z == "factorised":
        q_z = lin(c.frame_dim, c.rnn_hidden) + 2 * lin(c.rnn_hidden, c.z_dim)
    else:
        rnn = 2 * c.rnn_hidden * c.rnn_hidden + c.rnn_hidden * c.rnn_hidden + 2 * c.rnn_hidden
        q_z = lstm(c.frame_dim + c.f_dim, c.rnn_hidden, 2) + rnn + 2 * lin(c.rnn_hidden, c.z_dim)
    prior = lstm(c.z_dim, c.rnn_hidden) + 2 * lin(c.rnn_hidden, c.z_dim)
    decoder = (lin(c.f_dim + c.z_dim, c.dec_hidden) + bn(c.dec_hidden) + lin(c.dec_hidden, 64 * ch) + bn(64 * ch)
               + 3 * (conv(ch, ch) + bn(ch)) + conv(ch, 3))
    return {"encoder": encoder, "q_f": q_f, "q_z": q_z, "prior_z": prior, "decoder": decoder}


@pytest.mark.parametrize("profile", ["paper", "cpu", "smoke"])
@pytest.mark.parametrize("q_z", ["factorised", "full"])
def test_parameter_counts(profile, q_z):
    config = dsae.make_config(profile, q_z=q_z)
    with torch.device("meta"):
        counts = dsae.parameter_counts(dsae.DSAE(config))
    expected = expected_counts(config)
    assert {k: counts[k] for k in expected} == expected
    if profile == "paper":  # the paper's model is about 177M parameters with the full q(z|x)
        assert 160e6 < counts["total"] < 180e6


@pytest.mark.parametrize("profile", ["paper", "smoke"])
@pytest.mark.parametrize("q_z", ["factorised", "full"])
def test_shapes_of_every_module(profile, q_z):
    c = dsae.make_config(profile, q_z=q_z)
    table = dsae.trace_shapes(c, batch=3).set_index("module")
    frames = 3 * dsae.T
    assert table.loc["encoder.conv.0", "output"] == (frames, c.channels, 64, 64)
    assert [table.loc[f"encoder.conv.{i}", "output"][2] for i in (3, 6, 9)] == [32, 16, 8]
    assert table.loc["encoder.fc.3", "output"] == (frames, c.frame_dim)
    assert table.loc["q_f.head.mean", "output"] == (3, c.f_dim)
    assert table.loc["q_z.head.logvar", "output"] == (3, dsae.T, c.z_dim)
    assert table.loc["decoder.fc.0", "input"] == (frames, c.f_dim + c.z_dim)
    assert table.loc["decoder.fc.3", "output"] == (frames, 64 * c.channels)
    assert [table.loc[f"decoder.deconv.{i}", "output"][2] for i in (0, 3, 6)] == [16, 32, 64]
    assert table.loc["decoder.deconv.10", "output"] == (frames, 3, 64, 64)
    assert table.loc["prior_z.head.mean", "output"] == (3, dsae.T, c.z_dim)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp = (torch.randn(64, 7, generator=g) for _ in range(4))
    q = torch.distributions.Normal(mq, torch.exp(0.5 * lq))
    p = torch.distributions.Normal(mp, torch.exp(0.5 * lp))
    std = torch.distributions.Normal(torch.zeros_like(mq), torch.ones_like(mq))
    torch.testing.assert_close(dsae.kl_normal(mq, lq, mp, lp), torch.distributions.kl_divergence(q, p))
    torch.testing.assert_close(dsae.kl_normal(mq, lq), torch.distributions.kl_divergence(q, std))


@pytest.fixture(scope="module")
def batch():
    return dsae.to_model_input(dsae.load_sprites("train").frames[:4])


@pytest.mark.parametrize("q_z", ["factorised", "full"])
def test_prior_is_evaluated_on_the_posterior_samples(batch, q_z):
    """KL_z compares q(z_t|.) with p(z_t | z_<t) where z_<t are the posterior samples of the same sequence."""
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke", q_z=q_z))
    seen = {}
    model.prior_z.register_forward_hook(lambda m, args, out: seen.update(prior_input=args[0]))
    encode = model.encode
    model.encode = lambda x, sample=True, f_views=None: seen.setdefault("post", encode(x, sample, f_views=f_views))
    terms = dsae.elbo_terms(model, batch)
    post = seen["post"]
    assert torch.equal(seen["prior_input"], post.z)
    mean_p, logvar_p = model.prior_z(post.z)
    expected = dsae.kl_normal(post.z_mean, post.z_logvar, mean_p, logvar_p).sum() / len(batch)
    torch.testing.assert_close(terms["kl_z"], expected)


def test_prior_is_causal_and_starts_from_zero():
    """p(z_t | z_<t): step t sees z_1..z_{t-1} only; step 1 sees z_0 = 0, whatever the sequence."""
    torch.manual_seed(0)
    prior = dsae.DynamicsPrior(dsae.make_config("smoke"))
    z = torch.randn(2, dsae.T, 8)
    mean, _ = prior(z)
    z2 = z.clone()
    z2[:, 3] += 1.0
    mean2, _ = prior(z2)
    torch.testing.assert_close(mean[:, :4], mean2[:, :4])
    assert not torch.allclose(mean[:, 4:], mean2[:, 4:])
    first, _ = prior.head(prior.lstm(torch.zeros(2, 1, 8))[0])
    torch.testing.assert_close(mean[:, :1], first)


def test_one_step_lowers_the_loss(batch):
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss():
        torch.manual_seed(1)  # the same reparameterisation noise before and after the step
        return dsae.elbo_terms(model, batch)["loss"]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_generation_keeps_what_it_promises(batch):
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke", q_z="full")).eval()
    with torch.no_grad():
        post = model.encode(batch, sample=False)
    x, f, z = model.generate("f", batch)
    assert torch.equal(f, post.f) and not torch.allclose(z, post.z) and x.shape == batch.shape
    x, f, z = model.generate("z", batch)
    assert torch.equal(z, post.z) and not torch.allclose(f, post.f)
    swapped = model.swap(batch[:2], batch[2:])
    torch.testing.assert_close(swapped, model.decode(post.f[:2], post.z[2:]))
    f, z = model.sample_f(3), model.sample_z(3)
    assert model.decode(f, z).shape == (3, dsae.T, 3, 64, 64) and f.shape == (3, 16) and z.shape == (3, dsae.T, 8)
    with pytest.raises(ValueError, match="fix must be"):
        model.generate("x", batch)


@pytest.mark.parametrize("q_z", ["factorised", "full"])
def test_mirror_invariant_content_is_blind_to_left_and_right_only(batch, q_z):
    """f_mirror: q(f|x) = q(f|mirror of x) exactly, so the facing can only reach the decoder through z; z still sees
    it, and without f_mirror f does too. The option adds no parameters (warm starts cross it)."""
    torch.manual_seed(0)
    plain = dsae.DSAE(dsae.make_config("smoke", q_z=q_z)).eval()
    model = dsae.DSAE(dsae.make_config("smoke", q_z=q_z, f_mirror=True)).eval()
    model.load_state_dict(plain.state_dict())
    with torch.no_grad():
        post, mirrored = model.encode(batch, sample=False), model.encode(batch.flip(-1), sample=False)
        plain_post, plain_mirrored = plain.encode(batch, sample=False), plain.encode(batch.flip(-1), sample=False)
    torch.testing.assert_close(mirrored.f_mean, post.f_mean)
    torch.testing.assert_close(mirrored.f_logvar, post.f_logvar)
    assert not torch.allclose(mirrored.z, post.z, atol=1e-4)
    assert not torch.allclose(plain_mirrored.f, plain_post.f, atol=1e-4)
    assert not torch.allclose(post.f, plain_post.f, atol=1e-4)  # it reads both images, not x alone


def test_partners_are_other_sequences_of_the_same_character():
    """f_partner's draw: for each sequence another of its character (in Sprites one of its other 8 motions), each
    of them drawn, reproducible from the generator; a character with no other sequence is its own partner."""
    data = dsae.load_sprites("train")
    character, motion = np.asarray(data.character), np.asarray(data.motion)
    idx = torch.arange(0, 900, 9)  # 100 characters
    draws = torch.stack([dsae.partners(character, idx, torch.Generator().manual_seed(s)) for s in range(40)])
    assert (character[draws.numpy()] == character[idx.numpy()]).all() and (draws != idx).all()
    assert all(len(set(motion[draws[:, i].numpy()])) == 8 for i in range(3))  # the other 8 motions, not its own
    assert torch.equal(draws[0], dsae.partners(character, idx, torch.Generator().manual_seed(0)))
    assert not torch.equal(draws[0], draws[1])
    lonely = np.array([5, 5, 7])  # character 7 has one sequence
    assert dsae.partners(lonely, torch.tensor([0, 1, 2])).tolist() == [1, 0, 2]


@pytest.mark.parametrize("mirror", [False, True])
def test_partner_content_reads_the_partner_in_training_and_x_in_evaluation(batch, mirror):
    """f_partner (beyond the paper, weakly supervised): given a partner, q(f|x) reads the partner's frames (with
    f_mirror, and their mirror image) and q(z|x) reads x; without one, as in evaluation, the model is the one without
    f_partner. No parameters are added."""
    torch.manual_seed(0)
    plain = dsae.DSAE(dsae.make_config("smoke", q_z="factorised", f_mirror=mirror)).eval()
    model = dsae.DSAE(dsae.make_config("smoke", q_z="factorised", f_mirror=mirror, f_partner=True)).eval()
    model.load_state_dict(plain.state_dict())
    partner = batch.flip(0)  # each sequence's partner: another of the batch
    with torch.no_grad():
        h, h_f = model.features(batch, dsae.content_views(model.config, batch, partner))
        torch.testing.assert_close(h, plain.features(batch)[0])  # z reads x
        torch.testing.assert_close(h_f, plain.features(partner)[1])  # f reads the partner
        assert not torch.allclose(h_f, plain.features(batch)[1], atol=1e-4)
        for got, want in zip(model.features(batch), plain.features(batch)):  # evaluation: q(f|x) reads x
            torch.testing.assert_close(got, want)
        post = model.encode(batch, sample=False, f_views=dsae.content_views(model.config, batch, partner))
        torch.testing.assert_close(post.z_mean, plain.encode(batch, sample=False).z_mean)  # factorised: x's own z
        torch.testing.assert_close(post.f_mean, plain.encode(partner, sample=False).f_mean)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not dsae.faithful_to_paper(model.config.__dict__)


def test_partner_training_draws_partners_by_seed_and_epoch(tmp_path):
    """A run with f_partner trains on partners drawn afresh each epoch, fixed by (seed, epoch): two runs agree, and
    they differ from the run without it."""
    _, a = dsae.train(smoke(tmp_path, "a", f_partner=True, epochs=1), progress=False)
    _, b = dsae.train(smoke(tmp_path, "b", f_partner=True, epochs=1), progress=False)
    _, plain = dsae.train(smoke(tmp_path, "plain", epochs=1), progress=False)
    assert a[0]["loss"] == b[0]["loss"] and a[0]["test_loss"] == b[0]["test_loss"]
    assert a[0]["loss"] != plain[0]["loss"]


def test_mirror_features_are_normalised_alike_in_training_and_evaluation(batch):
    """f_mirror: x and its mirror image go through the encoder as one batch, so BatchNorm's running statistics are
    those the training batches were normalised with; two separate passes (each normalised by its own batch) give
    an evaluation-mode encoder, and so a held-out ELBO, that training never saw (measured: max difference 1.1)."""
    torch.manual_seed(0)
    model = dsae.DSAE(dsae.make_config("smoke", f_mirror=True))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # running statistics = those of this one batch
    encoder = model.encoder
    with torch.no_grad():
        trained = model.train().features(batch)
        evaluated = model.eval().features(batch)
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            bn.reset_running_stats()
        two_passes = encoder.train()(batch), encoder(batch.flip(-1))  # what one pass each would have seen
        two_passes_evaluated = encoder.eval()(batch)
    for a, b in zip(trained, evaluated):  # equal up to the unbiased variance of the running statistics
        torch.testing.assert_close(a, b, rtol=0, atol=0.1)
    assert (two_passes[0] - two_passes_evaluated).abs().max() > 0.5  # the failure this guards against


def smoke(tmp_path, name, **overrides):
    return dsae.make_config("smoke", run_dir=str(tmp_path / name), **overrides)


def test_training_writes_metrics_and_resumes_exactly(tmp_path, monkeypatch):
    """An interrupted run, rerun, ends with the same numbers as an uninterrupted one."""
    _, full = dsae.train(smoke(tmp_path, "full"), progress=False)
    assert len(full) == 2 and all(np.isfinite(row["loss"]) for row in full)
    assert json.loads((tmp_path / "full" / "metrics.json").read_text()) == full
    assert (tmp_path / "full" / "metrics.csv").read_text().startswith("epoch,loss,recon,kl_f,kl_z")
    arithmetic = "bf16" if dsae.bf16_supported("cpu") else "fp32"  # each row says what its wall time was measured on
    assert all(row["processor"] == dsae.processor_name("cpu") != "" and row["arithmetic"] == arithmetic for row in full)

    calls = {"n": 0}
    elbo = dsae.elbo_terms

    def killed_in_epoch_two(model, x, f_views=None):
        calls["n"] += 1
        if calls["n"] == 8 + 3:  # 8 batches per epoch: die during the third batch of epoch 2
            raise KeyboardInterrupt
        return elbo(model, x, f_views)

    monkeypatch.setattr(dsae, "elbo_terms", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        dsae.train(smoke(tmp_path, "resumed"), progress=False)
    monkeypatch.setattr(dsae, "elbo_terms", elbo)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    _, resumed = dsae.train(smoke(tmp_path, "resumed"), progress=False)
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in ("seconds", "seq_per_s")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "seq_per_s")}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = smoke(tmp_path, "nan", epochs=1)
    dsae.train(config, progress=False)
    good = (tmp_path / "nan" / "checkpoint.pt").read_bytes()
    elbo = dsae.elbo_terms

    def nan_loss(model, x, f_views=None):
        terms = elbo(model, x, f_views)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(dsae, "elbo_terms", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        dsae.train(smoke(tmp_path, "nan", epochs=2), progress=False)
    assert (tmp_path / "nan" / "checkpoint.pt").read_bytes() == good


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        dsae.make_config("fast")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['width'\]"):
        dsae.make_config("smoke", width=3)
    with pytest.raises(ValueError, match="q_z must be"):
        dsae.make_config("smoke", q_z="lstm")
    dsae.train(smoke(tmp_path, "run", epochs=1), progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        dsae.train(smoke(tmp_path, "run", epochs=1, lr=0.5), progress=False)


def test_profiles():
    paper = dsae.make_config("paper")
    assert (paper.f_dim, paper.z_dim, paper.channels, paper.rnn_hidden, paper.batch_size, paper.lr,
            paper.epochs) == (256, 32, 256, 512, 25, 2e-4, 200)
    gpu = dsae.make_config("gpu")
    assert {k: v for k, v in gpu.__dict__.items() if k not in ("profile", "epochs")} == \
           {k: v for k, v in paper.__dict__.items() if k not in ("profile", "epochs")}
    assert dsae.make_config("cpu", epochs=3).epochs == 3


def test_command_line_trains_with_overrides(tmp_path):
    import subprocess
    import sys
    run = tmp_path / "cli"
    out = subprocess.run([sys.executable, str(dsae.ROOT / "dsvae_lib.py"), "train", "--profile", "smoke", "--set",
                          f"run_dir={run}", "epochs=1", "q_z=full"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout[out.stdout.index("{"):])["epoch"] == 1
    assert json.loads((run / "config.json").read_text())["q_z"] == "full"
    bad = subprocess.run([sys.executable, str(dsae.ROOT / "dsvae_lib.py"), "train", "--profile", "smoke", "--set",
                          "widht=3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown config field(s) ['widht']" in bad.stderr


def test_retired_options_load_at_their_defaults_and_name_the_commit_that_runs_them(tmp_path):
    """A file written before an option's retirement (its config holds the field at its default, as the weights of
    record do) still loads; one that used a retired option is refused, naming the commit that still runs it; a field
    no version had is refused, naming the file and the field."""
    config = dsae.make_config("smoke")
    state = dsae.DSAE(config).state_dict()
    for extra, message in (({"f_film": False, "kl_warmup": 0.0}, None),
                           ({"f_first": True}, f"f_first=True, an option this version.*{dsae.RETIRED_AT}"),
                           ({"f_unheard_of": 1}, "f_unheard_of=1, which this version of dsvae_lib does not know")):
        path = tmp_path / "w.pt"
        torch.save({"config": {**config.__dict__, **extra}, "model": state, "epoch": 1, "history": []}, path)
        if message is None:
            assert dsae.load_checkpoint(path)[0].config == config
        else:
            with pytest.raises(dsae.CheckpointError, match=message):
                dsae.load_checkpoint(path)
    assert set(dsae.RETIRED) == {"f_first", "f_shuffle", "f_pool", "z_grey", "f_film", "kl_warmup"}
    assert not set(dsae.RETIRED) & set(dsae.Config.__dataclass_fields__)

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
    model.encode = lambda x, sample=True, partner=None: seen.setdefault("post", encode(x, sample, partner=partner))
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
    x, f, z = model.sample_prior(3)
    assert x.shape == (3, dsae.T, 3, 64, 64) and f.shape == (3, 16) and z.shape == (3, dsae.T, 8)
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


@pytest.mark.parametrize("mirror", [False, True])
def test_first_frame_content_reads_x1_only(batch, mirror):
    """f_first (beyond the paper): q(f|x) reads the first frame alone, so frames 2..T cannot reach f, while z still
    reads them; with f_mirror as well, f is blind to the facing too. No parameters are added (warm starts cross it)."""
    torch.manual_seed(0)
    plain = dsae.DSAE(dsae.make_config("smoke", q_z="full")).eval()
    model = dsae.DSAE(dsae.make_config("smoke", q_z="full", f_first=True, f_mirror=mirror)).eval()
    model.load_state_dict(plain.state_dict())
    later = batch.clone()
    later[:, 1:] = batch[:, 1:].flip(0)  # other sequences' frames 2..T
    with torch.no_grad():
        post, other = model.encode(batch, sample=False), model.encode(later, sample=False)
        plain_post, plain_other = plain.encode(batch, sample=False), plain.encode(later, sample=False)
        mirrored = model.encode(batch.flip(-1), sample=False)
    torch.testing.assert_close(other.f_mean, post.f_mean)
    torch.testing.assert_close(other.f_logvar, post.f_logvar)
    assert not torch.allclose(other.z[:, 1:], post.z[:, 1:], atol=1e-4)
    assert not torch.allclose(plain_other.f_mean, plain_post.f_mean, atol=1e-4)  # the paper's q(f|x) reads them all
    assert torch.allclose(mirrored.f_mean, post.f_mean, atol=1e-5) == mirror


@pytest.mark.parametrize("size", [8, 16])
def test_shuffle_patches_rearranges_each_frames_own_patches(batch, size):
    """shuffle_patches (f_shuffle): each frame's output patches are its own input patches, each used once, some
    flipped left-right; the layout changes, every frame draws its own order, and a seeded generator repeats."""
    x = batch[:2]
    out = dsae.shuffle_patches(x, size, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, dsae.shuffle_patches(x, size, torch.Generator().manual_seed(1)))

    def patches(v):  # (frames, patches, C * size * size)
        b, t, c, h, w = v.shape
        return v.reshape(b * t, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5).reshape(
            b * t, (h // size) * (w // size), c, size, size)

    src, dst = patches(x), patches(out)
    for s, d in zip(src, dst):  # the same patches, frame by frame, up to left-right flips
        sym = [(v + v.flip(-1)).flatten(1).unique(dim=0, return_counts=True) for v in (s, d)]
        torch.testing.assert_close(sym[0], sym[1])
    frame_src, frame_dst = src[0].flatten(1), dst[0].flatten(1)
    as_is = (frame_dst[:, None] == frame_src[None]).all(-1).any(1)
    as_mirror = (dst[0].flip(-1).flatten(1)[:, None] == frame_src[None]).all(-1).any(1)
    assert (as_mirror & ~as_is).any() and (as_is & ~as_mirror).any()  # some patches flipped, some not
    drawn = (src != -1).flatten(2).any(-1)  # patches with some of the character (the background is -1)
    moved = (src != dst).flatten(2).any(-1)
    assert moved[drawn].float().mean() > 0.6  # the layout is gone
    twin = dsae.shuffle_patches(x[:, :1].expand(-1, 2, -1, -1, -1), size, torch.Generator().manual_seed(1))
    assert not torch.equal(twin[:, 0], twin[:, 1])  # the same frame twice in a sequence: two draws
    twin = dsae.shuffle_patches(x[:1].expand(2, -1, -1, -1, -1), size, torch.Generator().manual_seed(1))
    assert not torch.equal(twin[0], twin[1])  # the same sequence twice in a batch: two draws


@pytest.mark.parametrize("shuffle", [0, 8])
def test_pooled_content_reads_each_frames_features_averaged_over_positions(batch, shuffle):
    """f_pool (beyond the paper): q(f|x) reads each frame (with f_shuffle, its shuffled view) through the encoder's
    feature map averaged over its 8x8 positions, not where on the map each feature is; z reads the frames as they
    are. No parameters are added."""
    torch.manual_seed(0)
    plain = dsae.DSAE(dsae.make_config("smoke", q_z="factorised")).eval()
    model = dsae.DSAE(dsae.make_config("smoke", q_z="factorised", f_pool=True, f_shuffle=shuffle)).eval()
    model.load_state_dict(plain.state_dict())
    enc, t = model.encoder, batch.shape[1]
    with torch.no_grad():
        h, h_f = model.features(batch)
        view = dsae.shuffle_patches(batch, shuffle, torch.Generator().manual_seed(0)) if shuffle else batch
        maps = enc.conv(view.flatten(0, 1))
        expected = enc.fc(maps.mean(dim=(-2, -1), keepdim=True).expand_as(maps).flatten(1)).view(*batch.shape[:2], -1)
        torch.testing.assert_close(h_f, expected)
        torch.testing.assert_close(h, plain.encoder(batch))  # z's frames are not pooled
        assert not torch.allclose(h_f, enc.fc(maps.flatten(1)).view_as(h_f), atol=1e-4)  # pooling changes the read
        post, plain_post = model.encode(batch, sample=False), plain.encode(batch, sample=False)
    torch.testing.assert_close(post.z_mean, plain_post.z_mean)
    assert not torch.allclose(post.f_mean, plain_post.f_mean, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("q_z", ["factorised", "full"])
def test_grey_dynamics_read_the_frames_luminance_and_content_their_colours(batch, q_z):
    """z_grey (beyond the paper): q(z|x) reads the frames in grey, so recolouring them without changing their
    luminance leaves z's features as they are; q(f|x) reads them in colour, as the paper's does. No parameters."""
    torch.manual_seed(0)
    plain = dsae.DSAE(dsae.make_config("smoke", q_z=q_z)).eval()
    model = dsae.DSAE(dsae.make_config("smoke", q_z=q_z, z_grey=True)).eval()
    model.load_state_dict(plain.state_dict())
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    y = (batch * luma).sum(-3, keepdim=True)
    torch.testing.assert_close(dsae.grey(batch), y.expand_as(batch))
    shift = torch.tensor([0.114, 0.0, -0.299])[:, None, None] * 0.5  # no change of luminance: 0.299 a + 0.114 c = 0
    recoloured = batch + shift
    with torch.no_grad():
        h, h_f = model.features(batch)
        h_re, h_f_re = model.features(recoloured)
        torch.testing.assert_close(h, plain.encoder(dsae.grey(batch)))
        torch.testing.assert_close(h_re, h)  # z reads no colour
        assert not torch.allclose(h_f_re, h_f, atol=1e-4)  # f does
        torch.testing.assert_close(h_f, plain.features(batch)[1])
        post, plain_post = model.encode(batch, sample=False), plain.encode(batch, sample=False)
    torch.testing.assert_close(post.f_mean, plain_post.f_mean)
    assert not torch.allclose(post.z_mean, plain_post.z_mean, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


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
        h, h_f = model.features(batch, partner)
        torch.testing.assert_close(h, plain.features(batch)[0])  # z reads x
        torch.testing.assert_close(h_f, plain.features(partner)[1])  # f reads the partner
        assert not torch.allclose(h_f, plain.features(batch)[1], atol=1e-4)
        for got, want in zip(model.features(batch), plain.features(batch)):  # evaluation: q(f|x) reads x
            torch.testing.assert_close(got, want)
        post = model.encode(batch, sample=False, partner=partner)
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


@pytest.mark.parametrize("first,mirror", [(False, False), (True, False), (False, True)])
def test_shuffled_content_reads_a_fresh_draw_in_training_and_a_fixed_one_in_evaluation(batch, first, mirror):
    """f_shuffle (beyond the paper): q(f|x) reads the frames' patches shuffled (with f_first, the first frame's; with
    f_mirror, the mean over that view and its mirror image), z reads the frames as they are. In training each step
    draws a new shuffle; in evaluation the draw is fixed, so encoding is deterministic. No parameters are added."""
    torch.manual_seed(0)
    plain = dsae.DSAE(dsae.make_config("smoke", q_z="factorised")).eval()
    model = dsae.DSAE(dsae.make_config("smoke", q_z="factorised", f_shuffle=8, f_first=first, f_mirror=mirror)).eval()
    model.load_state_dict(plain.state_dict())
    t = batch.shape[1]
    with torch.no_grad():
        post, again, plain_post = (m.encode(batch, sample=False) for m in (model, model, plain))
        h, h_f = model.features(batch)
        view = dsae.shuffle_patches(batch[:, :1] if first else batch, 8, torch.Generator().manual_seed(0))
        expected = model.encoder(torch.cat([batch, view] + [view.flip(-1)] * mirror, dim=1))[:, t:]
        if mirror:
            expected = (expected[:, :view.shape[1]] + expected[:, view.shape[1]:]) / 2
        assert h_f.shape == (len(batch), 1 if first else t, h.shape[-1])
        torch.testing.assert_close(h_f, expected)
        torch.testing.assert_close(h, plain.encoder(batch))
        model.train()
        first, second = model.features(batch)[1], model.features(batch)[1]
    torch.testing.assert_close(again.f_mean, post.f_mean)
    torch.testing.assert_close(post.z_mean, plain_post.z_mean)  # the factorised q(z_t|x_t) reads x_t itself
    assert not torch.allclose(post.f_mean, plain_post.f_mean, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-4)


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


def test_film_decoder_starts_as_the_paper_decoder_and_learns(batch):
    """f_film (beyond the paper): the FiLM layers start as the identity, so a warm start from the paper's decoder
    decodes exactly as that decoder did; one Adam step moves them (f reaches the feature maps). A state that lacks
    anything but FiLM layers, or holds unknown keys, is refused."""
    torch.manual_seed(0)
    paper = dsae.DSAE(dsae.make_config("smoke")).eval()
    config = dsae.make_config("smoke", f_film=True)
    film = dsae.DSAE(config)
    dsae._load_warm_start(film, paper.state_dict(), config)
    film.eval()
    with torch.no_grad():
        torch.testing.assert_close(film.reconstruct(batch), paper.reconstruct(batch), rtol=0, atol=0)
    film.train()
    optimizer = torch.optim.Adam(film.parameters(), lr=1e-3)
    dsae.train_step(film, optimizer, batch, config)
    assert all(p.detach().abs().max() > 0 for p in film.decoder.film.parameters())
    with pytest.raises(ValueError, match="missing"):
        dsae._load_warm_start(film, {k: v for k, v in paper.state_dict().items() if "decoder.fc" not in k}, config)
    with pytest.raises(ValueError, match="unexpected"):
        dsae._load_warm_start(film, {**paper.state_dict(), "extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="unexpected"):  # FiLM layers do not load into the paper's decoder
        dsae._load_warm_start(paper, film.state_dict(), dsae.make_config("smoke"))


def test_kl_annealing_scales_both_kl_terms_then_ends_on_the_paper_objective(batch, tmp_path):
    """kl_warmup (beyond the paper): the KL weight rises linearly to 1 and stays there; a step with weight w moves
    the parameters as a step on recon + w (beta_f KL_f + beta_z KL_z) does; runs log it and are not the paper's."""
    config = dsae.make_config("smoke", kl_warmup=2, beta_z=2.0, bf16=False)
    assert [dsae.annealed_kl_weight(config, e) for e in (0.5, 1, 2, 7)] == [0.25, 0.5, 1.0, 1.0]
    assert dsae.annealed_kl_weight(dsae.make_config("smoke"), 0.01) == 1.0

    def stepped(step):
        torch.manual_seed(0)
        model = dsae.DSAE(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        torch.manual_seed(1)  # the same reparameterisation noise in both
        step(model, optimizer)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def by_hand(model, optimizer):
        terms = dsae.elbo_terms(model, batch)
        (terms["recon"] + 0.3 * (terms["kl_f"] + 2.0 * terms["kl_z"])).backward()
        optimizer.step()

    annealed = stepped(lambda m, o: dsae.train_step(m, o, batch, config, kl_weight=0.3))
    torch.testing.assert_close(annealed, stepped(by_hand))
    assert not torch.allclose(annealed, stepped(lambda m, o: dsae.train_step(m, o, batch, config)))
    _, history = dsae.train(smoke(tmp_path, "annealed", kl_warmup=1.5), progress=False)
    assert [row["kl weight"] for row in history] == pytest.approx([1 / 1.5, 1.0])
    assert not dsae.faithful_to_paper(config.__dict__) and dsae.faithful_to_paper(dsae.make_config("smoke").__dict__)
    with pytest.raises(ValueError, match="kl_warmup must be"):
        dsae.make_config("smoke", kl_warmup=-1)


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

    def killed_in_epoch_two(model, x, partner=None):
        calls["n"] += 1
        if calls["n"] == 8 + 3:  # 8 batches per epoch: die during the third batch of epoch 2
            raise KeyboardInterrupt
        return elbo(model, x, partner)

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

    def nan_loss(model, x, partner=None):
        terms = elbo(model, x, partner)
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

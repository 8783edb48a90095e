"""The digits model: shipped checkpoints, guidance, deterministic training, FD-digits, the digits-cond problem."""

import math

import numpy as np
import pytest
import torch

from steptune.evaluators import Evaluator
from steptune.evaluators.digits_cond import DigitsQuality, GuidedDigits, bank_labels, digits_problem
from steptune.evaluators.digits_networks import (
    NULL_CLASS,
    TrainConfig,
    digits_images,
    load_classifier,
    load_unet,
    train_classifier,
    train_unet,
)
from steptune.evaluators.metrics import frechet_distance, gaussian_stats
from steptune.space import presets


def test_shipped_classifier_recognises_the_digits():
    clf, meta = load_classifier(models_dir=None)
    x, y = digits_images()
    with torch.no_grad():
        acc = float((clf(x).argmax(1) == y).float().mean())
    assert acc > 0.97 and meta["test_accuracy"] > 0.97


def test_guidance_is_uncond_plus_scale_times_the_difference():
    unet, _ = load_unet(models_dir=None)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((6,), 400.0)
    with torch.no_grad():
        cond = unet(x.float(), t.float(), bank_labels(6))
        uncond = unet(x.float(), t.float(), torch.full((6,), NULL_CLASS))
        for s in (1.5, 3.0, 5.0):
            got = GuidedDigits(unet, s)(x, t)
            torch.testing.assert_close(got.float(), uncond + s * (cond - uncond), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(GuidedDigits(unet, None)(x, t).float(), cond)


def test_training_is_deterministic():
    cfg = TrainConfig(steps=3, batch=8, channels=(8, 16))
    a, b = train_unet(cfg), train_unet(cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    (c1, acc1), (c2, acc2) = train_classifier(epochs=1), train_classifier(epochs=1)
    assert acc1 == acc2 and all(torch.equal(p, q) for p, q in zip(c1.parameters(), c2.parameters()))


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    want = float(((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(want, rel=1e-9)


def test_fd_digits_ranks_real_digits_above_noise():
    q = DigitsQuality(models_dir=None)
    x, _ = digits_images()
    assert frechet_distance(*gaussian_stats(q.features(x)), *q.data_stats) == pytest.approx(0.0, abs=1e-6)
    real = q.fd(x[:256])
    noise = q.fd(torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real < noise / 5


def test_digits_cond_problem_samples_recognisable_digits(tmp_path):
    prob = digits_problem(guidance_scale=3.0, models_dir=None, bank_sizes=(4, 20))
    ev = Evaluator(prob, cache_dir=tmp_path, **{"n_train": 4, "n_heldout": 20})
    res = ev.evaluate(presets.build("unipc-bh2", 10, prob.noise, t_start=prob.t_start, t_end=prob.t_end), "heldout")
    assert res.ok and set(res.metrics) >= {"rmse", "fd_digits", "accuracy"}
    assert res.metrics["accuracy"] >= 0.9
    assert res.metrics["rmse"] < 0.1 * float(ev.reference("heldout").pow(2).mean().sqrt())
    assert math.isfinite(res.metrics["fd_digits"])
def test_fd_to_the_reference_is_the_frechet_distance_of_samples_and_reference_features(tmp_path):
    from steptune.space import sample

    prob = digits_problem(guidance_scale=3.0, models_dir=None, bank_sizes=(4, 40))
    ev = Evaluator(prob, cache_dir=tmp_path, n_train=4, n_heldout=40)
    fds = {}
    for spec, nfe in (("ddim", 3), ("unipc-bh2", 10)):
        s = presets.build(spec, nfe, prob.noise, t_start=prob.t_start, t_end=prob.t_end)
        res = ev.evaluate(s, "heldout")
        x = sample(prob.model, ev.x_T("heldout"), s)
        q = prob.quality
        want = frechet_distance(*gaussian_stats(q.features(x)), *gaussian_stats(q.features(ev.reference("heldout"))))
        assert res.metrics["fd_reference"] == pytest.approx(want, rel=1e-9)
        fds[spec] = res.metrics["fd_reference"]
    assert "fd_reference" in ev.metric_names()
    assert fds["unipc-bh2"] < fds["ddim"] / 3  # a converging sampler approaches the reference's distribution




def test_a_retrained_unet_is_what_digits_cond_runs_and_it_says_so(tmp_path, monkeypatch):
    """A UNet in runs/models of the folder a command runs in replaces the shipped one: the problem's identity carries
    that file's fingerprint, and the note names the file and its training steps; without it, the shipped one runs."""
    from steptune.evaluators.cache import file_sha256
    from steptune.evaluators.digits_networks import SHIPPED, UNET_FILE, save_checkpoint
    from steptune.study_problem import weights_note

    monkeypatch.chdir(tmp_path)
    shipped = digits_problem(quality=False)
    assert shipped.source["unet_sha256"] == file_sha256(SHIPPED / UNET_FILE) and weights_note(shipped) is None
    unet = train_unet(TrainConfig(steps=2, batch=8))
    path = save_checkpoint(unet, tmp_path / "runs" / "models" / UNET_FILE, {"train": {"steps": 2}})
    retrained = digits_problem(quality=False)
    assert retrained.source["unet_sha256"] == file_sha256(path) != shipped.source["unet_sha256"]
    assert weights_note(retrained) == (
        "note: digits-cond runs the UNet retrained by 'steptune train-digits' (runs/models/digits-unet.pt, 2 training "
        "steps), not the shipped one; delete that file to use the shipped weights")

"""Koopman students built on the teacher's U-Net (issue 23): structure, starting point, training signal."""

from __future__ import annotations

import pytest
import torch

from koopman_policy.registry import policy_class
from koopman_policy.students.kdm import energy_score

B, TO, DO, H, DA, K = 6, 2, 5, 16, 2, 6
UNET = {"obs_dim": DO, "action_dim": DA, "down_dims": (16, 32), "step_embed_dim": 16}


def make(method: str, **overrides):
    cls = policy_class(method)
    return cls(cls.config_class(**overrides))


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(B, TO, DO, generator=g), "states": torch.randn(B, K + 1, H, DA, generator=g)}


@pytest.mark.parametrize(("method", "tol"), [("kdm", 0.0), ("dkoopman", 0.05)])
def test_unet_encoder_starts_as_the_teachers_network(method, tol):
    """K = I (kdm) or K ≈ 0.98 I (dkoopman) and no control term: the one-step chunk is the teacher's U-Net
    output at the last diffusion step, the point the oneflow student also starts from."""
    torch.manual_seed(0)
    teacher = make("teacher", **UNET)
    student = make(method, encoder="unet", **UNET).eval()
    assert student.init_from_teacher(teacher)
    assert student.latent_size == 16 * H and not student.has_ood_score
    b = batch()
    obs_n, noise = student.encode_obs(b["obs"]), b["states"][:, 0]
    with torch.no_grad():
        chunk, ood = student.sample_normalized(obs_n, noise)
        eps = teacher.model(noise, torch.full((B,), 99), obs_n)
    assert (chunk - eps).abs().max() <= tol + 1e-6
    assert torch.equal(ood, torch.zeros(B))


@pytest.mark.parametrize("method", ["kdm", "dkoopman"])
def test_unet_encoder_trains_every_weight_and_mlp_stays_the_default(method):
    student = make(method, encoder="unet", **UNET)
    loss = student.compute_loss(batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in student.named_parameters() if p.grad is None] == []
    mlp = make(method)
    assert mlp.config.encoder == "mlp" and mlp.has_ood_score and not hasattr(mlp, "unet")
    assert not mlp.init_from_teacher(make("teacher"))
    with pytest.raises(ValueError, match="encoder must be one of"):
        make(method, encoder="transformer")
    with pytest.raises(ValueError, match="down_dims"):
        make(method, encoder="unet", obs_dim=DO, action_dim=DA).init_from_teacher(make("teacher", **UNET))


@pytest.mark.parametrize("method", ["kdm", "dkoopman"])
def test_obs_in_all_conditions_encoders_and_decoder_on_the_observation(method):
    """``obs_in: all``: the same noise gives different chunks for different observations through the encoders and
    the decoder too; with the control term and the operator's gains zeroed only those paths remain."""
    torch.manual_seed(0)
    fields = {"obs_dim": DO, "action_dim": DA, "hidden_dim": 32, "cond_embed_dim": 8}
    student = make(method, obs_in="all", **fields).eval()
    loss = student.compute_loss(batch())
    loss.backward()
    assert torch.isfinite(loss) and [n for n, p in student.named_parameters() if p.grad is None] == []
    torch.nn.init.zeros_(student.control.weight)
    b = batch()
    obs_n = student.encode_obs(b["obs"])
    noise = b["states"][:1, 0].expand(B, H, DA)
    with torch.no_grad():
        chunk, ood = student.sample_normalized(obs_n, noise)
    assert (chunk - chunk[:1]).abs().amax(dim=(1, 2))[1:].min() > 1e-4 and torch.isfinite(ood).all()
    with pytest.raises(ValueError, match="obs_in must be one of"):
        make(method, obs_in="film", **fields)


def test_energy_score_is_least_for_the_teachers_distribution():
    """The spread term's estimate ranks samples as a proper scoring rule: draws from the teacher's two-mode
    distribution score below the mean chunk (a student that averages the pushes) and below one mode only."""
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 2 * H

    def two_modes() -> torch.Tensor:
        side = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
        return side + 0.1 * torch.randn(n, d, generator=g)

    target = two_modes()
    matched = energy_score(two_modes(), two_modes(), target)
    averaged = energy_score(torch.zeros(n, d), torch.zeros(n, d), target)
    one_mode = energy_score(torch.ones(n, d), torch.ones(n, d), target)
    assert matched < averaged - 0.2 and matched < one_mode - 0.2


@pytest.mark.parametrize("method", ["kdm", "dkoopman"])
def test_spread_loss_weight_adds_the_energy_score(method):
    fields = {"obs_dim": DO, "action_dim": DA, "hidden_dim": 32, "cond_embed_dim": 8, "latent_noise": 0.0}
    losses = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        student = make(method, spread_loss_weight=weight, **fields)
        torch.manual_seed(1)
        loss = student.compute_loss(batch())
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.parameters())
        losses.append(float(loss.detach()))
    # An untrained student's chunks sit near zero, the batch's teacher chunks about 1 away (RMS): score ≈ 1.
    assert losses[1] > losses[0] + 0.5
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="spread_loss_weight must be finite and >= 0, got"):
            make(method, spread_loss_weight=bad, **fields)

"""Distillation keeps a teacher's modes apart where plain regression averages them.

The toy teacher maps noise to one of two chunks, +0.8 or -0.8 everywhere, by the sign of the noise's
mean: the shape of the left/right choice around the pillar, without the simulator. The teacher-data
layout is the real one and training runs through the real loop.
"""

from __future__ import annotations

import pytest
import torch

from koopman_distill.train import TrainConfig, train
from koopman_policy.registry import policy_class

TO, DO, H, DA, K = 2, 4, 4, 2, 4
MODE = 0.8


def toy_teacher_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, TO, DO, generator=g) * 2 - 1
    x_t = torch.randn(n, H, DA, generator=g)
    x_0 = torch.where(x_t.mean((1, 2), keepdim=True) > 0, MODE, -MODE).expand(n, H, DA)
    s = torch.linspace(0, 1, K + 1).view(1, K + 1, 1, 1)
    states = (1 - s) * x_t.unsqueeze(1) + s * x_0.unsqueeze(1)  # straight paths between the end points
    return {"obs": obs, "states": states}


def student(method: str):
    cls = policy_class(method)
    kwargs = dict(obs_dim=DO, action_dim=DA, horizon=H, n_obs_steps=TO, hidden_dim=64, cond_embed_dim=16)
    if method in ("kdm", "dkoopman"):
        kwargs["latent_dim"] = 16
    return cls(cls.config_class(**kwargs))


@pytest.mark.parametrize("method", ["kdm", "dkoopman", "oneflow", "cd"])
def test_noise_conditioned_students_keep_both_modes(tmp_path, method):
    torch.manual_seed(0)
    policy, data = student(method), toy_teacher_data(2048, 0)
    policy.fit_normalizers(data["obs"], data["states"][:, -1])
    steps = 2000
    trained, metrics = train(policy, data, TrainConfig(steps=steps, batch_size=128, lr=2e-3, warmup_steps=20),
                             tmp_path, desc=method)
    obs_n = trained.obs_normalizer.normalize(torch.rand(512, TO, DO) * 2 - 1).flatten(1)
    noise = torch.randn(512, H, DA)
    with torch.no_grad():
        x0, _ = trained.sample_normalized(obs_n, noise)
    raw = trained.action_normalizer.unnormalize(x0).mean((1, 2))
    wanted = torch.where(noise.mean((1, 2)) > 0, MODE, -MODE)
    # Each sample lands on the mode its noise selects: two separated modes, no averaging.
    assert ((raw - wanted).abs() < 0.25).float().mean() > 0.85, f"{method}: final loss {metrics['final_loss']}"


def test_regression_without_noise_averages_the_modes(tmp_path):
    torch.manual_seed(0)
    policy, data = student("bc"), toy_teacher_data(2048, 0)
    policy.fit_normalizers(data["obs"], data["states"][:, -1])
    trained, _ = train(policy, data, TrainConfig(steps=400, batch_size=128, lr=2e-3, warmup_steps=20), tmp_path)
    with torch.no_grad():
        chunk = trained.predict_action(torch.rand(256, TO, DO) * 2 - 1)
    means = chunk.mean((1, 2)).abs()
    # Near the average of +0.8 and -0.8, i.e. neither mode: what a noise-free student must do.
    assert means.mean() < 0.15
    assert ((means - MODE).abs() < 0.25).float().mean() < 0.05

"""Every policy honours the one interface: shapes, losses, checkpoints, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from koopman_policy.checkpoint import CheckpointError, load_policy, save_policy
from koopman_policy.modeling.koopman import DecomposedOperator, FactorizedDynamicOperator
from koopman_policy.modeling.layers import SinusoidalEmbedding
from koopman_policy.normalizer import Normalizer
from koopman_policy.registry import POLICIES, policy_class

B, TO, DO, H, DA, K = 5, 2, 20, 16, 7, 6


def make(method: str, **overrides):
    cls = policy_class(method)
    return cls(cls.config_class(**overrides))


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randn(B, TO, DO, generator=g),
        "action": torch.randn(B, H, DA, generator=g),
        "states": torch.randn(B, K + 1, H, DA, generator=g),
    }


@pytest.mark.parametrize("method", list(POLICIES))
def test_loss_is_finite_and_trains_every_weight(method):
    policy = make(method)
    loss = policy.compute_loss(batch())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{method}: parameters without gradient: {missing}"


@pytest.mark.parametrize("method", list(POLICIES))
def test_predict_action_shape_and_determinism_given_noise(method):
    policy = make(method, sampler="ddim", num_inference_steps=5) if method == "teacher" else make(method)
    policy.eval()
    obs = torch.randn(3, TO, DO)
    noise = torch.randn(3, H, DA)
    a = policy.predict_action(obs, noise)
    assert a.shape == (3, H, DA)
    assert torch.equal(a, policy.predict_action(obs, noise))
    assert policy.predict_action(obs[0]).shape == (1, H, DA)


@pytest.mark.parametrize("method", list(POLICIES))
def test_bad_observations_are_refused(method):
    policy = make(method).eval()
    with pytest.raises(ValueError, match="shape"):
        policy.predict_action(torch.randn(1, TO + 1, DO))
    obs = torch.randn(1, TO, DO)
    obs[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action(obs)


@pytest.mark.parametrize("method", list(POLICIES))
def test_checkpoint_round_trip(tmp_path, method):
    policy = make(method).eval()
    policy.fit_normalizers(torch.randn(50, TO, DO) * 3, torch.randn(50, H, DA))
    save_policy(policy, tmp_path, extra={"note": "x"})
    loaded = load_policy(tmp_path)
    assert type(loaded) is type(policy) and loaded.config == policy.config
    for (k, v), (k2, v2) in zip(policy.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path):
    save_policy(make("bc"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_policy(tmp_path)
    save_policy(make("bc"), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["hidden_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        load_policy(tmp_path)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_policy(tmp_path / "missing")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="dkoopman"):
        policy_class("diffusion-transformer")


def test_select_action_replans_after_n_action_steps():
    policy = make("oneflow").eval()
    g = torch.Generator().manual_seed(1)
    actions = [policy.select_action(torch.randn(DO), generator=g) for _ in range(2 * policy.config.n_action_steps)]
    assert all(a.shape == (DA,) for a in actions)
    policy.reset()
    assert not policy._action_queue


def test_normalizer_round_trip_and_constant_dimensions():
    data = torch.randn(100, 4) * torch.tensor([1.0, 10.0, 0.1, 0.0]) + 3
    n = Normalizer(4).fit(data)
    x = n.normalize(data)
    assert x[:, :3].min() >= -1 - 1e-5 and x[:, :3].max() <= 1 + 1e-5
    assert torch.allclose(x[:, 3], torch.zeros(100), atol=1e-5)
    assert torch.allclose(n.unnormalize(x), data, atol=1e-4)


def test_decomposed_operator_is_contracting_and_consistent():
    op = DecomposedOperator(16)
    radius, _ = op.radius_angle()
    assert (radius < 1).all()
    assert op.regularizer() < 1e-10  # P^-1 starts as P^T of an orthonormal P
    z = torch.randn(8, 16)
    assert op(z).norm(dim=1).max() <= z.norm(dim=1).max()


def test_dynamic_operator_gains_depend_on_state_and_spectral_penalty_bites():
    op = FactorizedDynamicOperator(8, cond_dim=3)
    torch.nn.init.normal_(op.gain_net[-1].weight, std=1.0)
    z, s = torch.randn(4, 8), torch.randn(4, 3)
    out1, out2 = op(z, s), op(z, s + 1.0)
    assert not torch.allclose(out1, out2)
    with torch.no_grad():
        op.nu.fill_(-10.0)  # |λ| → 1, so gains above 1 push the radius past 1
    op(z, s)
    assert op.regularizer() > 0


def test_dkoopman_refinement_steps_validated():
    with pytest.raises(ValueError, match="refinement_steps"):
        make("dkoopman", refinement_steps=0)


@pytest.mark.parametrize("method", ["oneflow", "cd"])
def test_progress_embedding_separates_trajectory_steps(method):
    """Students conditioned on progress s in [0, 1] must tell s = 0 from one DDIM step later (s = 0.1)."""
    embed = next(m for m in make(method).modules() if isinstance(m, SinusoidalEmbedding))
    e = embed(torch.tensor([0.0, 0.1, 1.0]))
    assert (e[0] - e[1]).norm() > 0.3 * e[0].norm()
    assert (e[1] - e[2]).norm() > 0.3 * e[0].norm()


def test_oneflow_unet_backbone_starts_from_the_teacher_and_trains():
    unet = {"down_dims": (16, 32), "step_embed_dim": 16}
    teacher = make("teacher", **unet)
    student = make("oneflow", backbone="unet", **unet)
    assert student.init_from_teacher(teacher)
    for (k, v), (k2, v2) in zip(student.unet.state_dict().items(), teacher.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    loss = student.compute_loss(batch())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters())
    # An MLP student has nothing to take; a student told not to takes nothing.
    assert not make("oneflow").init_from_teacher(teacher)
    assert not make("oneflow", backbone="unet", teacher_init=False, **unet).init_from_teacher(teacher)
    with pytest.raises(ValueError, match="down_dims"):
        make("oneflow", backbone="unet").init_from_teacher(teacher)
    with pytest.raises(ValueError, match="backbone must be one of"):
        make("oneflow", backbone="transformer")


def test_oneflow_demo_loss_keeps_two_demonstrated_modes_apart():
    """Nearest-of-K on demonstrations that go either way from the same state: the student learns both ways,
    not their average, which a plain regression would learn."""
    torch.manual_seed(0)
    policy = make("oneflow", obs_dim=2, action_dim=2, horizon=4, demo_loss_weight=1.0, demo_draws=8)
    modes = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    obs = torch.zeros(64, TO, 2)
    action = modes[torch.arange(64) % 2][:, None].expand(64, 4, 2)
    with pytest.raises(ValueError, match="demonstration windows"):
        policy.compute_loss({"obs": obs, "states": torch.randn(64, K + 1, 4, 2)})
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        policy.demo_loss(obs, action).backward()
        opt.step()
    chunks = policy.eval().predict_action(obs[:1].expand(400, -1, -1))
    to_mode = (chunks[:, None] - modes[None, :, None]).square().mean((2, 3))  # (400, 2)
    assert to_mode.min(1).values.median() < 0.05  # each draw lands near a demonstrated way
    nearest = to_mode.argmin(1)
    assert 0.2 < nearest.float().mean() < 0.8  # and both ways are drawn
    with pytest.raises(ValueError, match="demo_draws"):
        make("oneflow", demo_draws=0)


def test_oneflow_refinement_learns_the_sources_refined_chunk_in_one_call():
    """refine_steps: the terminal step learns the frozen source's end point after two jumps from progress 0.5."""
    torch.manual_seed(0)
    small = {"obs_dim": 2, "action_dim": 2, "horizon": 4}
    source = make("oneflow", **small).eval()
    start = {k: v.clone() for k, v in source.state_dict().items()}
    student = make("oneflow", refine_steps=2, refine_progress=0.5, **small)
    student.load_state_dict(source.state_dict())
    b = {"obs": torch.randn(64, TO, 2), "states": torch.randn(64, K + 1, 4, 2)}
    with pytest.raises(ValueError, match="refinement source"):
        student.compute_loss(b)
    student.attach_refinement_source(source, alpha_bar=0.8)
    obs_n, noise = student.encode_obs(b["obs"]), torch.randn(64, 8)
    zero, half = torch.zeros(64), torch.full((64,), 0.5)
    with torch.no_grad():
        cond = source.cond_encoder(obs_n)
        target = source.step(noise, zero, cond)
        for _ in range(2):  # back on the path at s = 0.5 with the same noise, then to the end again
            target = source.step(0.8**0.5 * target + 0.2**0.5 * noise, half, cond)
    assert torch.allclose(student.refined_end_point(obs_n, noise), target)

    def error() -> float:
        with torch.no_grad():
            return float((student.step(noise, zero, student.cond_encoder(obs_n)) - target).square().mean())

    before = error()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        student.compute_loss(b).backward()
        opt.step()
    assert error() < 0.2 * before
    assert all(torch.equal(v, start[k]) for k, v in source.state_dict().items())  # the source stays frozen
    with pytest.raises(ValueError, match="only with refine_steps"):
        make("oneflow", **small).attach_refinement_source(source, alpha_bar=0.8)
    with pytest.raises(ValueError, match="alpha_bar"):
        student.attach_refinement_source(source, alpha_bar=1.0)
    for bad in ({"refine_steps": -1}, {"refine_progress": 1.0}):
        with pytest.raises(ValueError, match="refine_progress in"):
            make("oneflow", **bad)

"""Image-conditioned policies: interface, losses, checkpoints, bad inputs, ONNX export and its runtime."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from policy_fields import task_fields

from koopman_distill.data import FrameWindows, episode_windows, frame_index_windows
from koopman_policy.checkpoint import load_policy, save_policy
from koopman_policy.contract import CAMERA_TOPIC, ContractError, ImageSpec
from koopman_policy.onnx_export import check_parity, export_policy, read_metadata
from koopman_policy.onnx_policy import OnnxPolicy
from koopman_policy.registry import IMAGE_POLICIES, POLICIES, STUDENT_METHODS, policy_class
from koopman_policy.vision import ImageDKoopmanPolicy, SpatialSoftmax

SIZE = 24
TINY = {"image_height": SIZE, "image_width": SIZE, "vision_dims": (8, 8, 8), "keypoints": 4,
        **task_fields(image=ImageSpec(SIZE, SIZE, "workspace"))}
TINY_TEACHER = {**TINY, "down_dims": (8, 16), "step_embed_dim": 8, "n_groups": 4, "num_train_timesteps": 20}
TINY_STUDENT = {**TINY, "hidden_dim": 32, "latent_dim": 16, "cond_embed_dim": 8, "gain_hidden": 16}


def make(method: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = policy_class(method)
    policy = cls(cls.config_class(**(TINY_TEACHER if method == "teacher_image" else TINY_STUDENT)))
    policy.fit_normalizers(torch.randn(64, 2, 14), torch.rand(64, 16, 7) * 2 - 1)
    return policy.eval()


def observation(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (batch, 2, SIZE, SIZE, 3), dtype=torch.uint8, generator=gen),
            "state": torch.randn((batch, 2, 14), generator=gen)}


def loss_batch(method: str, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b = obs["state"].shape[0]
    target = {"action": torch.rand(b, 16, 7)} if method == "teacher_image" else {"states": torch.randn(b, 4, 16, 7)}
    return {**obs, **target}


def test_registry_keeps_image_policies_apart():
    assert set(IMAGE_POLICIES) == {"teacher_image", "dkoopman_image"}
    assert not set(IMAGE_POLICIES) & set(POLICIES) and not set(IMAGE_POLICIES) & set(STUDENT_METHODS)
    assert policy_class("dkoopman_image") is ImageDKoopmanPolicy
    with pytest.raises(ValueError, match=r"known: .*teacher_image"):
        policy_class("dkoopman_images")


@pytest.mark.parametrize("method", sorted(IMAGE_POLICIES))
def test_shapes_and_uint8_equals_float(method):
    policy = make(method)
    obs = observation()
    cond = policy.encode_obs(obs)
    assert cond.shape == (3, policy.cond_dim) == (3, 2 * (14 + 2 * 4))
    noise = torch.randn(3, 16, 7)

    def predict(o, n):
        torch.manual_seed(0)  # the teacher's DDPM draws step noise from the global generator
        return policy.predict_action(o, n)

    a = predict(obs, noise)
    b = predict({"image": obs["image"].float() / 255, "state": obs["state"]}, noise)
    assert a.shape == (3, 16, 7) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if method != "teacher_image":  # DDPM's step noise depends on the batch size
        single = predict({k: v[0] for k, v in obs.items()}, noise[:1])
        torch.testing.assert_close(single, a[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(IMAGE_POLICIES))
def test_loss_trains_the_encoder(method):
    policy = make(method).train()
    loss = policy.compute_loss(loss_batch(method, observation(8)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in policy.image_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_the_image_changes_the_action():
    """The target is only in the image: different frames with the same state must give different chunks."""
    policy = make("dkoopman_image")
    obs = observation(2)
    obs["state"][1] = obs["state"][0]
    noise = torch.randn(1, 16, 7).repeat(2, 1, 1)
    chunk = policy.predict_action(obs, noise)
    assert (chunk[0] - chunk[1]).abs().max() > 1e-4


def test_frozen_encoder_gets_no_gradient_and_starts_from_the_teacher():
    teacher = make("teacher_image", seed=1)
    torch.manual_seed(2)
    student = ImageDKoopmanPolicy(ImageDKoopmanPolicy.config_class(**TINY_STUDENT, freeze_vision=True))
    student.copy_normalizers(teacher)
    student.init_vision_from(teacher)
    for a, b in zip(student.image_encoder.parameters(), teacher.image_encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    student.compute_loss(loss_batch("dkoopman_image", observation(4))).backward()
    assert all(p.grad is None for p in student.image_encoder.parameters())
    other = ImageDKoopmanPolicy(ImageDKoopmanPolicy.config_class(**{**TINY_STUDENT, "keypoints": 8}))
    with pytest.raises(ValueError, match="differs from the teacher"):
        other.init_vision_from(teacher)


@pytest.mark.parametrize("method", sorted(IMAGE_POLICIES))
def test_checkpoint_round_trip(method, tmp_path):
    policy = make(method)
    save_policy(policy, tmp_path / method)
    loaded = load_policy(tmp_path / method)
    assert type(loaded) is type(policy) and loaded.config == policy.config
    assert isinstance(loaded.config.vision_dims, tuple)
    obs, noise = observation(), torch.randn(3, 16, 7)
    torch.manual_seed(0)
    a = policy.predict_action(obs, noise)
    torch.manual_seed(0)
    torch.testing.assert_close(loaded.predict_action(obs, noise), a, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: {"image": o["image"]}, "keys 'image' and 'state'"),
        (lambda o: torch.zeros(3, 2, 14), "mapping with keys"),
        (lambda o: {**o, "image": o["image"][:, :, :-1]}, "image history must have shape"),
        (lambda o: {**o, "image": o["image"][:2]}, "image history must have shape"),
        (lambda o: {**o, "state": o["state"][..., :13]}, "state history must have shape"),
        (lambda o: {**o, "state": o["state"].index_fill(2, torch.tensor([3]), float("nan"))}, "NaN or inf"),
        (lambda o: {**o, "image": o["image"].float()}, r"must lie in \[0, 1\]"),
        (lambda o: {**o, "image": torch.full((3, 2, SIZE, SIZE, 3), float("inf"))}, "NaN or inf"),
    ],
)
def test_bad_observations_raise_clear_errors(mutate, message):
    policy = make("dkoopman_image")
    with pytest.raises(ValueError, match=message):
        policy.predict_action(mutate(observation()))


def test_select_action_replans_every_n_action_steps():
    policy = make("dkoopman_image")
    frame = torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8)
    state = torch.zeros(14)
    actions = [policy.select_action({"image": frame, "state": state}) for _ in range(policy.config.n_action_steps)]
    assert len(policy._action_queue) == 0 and all(a.shape == (7,) for a in actions)
    policy.select_action({"image": frame, "state": state})
    assert len(policy._action_queue) == policy.config.n_action_steps - 1
    policy.reset()
    assert not policy._action_queue and not policy._image_queue
    with pytest.raises(ValueError, match="expected one frame"):
        policy.select_action({"image": frame[:-1], "state": state})


def test_spatial_softmax_finds_a_bright_spot():
    layer = SpatialSoftmax(channels=1, keypoints=1, height=9, width=9)
    with torch.no_grad():
        layer.project.weight.fill_(50.0)
        layer.project.bias.zero_()
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 2, 6] = 1.0  # row 2 (y), column 6 (x)
    coords = layer(x)[0]
    torch.testing.assert_close(coords, torch.tensor([-1 + 2 * 6 / 8, -1 + 2 * 2 / 8]), atol=1e-3, rtol=0)


def test_frame_windows_align_with_state_windows():
    ends = np.array([3, 7])
    obs = np.arange(7, dtype=np.float32)[:, None]  # each row holds its own index
    states = episode_windows(obs, np.zeros((7, 1), np.float32), ends, horizon=4, n_obs_steps=2)["obs"][..., 0]
    index = frame_index_windows(ends, 2)
    np.testing.assert_array_equal(index, states.numpy().astype(np.int64))
    frames = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 2, 2, 3).contiguous()
    windows = FrameWindows(frames, torch.from_numpy(index))
    assert len(windows) == 7 and windows.shape == (7, 2, 2, 2, 3)
    assert windows[torch.tensor([3])][0, :, 0, 0, 0].tolist() == [3, 3]  # first step of episode 2 is padded
    with pytest.raises(ValueError, match="rows of the 7 frames"):
        FrameWindows(frames, torch.tensor([[0, 7]]))


# -- ONNX ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("camera_onnx")
    policy = make("dkoopman_image")
    path = export_policy(policy, root / "policy.onnx", {"ood_threshold": 1.5, "training_commit": "test"})
    return policy, path


def test_export_has_three_inputs_and_image_metadata(exported):
    policy, path = exported
    import onnx

    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["image", "state", "noise"]
    meta = read_metadata(path)
    assert meta["inputs"] == ["image", "state", "noise"] and meta["method"] == "dkoopman_image"
    assert (meta["image_height"], meta["image_width"], meta["camera"]) == (SIZE, SIZE, "workspace")
    assert meta["obs_dim"] == 14 and meta["ood_threshold"] == 1.5
    image = next(f for f in meta["contract"]["observation"] if f["kind"] == "image")
    assert image["topic"] == CAMERA_TOPIC and image["image"]["height"] == SIZE
    report = check_parity(policy, path, samples=64)
    assert set(report.max_abs) == {"action", "ood_score"} and report.worst <= 1e-4  # raw units, as the state ones
    other = task_fields(image=ImageSpec(SIZE + 8, SIZE + 8, "workspace"))["contract"]
    with pytest.raises(ContractError, match=f"frames {SIZE + 8}x{SIZE + 8}"):
        export_policy(policy, path.with_name("x.onnx"), contract=type(OnnxPolicy(path).metadata.contract)
                      .from_dict(other))


def test_onnx_image_policy_matches_torch(exported):
    policy, path = exported
    runtime = OnnxPolicy(path)
    assert (runtime.camera, runtime.image_size) == ("workspace", (SIZE, SIZE))
    obs, noise = observation(4, seed=5), torch.randn(4, 16, 7)
    ref = policy.predict_action(obs, noise).numpy()
    out = runtime.predict_action(obs["image"].numpy(), obs["state"].numpy(), noise.numpy())  # uint8 frames
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    single = runtime.predict_action(obs["image"][0].numpy().astype(np.float32) / 255, obs["state"][0].numpy(),
                                    noise[0].numpy())
    np.testing.assert_allclose(single, ref[0], atol=1e-4, rtol=0)
    assert isinstance(runtime.last_ood_score, float) and runtime.ood_exceeded is not None


def test_onnx_image_policy_rejects_bad_inputs_without_changing_state(exported):
    _, path = exported
    runtime = OnnxPolicy(path)
    img = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    state = np.zeros((2, 14), np.float32)
    runtime.predict_action(img, state)
    score = runtime.last_ood_score
    for bad_img, bad_state, message in [
        (img * 255, state, r"\[0, 1\]"),
        (img[:, :-1], state, "image history must have shape"),
        (img, state[:, :7], "state history must have shape"),
        (np.full_like(img, np.nan), state, "NaN or inf"),
    ]:
        with pytest.raises(ValueError, match=message):
            runtime.predict_action(bad_img, bad_state)
        assert runtime.last_ood_score == score
    with pytest.raises(TypeError, match="takes image, state"):
        runtime.predict_action(state)
    frame = (img[0] * 255).astype(np.uint8)
    actions = [runtime.select_action(frame, state[0]) for _ in range(8)]
    assert all(a.shape == (7,) and np.isfinite(a).all() for a in actions)


def test_one_runtime_serves_state_and_camera_files(exported, tmp_path):
    """OnnxPolicy feeds whatever inputs a file's metadata names: frames and state, or the observation alone."""
    _, path = exported
    camera = OnnxPolicy(path)
    assert camera.observation_inputs == ("image", "state") and camera.image_size == (SIZE, SIZE)
    assert camera.metadata.image.camera == camera.camera == "workspace"
    cls = POLICIES["dkoopman"]
    state_policy = cls(cls.config_class(hidden_dim=16, latent_dim=8, cond_embed_dim=8, gain_hidden=8, **task_fields()))
    state = OnnxPolicy(export_policy(state_policy.eval(), tmp_path / "state.onnx"))
    assert state.observation_inputs == ("obs",) and state.image_size is None
    with pytest.raises(TypeError, match="takes obs"):
        state.predict_action(np.zeros((2, SIZE, SIZE, 3), np.float32), np.zeros((2, 20), np.float32),
                             np.zeros((16, 7), np.float32))


def test_image_teacher_exports_ddim_with_parity(tmp_path):
    teacher = make("teacher_image")
    path = export_policy(teacher, tmp_path / "teacher.onnx", teacher_steps=2)
    meta = read_metadata(path)
    assert (meta["sampler"], meta["num_inference_steps"], meta["method"]) == ("ddim", 2, "teacher_image")
    assert check_parity(teacher, path, samples=16).worst <= 1e-4
    assert teacher.config.sampler == "ddpm"  # the export works on a copy


def test_catalogue_lists_the_camera_policies_with_image_inputs(exported, tmp_path):
    from pathlib import Path

    from koopman_policy.catalog import CatalogError, load_catalog, resolve_policy

    repo = Path(__file__).resolve().parents[1]
    for name, method in (("camera_teacher", "teacher_image"), ("camera_dkoopman", "dkoopman_image")):
        entry = resolve_policy(name, root=repo)
        assert (entry.method, entry.inputs) == (method, "image")
        assert entry.onnx == repo / "models" / f"gen3_{name}" / "policy.onnx"
    assert resolve_policy("dkoopman", root=repo).inputs == "state"
    _, path = exported
    assert resolve_policy(path, root=tmp_path).inputs == "image"
    save_policy(make("dkoopman_image"), tmp_path / "ckpt")
    assert resolve_policy(tmp_path / "ckpt", root=tmp_path).inputs == "image"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "policies.yaml").write_text("policies:\n  a: {method: dkoopman_image, inputs: lidar}\n")
    with pytest.raises(CatalogError, match="inputs 'lidar'"):
        load_catalog(tmp_path)


def test_bench_times_image_policies(tmp_path):
    import argparse
    import json

    from koopman_distill.commands import bench

    student, teacher = make("dkoopman_image"), make("teacher_image")
    save_policy(student, tmp_path / "gen3_camera_dkoopman")
    save_policy(teacher, tmp_path / "gen3_camera_teacher")  # no ONNX yet: bench exports it
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "--json", str(out), "--models", str(tmp_path / "gen3_camera_dkoopman"),
                              str(tmp_path / "gen3_camera_teacher"), "--calls", "20", "--warmup", "2"])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    for name, method in (("gen3_camera_dkoopman", "dkoopman_image"), ("gen3_camera_teacher", "teacher_image")):
        r = data[name]
        assert (r["method"], r["inputs"], r["image_size"], r["calls"]) == (method, "image", [SIZE, SIZE], 20)
        assert 0 < r["p50_ms"] <= r["p99_ms"] and "speedup_vs_teacher_ddpm100" not in r
    assert data["gen3_camera_teacher"]["sampler"] == "ddim"


def test_auxiliary_read_out_trains_the_encoder_and_stays_out_of_the_graph(tmp_path):
    """The training-only head reads target/pillar off the keypoints; the exported graph never contains it."""
    torch.manual_seed(0)
    cfg = ImageDKoopmanPolicy.config_class(**TINY_STUDENT, aux_names=["target_x", "target_z"], aux_loss_weight=2.0)
    policy = ImageDKoopmanPolicy(cfg)
    policy.fit_normalizers(torch.randn(64, 2, 14), torch.rand(64, 16, 7) * 2 - 1)
    policy.fit_aux(torch.rand(64, 2, 2))
    batch = loss_batch("dkoopman_image", observation(8))
    with pytest.raises(ValueError, match=r"need batch\['aux'\]"):
        policy.compute_loss(batch)
    aux = torch.rand(8, 2, 2)
    torch.manual_seed(1)
    with_aux = policy.compute_loss({**batch, "aux": aux})
    twin = ImageDKoopmanPolicy(dataclasses.replace(cfg, aux_loss_weight=0.0))
    twin.load_state_dict(policy.state_dict())
    torch.manual_seed(1)
    plain = twin.compute_loss(batch)  # no aux needed without weight
    read = policy.aux_head(policy._features)  # the features of the with-aux call above
    expected = 2.0 * torch.nn.functional.mse_loss(read, policy.aux_normalizer.normalize(aux))
    torch.testing.assert_close(with_aux - plain, expected, atol=1e-5, rtol=1e-4)
    assert policy.read_aux(observation(3)).shape == (3, 2, 2)
    with_aux.backward()
    assert policy.aux_head.weight.grad.abs().sum() > 0
    save_policy(policy.eval(), tmp_path / "aux")
    loaded = load_policy(tmp_path / "aux")
    torch.testing.assert_close(loaded.read_aux(observation(3)), policy.read_aux(observation(3)))
    path = export_policy(loaded, tmp_path / "aux" / "policy.onnx")
    import onnx

    weights = {init.name for init in onnx.load(str(path)).graph.initializer}
    assert not any("aux_head" in name for name in weights)
    assert check_parity(loaded, path, samples=16).worst <= 1e-4
    student = ImageDKoopmanPolicy(cfg)
    student.init_vision_from(policy)
    torch.testing.assert_close(student.aux_head.weight, policy.aux_head.weight)

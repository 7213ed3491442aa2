"""Small real ONNX policies for exercising the stack without trained models, and fault injection.

* :func:`export_untrained` exports an untrained policy of any method through the real export path
  (``koopman_policy.onnx_export``), with normalisers fitted to a narrow band around the start pose so its
  actions are finite and inside the joint limits. It lets CI exercise loading, swapping and fallback
  before (or without) the trained models.
* :func:`inject_fault` rewrites a policy ONNX so that it genuinely misbehaves for part of the observation
  space: NaN actions, or an action tensor of the wrong shape (the runtime then raises), whenever observation
  feature ``feature`` of the newest step exceeds ``threshold``. The file passes a probe on observations
  below the threshold, as a subtly broken model would, and fails in closed loop once the task reaches the
  region: that is how the fallback is tested through real inference rather than a patched call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def export_untrained(method: str, path: str | Path, seed: int = 0, teacher_steps: int = 2,
                     spread: float = 0.05) -> Path:
    """Export an untrained ``method`` policy for the Gen3 task to ``path`` (an .onnx file)."""
    import torch

    import gen3_description as gen3
    from koopman_control.contracts import resolve_contract
    from koopman_policy.onnx_export import export_policy
    from koopman_policy.registry import policy_class
    from koopman_sim.tasks.reach_obstacle import OBS_NAMES

    torch.manual_seed(seed)
    cls = policy_class(method)
    cfg = cls.config_class(obs_names=list(OBS_NAMES), action_names=list(gen3.JOINT_NAMES),
                           contract=resolve_contract("gen3_reach_obstacle").to_dict())
    policy = cls(cfg)
    home = torch.tensor(gen3.HOME_Q, dtype=torch.float32)
    n = 64
    q = home + spread * (2 * torch.rand(n, 7) - 1)
    qd = 0.5 * (2 * torch.rand(n, 7) - 1)
    target = torch.tensor([0.56, -0.05, 0.14]) + torch.rand(n, 3) * torch.tensor([0.06, 0.1, 0.06])
    pillar = torch.tensor([0.39, -0.05, 0.15]) + torch.rand(n, 3) * torch.tensor([0.04, 0.1, 0.0])
    obs = torch.cat([q, qd, target, pillar], 1)[:, None].repeat(1, cfg.n_obs_steps, 1)
    action = (home + spread * (2 * torch.rand(n, 7) - 1))[:, None].repeat(1, cfg.horizon, 1)
    policy.fit_normalizers(obs, action)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"action_limit_low": gen3.JOINT_LOWER.tolist(), "action_limit_high": gen3.JOINT_UPPER.tolist(),
             "training_commit": "untrained"}
    return export_policy(policy.eval(), path, extra, teacher_steps=teacher_steps)


def inject_fault(src: str | Path, dst: str | Path, feature: int, threshold: float, kind: str = "nan") -> Path:
    """Copy policy ONNX ``src`` to ``dst`` with a fault that fires when ``obs[:, -1, feature] > threshold``.

    ``kind="nan"``: every action becomes NaN. ``kind="shape"``: the action tensor doubles its horizon
    against the declared shape, so the ONNX Runtime call raises.
    """
    import onnx
    from onnx import TensorProto, helper

    if kind not in ("nan", "shape"):
        raise ValueError(f"kind must be 'nan' or 'shape', got {kind!r}")
    model = onnx.load(str(src))
    g = model.graph
    inner = "action_clean"
    for node in g.node:
        node.output[:] = [inner if o == "action" else o for o in node.output]
    consts = [
        helper.make_tensor("fault_idx", TensorProto.INT64, [1], [feature]),
        helper.make_tensor("fault_last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("fault_axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("fault_thr", TensorProto.FLOAT, [], [threshold]),
        helper.make_tensor("fault_nan", TensorProto.FLOAT, [], [np.nan]),
        helper.make_tensor("fault_one", TensorProto.FLOAT, [], [1.0]),
    ]
    g.initializer.extend(consts)
    nodes = [
        helper.make_node("Gather", ["obs", "fault_last"], ["fault_newest"], axis=1),  # (B, 1, D)
        helper.make_node("Gather", ["fault_newest", "fault_idx"], ["fault_feat"], axis=2),  # (B, 1, 1)
        helper.make_node("Greater", ["fault_feat", "fault_thr"], ["fault_on"]),
    ]
    if kind == "nan":
        nodes += [
            helper.make_node("Where", ["fault_on", "fault_nan", "fault_one"], ["fault_mul"]),
            helper.make_node("Mul", [inner, "fault_mul"], ["action"]),
        ]
    else:
        # repeats along the horizon = 1 + fault_on: a data-dependent output shape.
        nodes += [
            helper.make_node("Cast", ["fault_on"], ["fault_on_i"], to=TensorProto.INT64),
            helper.make_node("ReduceMax", ["fault_on_i"], ["fault_any0"], keepdims=0),  # any, over the batch
            helper.make_node("Add", ["fault_any0", "fault_one_i"], ["fault_rep"]),
            helper.make_node("Unsqueeze", ["fault_rep", "fault_zero_axis"], ["fault_rep1"]),
            helper.make_node("Concat", ["fault_one_1", "fault_rep1", "fault_one_1"], ["fault_reps"], axis=0),
            helper.make_node("Tile", [inner, "fault_reps"], ["action"]),
        ]
        g.initializer.extend([
            helper.make_tensor("fault_one_i", TensorProto.INT64, [], [1]),
            helper.make_tensor("fault_zero_axis", TensorProto.INT64, [1], [0]),
            helper.make_tensor("fault_one_1", TensorProto.INT64, [1], [1]),
        ])
        # The declared output shape stays (batch, horizon, action_dim): the file loads, the run fails.
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


# -- ROS test helpers ----------------------------------------------------------------------------------------
def session_domain_id(offset: int = 0) -> int:
    """A ROS_DOMAIN_ID unique to this process and ``offset`` (tests in parallel sessions, and the tests of one
    session that need a domain of their own, do not cross-talk). FastDDS maps domain ids to UDP ports; ids stay
    in 1..101, clear of ROS's default 0 and of the port range's upper end (ids above 232 do not open at all)."""
    import os

    return 1 + (os.getpid() + offset) % 101


def ros_context(domain_id: int | None = None) -> Any:
    """A fresh rclpy Context initialised on ``domain_id`` (default: :func:`session_domain_id`), with
    discovery kept on this host. The caller shuts it down (``rclpy.shutdown(context=ctx)``)."""
    import os

    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    ctx = Context()
    rclpy.init(context=ctx, domain_id=session_domain_id() if domain_id is None else domain_id,
               signal_handler_options=SignalHandlerOptions.NO)
    return ctx


def wait_until(predicate: Any, timeout: float, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or raise TimeoutError naming ``what``."""
    import time

    t_end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > t_end:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)

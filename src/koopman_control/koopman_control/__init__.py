"""ROS 2 control stack for one-step diffusion-distilled policies.

Every node is a thin rclpy layer over a plain-Python core in :mod:`koopman_control.core` (no rclpy
imports there), so the control logic is unit-tested without ROS and reused by the in-process bringup.
"""

__version__ = "0.1.0"

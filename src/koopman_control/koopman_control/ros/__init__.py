"""rclpy glue shared by the nodes: message conversion, QoS, diagnostics, node base class, spinning."""

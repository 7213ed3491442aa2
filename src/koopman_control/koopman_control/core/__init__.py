"""Plain-Python cores of the control stack (numpy only, no rclpy): the nodes convert messages and call these."""

"""rclpy nodes; each module has the node class and a ``main()`` console script."""

"""One-step students distilled from the diffusion teacher's sampling trajectories."""

"""Offline distillation: train the diffusion teacher, record its trajectories, distil, evaluate, export."""

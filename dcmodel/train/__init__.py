"""Training: tasks (loss and metrics), the optimizer, the pure jitted step, and the loop."""

"""The DeepSpeed engine shared by every task: training loop, checkpoints, export, launch CLI."""

"""Training losses shared by the task trainers."""

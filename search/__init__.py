"""Hyperparameter search: Ray Tune schedules Optuna-sampled trials of the multitask trainer."""

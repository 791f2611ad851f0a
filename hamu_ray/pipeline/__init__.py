"""Pipelines: built-in and user data, the stages (original, oracle, unlearning per method),
evaluation and comparison, the threshold search, MLflow tracking and plots."""

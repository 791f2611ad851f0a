"""hamu-ray: hardness-aware multi-objective unlearning on Ray."""

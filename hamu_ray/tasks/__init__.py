"""Tasks: what differs between a classifier and a causal LM (build/load a model, rows → batch,
per-example log-likelihoods). The engine reaches them through this registry only."""

"""scikit-learn's digits as a small unlearning problem: a two-layer MLP, class 3 to forget."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

FORGET_CLASS = 3


def digits_mlp(hidden: int, activation: type[torch.nn.Module] = torch.nn.ReLU, *, train_steps: int = 0,
               retain_rows: int | None = None, forget_rows: int | None = None):
    """(model, (x_r, y_r), (x_f, y_f)): the MLP seeded 0, trained `train_steps` Adam steps on
    every digit, and the first rows of the retain and forget sets (all when None)."""
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), activation(), torch.nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    forget = y == FORGET_CLASS
    return model, (x[~forget][:retain_rows], y[~forget][:retain_rows]), (x[forget][:forget_rows], y[forget][:forget_rows])

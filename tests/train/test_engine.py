"""The training engine: determinism, exact resume from a saved state, early stop on the
held-out loss with the best parameters restored, and a clear error on a diverging loss."""

from __future__ import annotations

import pytest
import torch

from fxquant.train import TrainConfig, Trainer


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]) + 0.1 * torch.randn(64, generator=g)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    w = torch.nn.Parameter(torch.zeros(5))
    return w, (lambda b: ((b[0] @ w - b[1]) ** 2).mean()), batches


def make(config: TrainConfig):
    w, loss, batches = problem()
    return w, Trainer([{"params": [w]}], loss, batches[:6], batches[6:], config)


def test_same_seed_same_parameters_and_the_loss_falls():
    config = TrainConfig(steps=60, lr=0.2, eval_every=10, patience=100)
    w1, t1 = make(config)
    result = t1.run()
    w2, t2 = make(config)
    t2.run()
    assert torch.equal(w1, w2)
    assert result.best_heldout < 0.1 * result.first_heldout
    assert [h[0] for h in result.history] == [10, 20, 30, 40, 50, 60]


def test_resume_from_state_is_bit_identical():
    config = TrainConfig(steps=60, lr=0.05, eval_every=10, patience=100)
    w_full, full = make(config)
    full.run()
    w_a, first = make(config)
    assert first.run(until=25) is None  # paused, not finished
    state = first.state_dict()
    w_b, resumed = make(config)  # a fresh process would rebuild it the same way
    resumed.load_state_dict(state)
    result = resumed.run()
    assert torch.equal(w_b, w_full)
    assert result.history == full.history


def test_early_stop_keeps_the_best_parameters():
    # a learning rate so high the held-out loss gets worse after the first evaluation
    config = TrainConfig(steps=500, lr=5.0, eval_every=5, patience=2, cosine=False)
    w, trainer = make(config)
    result = trainer.run()
    assert result.stopped_early and result.steps < 500
    assert trainer.heldout_loss() == pytest.approx(result.best_heldout)


def test_diverging_loss_is_named():
    w = torch.nn.Parameter(torch.zeros(1))
    trainer = Trainer([{"params": [w]}], lambda b: w.sum() / 0.0 * 0.0, [(torch.zeros(1),)], [],
                      TrainConfig(steps=5))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        trainer.run()


def test_nothing_to_train_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        Trainer([{"params": []}], lambda b: b, [(1,)], [], TrainConfig())

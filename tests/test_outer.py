"""OuterState: the global weights and the outer optimizer, against the Nesterov formula."""

import pytest
import torch
from torch import nn

from lightning_diloco.outer import OuterState, default_outer_optimizer, master_dtype


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_outer_steps_follow_the_nesterov_formula():
    model = _model(0)
    outer = OuterState(model, default_outer_optimizer(lr=0.7, momentum=0.9, nesterov=True), "cpu")
    theta = [p.detach().clone() for p in model.parameters()]
    velocity = [torch.zeros_like(t) for t in theta]
    for round_ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # an inner round
        deltas = outer.pseudo_gradients(torch.device("cpu"))
        for d, t, p in zip(deltas, theta, model.parameters()):
            torch.testing.assert_close(d, t - p.detach())
        outer.step(deltas)
        for i, d in enumerate(deltas):
            velocity[i] = 0.9 * velocity[i] + d
            theta[i] = theta[i] - 0.7 * (d + 0.9 * velocity[i])
        outer.copy_to(model)
        for p, t in zip(model.parameters(), theta):
            torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)
    assert outer.outer_step == 3


def test_momentum_zero_is_plain_sgd_even_with_nesterov():
    opt = default_outer_optimizer(lr=1.0, momentum=0.0, nesterov=True)([nn.Parameter(torch.ones(2))])
    assert opt.defaults["nesterov"] is False and opt.defaults["momentum"] == 0.0


def test_low_precision_weights_get_fp32_master_copies():
    model = _model(0).to(torch.bfloat16)
    outer = OuterState(model, default_outer_optimizer(), "cpu")
    assert all(p.dtype == torch.float32 for p in outer.params)
    assert master_dtype(torch.float64) == torch.float64
    assert outer.module_state_dict(model)["0.weight"].dtype == torch.bfloat16


def test_state_dict_round_trip_and_model_mismatch():
    model = _model(0)
    outer = OuterState(model, default_outer_optimizer(), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    outer.step(outer.pseudo_gradients(torch.device("cpu")))
    fresh = OuterState(_model(1), default_outer_optimizer(), "cpu")
    fresh.load_state_dict(outer.state_dict())
    for a, b in zip(fresh.params, outer.params):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        outer.optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    other = OuterState(nn.Sequential(nn.Linear(4, 5)), default_outer_optimizer(), "cpu")
    with pytest.raises(ValueError, match="written for a different model"):
        other.load_state_dict(outer.state_dict())


def test_module_state_dict_gives_tied_parameters_their_global_value():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight  # listed once by parameters(), twice by state_dict()

    torch.manual_seed(0)
    model = Tied()
    outer = OuterState(model, default_outer_optimizer(), "cpu")
    global_weight = outer.params[0].detach().clone()
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # the local replica drifts
    state = outer.module_state_dict(model)
    torch.testing.assert_close(state["embed.weight"], global_weight)
    torch.testing.assert_close(state["head.weight"], global_weight)
    fresh = Tied()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.embed.weight.detach(), global_weight)

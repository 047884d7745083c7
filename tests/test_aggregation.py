import torch

from raysim.aggregation.rules import PartialSum, combine, weighted_mean
from raysim.aggregation.server_opt import FedAdam, FedAvg


def _partial(updates, weights):
    p = PartialSum.zeros_like({"w": torch.zeros_like(updates[0])})
    for u, w in zip(updates, weights):
        p.add({"w": u}, weight=w)
    return p


def test_fedavg_is_the_example_weighted_mean():
    updates = [torch.tensor([1.0, 0.0]), torch.tensor([4.0, 3.0])]
    mean = weighted_mean(combine([_partial(updates, [1.0, 2.0])]))
    assert torch.allclose(mean["w"], torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_combining_partial_sums_equals_one_sum_over_all_devices():
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(5, generator=g) for _ in range(7)]
    weights = [float(w) for w in range(1, 8)]
    whole = weighted_mean(combine([_partial(updates, weights)]))["w"]
    split = weighted_mean(combine([_partial(updates[:3], weights[:3]), _partial(updates[3:], weights[3:])]))["w"]
    assert torch.allclose(whole, split, rtol=1e-12, atol=0)


def test_elements_nobody_holds_get_a_zero_update():
    total = PartialSum(sums={"w": torch.tensor([2.0, 0.0], dtype=torch.float64)},
                       weights={"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}, num_devices=1)
    assert weighted_mean(total)["w"].tolist() == [2.0, 0.0]


def test_combine_skips_idle_actors():
    p = _partial([torch.tensor([1.0])], [1.0])
    assert combine([None, p, PartialSum.zeros_like({"w": torch.zeros(1)})]).num_devices == 1


def test_fedavg_with_lr_one_moves_state_to_the_mean_of_local_states():
    state = {"w": torch.tensor([1.0, 1.0])}
    out = FedAvg(lr=1.0).step(state, {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)})
    assert out["w"].tolist() == [1.5, 0.0] and out["w"].dtype == torch.float32


def test_fedadam_first_step_moves_each_coordinate_by_about_lr():
    # m = (1-b1) d, v = (1-b2) d^2, so the step is lr * (1-b1)/sqrt(1-b2) * sign(d) for tau -> 0.
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    out = opt.step({"w": torch.zeros(2)}, {"w": torch.tensor([3.0, -0.01], dtype=torch.float64)})
    expected = 0.1 * 0.1 / 0.1
    assert torch.allclose(out["w"], torch.tensor([expected, -expected]), rtol=1e-5)

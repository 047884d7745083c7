import torch

from raysim.aggregation.rules import PartialSum, weighted_mean
from raysim.methods.width import PRUNING, dropout, extract, head_columns, kept, scatter


def heterofl(total, ratio):
    return PRUNING["heterofl"].units(total, ratio, round=0)


def fedrolex(total, ratio, *, round):
    return PRUNING["fedrolex"].units(total, ratio, round=round)


def test_heterofl_keeps_the_ceiling_prefix():
    assert heterofl(4, 0.5).tolist() == [0, 1]
    assert heterofl(5, 0.5).tolist() == [0, 1, 2]
    assert kept(8, 0.75) == 2 and kept(2, 0.9) == 1


def test_heterofl_is_static_and_fedrolex_rolls():
    assert all(PRUNING["heterofl"].units(4, 0.5, round=r).tolist() == [0, 1] for r in range(3))
    assert not PRUNING["heterofl"].rolls and PRUNING["fedrolex"].rolls


def test_fedrolex_window_rolls_each_round_and_covers_every_unit():
    windows = [fedrolex(4, 0.5, round=r).tolist() for r in range(4)]
    assert windows[0] == [0, 1] and windows[1] == [0, 3]
    assert set().union(*windows) == {0, 1, 2, 3}


def test_dropout_subsets_are_seeded_and_of_the_kept_size():
    units = torch.arange(10)
    a = dropout(units, 0.3, generator=torch.Generator().manual_seed(1))
    b = dropout(units, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(a) == 7 and a.tolist() == sorted(set(a.tolist()))


def test_head_columns_pick_the_same_heads_in_q_k_and_v():
    cols = head_columns(torch.tensor([1]), head_dim=2, width=4, parts=3)
    assert cols.tolist() == [2, 3, 6, 7, 10, 11]


def test_heterofl_reference_example_averages_each_element_over_its_holders():
    total = PartialSum.zeros_like({"w": torch.zeros(4)})
    for sub, rows in [(torch.ones(4), None), (torch.full((2,), 3.0), heterofl(4, 0.5))]:
        full, mask = scatter(sub, shape=(4,), rows=rows)
        total.add({"w": full}, weight=1.0, held={"w": mask})
    assert weighted_mean(total)["w"].tolist() == [2.0, 2.0, 1.0, 1.0]


def test_elements_nobody_held_get_no_update():
    total = PartialSum.zeros_like({"w": torch.zeros(3, 4)})
    rows, cols = torch.tensor([0, 2]), torch.tensor([1])
    full, mask = scatter(torch.ones(2, 1), shape=(3, 4), rows=rows, cols=cols)
    total.add({"w": full}, weight=2.0, held={"w": mask})
    mean = weighted_mean(total)["w"]
    assert mean.sum() == 2.0 and mean[0, 1] == 1.0 and mean[2, 1] == 1.0


def test_scatter_puts_back_what_extract_took():
    full = torch.arange(20.0).reshape(4, 5)
    rows, cols = torch.tensor([1, 3]), torch.tensor([0, 2, 4])
    back, mask = scatter(extract(full, rows=rows, cols=cols), shape=(4, 5), rows=rows, cols=cols)
    assert torch.equal(back * mask, back) and torch.equal(back[rows][:, cols], full[rows][:, cols])
    assert float(mask.expand(4, 5).sum()) == 6

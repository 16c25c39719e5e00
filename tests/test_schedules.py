import pytest
import torch

from amortized3d.schedules import Scheduled, TimestepSampler


def test_constant_linear_and_step_schedules():
    assert Scheduled.parse(0.5)(10_000) == 0.5
    lin = Scheduled.parse([[0, 0.98], [5000, 0.5]])
    assert lin(0) == 0.98 and lin(5000) == 0.5 and lin(9999) == 0.5
    assert lin(2500) == pytest.approx(0.74)
    step = Scheduled.parse({"milestones": [[0, 100], [2000, 1]], "interpolation": "step"})
    assert step(1999) == 100 and step(2000) == 1
    assert Scheduled.parse([[100, 1.0], [200, 3.0]])(0) == 1.0  # before the first milestone: held


def test_bad_schedules_say_what_is_wrong():
    with pytest.raises(ValueError, match="increasing"):
        Scheduled.parse([[10, 1], [5, 2]])
    with pytest.raises(ValueError, match="pair"):
        Scheduled.parse([[10, 1, 3]])
    with pytest.raises(TypeError, match="schedule"):
        Scheduled.parse("fast")


def test_timestep_sampler_anneals_and_stays_in_range():
    sampler = TimestepSampler.from_config(0.02, [[0, 0.98], [100, 0.5]], 1000)
    assert sampler.range(0) == (20, 980)
    assert sampler.range(100) == (20, 500)
    t = sampler.sample(10_000, 100, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 20 and int(t.max()) <= 500
    assert abs(t.float().mean().item() - 260) < 5  # uniform on [20, 500]


def test_lr_scale_schedule_sets_group_lrs_from_their_base():
    from amortized3d.system import AmortizedSystem

    opt = torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 4e-3},
                            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}])
    holder = type("Holder", (), {})()
    holder.lr_scale, holder.batch_index = Scheduled.parse([[0, 1.0], [100, 0.1]]), 50
    AmortizedSystem._apply_lr_scale(holder, opt)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([4e-3 * 0.55, 1e-3 * 0.55])
    holder.batch_index = 100
    AmortizedSystem._apply_lr_scale(holder, opt)  # from the base lr, not compounded
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([4e-4, 1e-4])

"""A NaN/Inf loss or gradient: the step is skipped and counted, and nothing in the model,
its buffers, the optimizer or the EMA changes; past the budget the run fails in one line."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.model import VAE
from pipeline.model.config import ModelConfig
from pipeline.train.faults import corrupt_loss
from pipeline.train.step import BadSamples, Objective, SkipBudget, train_step

pytestmark = pytest.mark.timeout(60)


def setup(norm: str = "group"):
    torch.manual_seed(0)
    vae = VAE.from_config(
        ModelConfig(image_size=8, in_channels=1, channels=[2, 4], latent_dim=2, norm=norm)
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-2, weight_decay=1e-2)
    ema = copy.deepcopy(vae).requires_grad_(False)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    step = partial(
        train_step,
        Objective(vae),
        vae,
        opt,
        x,
        kl_weight=1.0,
        free_bits=0.0,
        grad_clip=1.0,
        ema=ema,
        ema_decay=0.9,
    )
    return vae, opt, ema, step


def snapshot(vae, opt, ema):
    return (
        copy.deepcopy(vae.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(ema.state_dict()),
    )


def assert_identical(a, b):
    (ma, oa, ea), (mb, ob, eb) = a, b
    for sa, sb in ((ma, mb), (ea, eb)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k  # bit for bit
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("fault", ["nan_loss", "inf_loss", "inf_grad", "nan_input"])
def test_non_finite_step_is_skipped_and_changes_nothing(norm, fault):
    vae, opt, ema, step = setup(norm)
    assert not step().skipped  # one good step first: optimizer state and EMA exist
    before = snapshot(vae, opt, ema)
    if fault == "nan_loss":
        res = step(inject=lambda loss: loss * float("nan"))
    elif fault == "inf_loss":
        res = step(inject=lambda loss: loss + float("inf"))
    elif fault == "nan_input":  # a corrupt batch: BatchNorm's running stats see NaN
        res = train_step(
            Objective(vae),
            vae,
            opt,
            torch.full((4, 1, 8, 8), float("nan")),
            kl_weight=1.0,
            free_bits=0.0,
            grad_clip=1.0,
            ema=ema,
            ema_decay=0.9,
        )
    else:  # finite loss, one parameter's gradient infinite
        p = next(vae.parameters())
        handle = p.register_hook(lambda g: g * float("inf"))
        res = step()
        handle.remove()
        assert torch.isfinite(res.out["loss"])
    assert res.skipped and not torch.isfinite(res.grad_norm)
    assert_identical(snapshot(vae, opt, ema), before)
    assert all(p.grad is None for p in vae.parameters())  # nothing left for the next step
    # the next good step trains as if the bad one never happened
    ref_vae, ref_opt, ref_ema, ref_step = setup(norm)
    ref_step()
    torch.manual_seed(7)  # the same posterior noise for both
    ref_step()
    torch.manual_seed(7)
    step()
    assert_identical(snapshot(vae, opt, ema), snapshot(ref_vae, ref_opt, ref_ema))


def test_finite_step_changes_weights():
    vae, opt, ema, step = setup()
    before = copy.deepcopy(vae.state_dict())
    res = step()
    assert not res.skipped and torch.isfinite(res.grad_norm)
    assert sum(not torch.equal(before[k], v) for k, v in vae.state_dict().items()) > 10


def test_skip_budget_counts_then_fails_in_one_line():
    budget = SkipBudget(limit=3)
    for skipped in (True, False, True, True):
        budget.record(skipped)
    assert budget.count == 3
    with pytest.raises(PipelineError) as err:
        budget.record(True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("4 steps skipped for a non-finite loss or gradient")
    assert "optim.max_skipped_steps=3" in msg
    assert SkipBudget(limit=0, count=0).count == 0  # resumed budgets start from the checkpoint
    with pytest.raises(PipelineError, match="^6 steps skipped"):
        SkipBudget(limit=5, count=5).record(True)


def test_fault_env_injects_nan_at_listed_steps_only(monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULT_NAN_STEP", "3,5")
    loss = torch.tensor(1.5)
    finite = [s for s in range(1, 8) if torch.isfinite(corrupt_loss(s, 0, loss))]
    assert finite == [1, 2, 4, 6, 7]


def test_bad_sample_totals_survive_resume():
    first = BadSamples()
    assert first.add([{"bad": "decode_error"}, {"bad": "no_image"}]) == 2
    assert first.add([]) == 0
    other_rank = {"decode_error": 3}
    totals = first.totals([other_rank])
    assert totals == {"decode_error": 4, "no_image": 1}
    resumed = BadSamples(totals)  # rank 0 restores the run totals from the checkpoint
    resumed.add([{"bad": "wrong_size"}])
    assert BadSamples.as_metrics(resumed.totals()) == {
        "bad_samples": 6.0,
        "bad_samples.decode_error": 4.0,
        "bad_samples.no_image": 1.0,
        "bad_samples.wrong_size": 1.0,
    }


def test_bad_samples_reconcile_with_the_reader_when_it_raises():
    bad = BadSamples({"no_image": 2})  # restored run total
    bad.add([{"bad": "decode_error"}])
    # the reader counted two more in the batch it failed on, then raised
    assert bad.reconcile({"decode_error": 2, "truncated_shard": 1}) == 2
    assert bad.totals() == {"no_image": 2, "decode_error": 2, "truncated_shard": 1}
    assert bad.reconcile({"decode_error": 2, "truncated_shard": 1}) == 0  # idempotent
    bad.epoch.clear()  # a new epoch: the reader's count starts again
    assert bad.reconcile({"wrong_size": 1}) == 1 and bad.totals()["wrong_size"] == 1


def test_deterministic_failures_are_recorded_once_and_not_replayed(tmp_path):
    from pipeline.data.errors import BadDataError
    from pipeline.train import fatal
    from pipeline.train.step import SkipBudgetExceeded

    url = fatal.fatal_url(str(tmp_path), "run-a")
    assert url == f"{tmp_path}/run-a/pipeline-fatal.json"
    fatal.check(url)  # nothing recorded: a first attempt trains
    assert not fatal.record(url, RuntimeError("a flaky worker"), 3)  # worth a retry
    fatal.check(url)
    err = BadDataError("rank 0: 5 bad samples in epoch 0 exceed max_bad_samples=4; last: x")
    assert fatal.record(url, err, 7)
    with pytest.raises(BadDataError) as again:  # the restarted attempt fails at once
        fatal.check(url)
    assert str(again.value) == (
        f"{err} (at step 7; not retried: a restart would fail the same way)"
    )
    fatal.clear(url)  # a new launch
    fatal.check(url)
    with pytest.raises(SkipBudgetExceeded, match="^6 steps skipped"):
        try:
            SkipBudget(limit=5, count=5).record(True)
        except SkipBudgetExceeded as e:
            assert fatal.record(url, e, 40)
            fatal.check(url)
    fatal.clear(url)
    fatal.clear(url)  # clearing nothing is fine

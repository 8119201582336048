"""Token reduction under bf16 autocast picks the same tokens as in fp32 (issue 13, item 4).

The matching (similarities, argmax, argsort) runs in fp32 whatever the autocast context, so a
reduced model under autocast only differs from fp32 by the low-precision arithmetic of the
blocks, as the unreduced model does.
"""

import pytest
import torch

import vimerge
from vimerge.reduce import rmeeto
from vimerge.reduce.rmeeto import bipartite_plan


def _near_tie_metric(bsz: int = 4, n: int = 65, width: int = 32) -> torch.Tensor:
    """Features whose similarities are close (all near one direction): bf16 scores tie, fp32 not."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(width, generator=g)
    return base + 0.05 * torch.randn(bsz, n, width, generator=g)


@pytest.mark.parametrize("distance", ["cosine", "l1", "l2"])
@pytest.mark.parametrize("prune", [False, True])
def test_plan_under_autocast_equals_fp32_plan(distance, prune):
    metric = _near_tie_metric()
    kwargs = dict(distance=distance, prune=prune)
    fp32 = bipartite_plan(metric, 32, 16, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = bipartite_plan(metric, 32, 16, **kwargs)
        # a low-precision metric (what a bf16 model hands over) is matched in fp32 too
        low = bipartite_plan(metric.bfloat16(), 32, 16, **kwargs)
    assert torch.equal(bf16.slot, fp32.slot)
    assert torch.equal(low.slot, bipartite_plan(metric.bfloat16().float(), 32, 16, **kwargs).slot)
    assert bf16.num_out == fp32.num_out and bf16.cls_index == fp32.cls_index


def _relative_error(model, images) -> float:
    with torch.inference_mode():
        ref = model(images).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images).float()
    return float((low - ref).norm() / ref.norm())


@pytest.mark.parametrize("spec", ["rmeeto:r=8,interval=1", "prune:r=8,interval=1,distance=l2"])
def test_reduced_model_under_autocast_matches_in_fp32(tiny_model, monkeypatch, spec):
    """Inside a reduced model run under bf16 autocast, every plan is the fp32 plan of the
    features the blocks hand over (before: bf16 similarity scores, ties broken at random)."""
    calls = []
    real = rmeeto.bipartite_plan

    def spy(metric, cls_index, r, **kwargs):
        plan = real(metric, cls_index, r, **kwargs)
        calls.append((metric.detach().clone(), cls_index, r, kwargs, plan.slot.clone()))
        return plan

    monkeypatch.setattr(rmeeto, "bipartite_plan", spy)
    model = tiny_model(scan_backend="reference")
    vimerge.apply(model, spec)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(8, 3, 32, 32))
    assert len(calls) == 5
    for metric, cls_index, r, kwargs, slot in calls:
        assert torch.equal(slot, real(metric.float(), cls_index, r, **kwargs).slot)


@pytest.mark.parametrize("spec", ["stm:ratio=0.3", "stm:ratio=0.3,hsp=false"])
def test_stm_under_autocast_agrees_like_the_unreduced(tiny_model, spec):
    """STM's plan is data-free and its HSP weights are computed in fp32: under bf16 autocast its
    logits stay as close to fp32 as the unreduced model's."""
    model = tiny_model(scan_backend="reference")
    images = torch.randn(16, 3, 32, 32)
    base = _relative_error(model, images)
    vimerge.apply(model, spec)
    assert _relative_error(model, images) < max(3 * base, 0.02)

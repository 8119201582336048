"""What the demo measures: the plan (ratios, budgets) and the rows it expands to.

Every row is a reduction spec (:func:`vimerge.reduce.parse_spec`), so a row is rebuilt anywhere
from one string: ``vimerge eval --reduce SPEC``, :func:`vimerge.reduce.apply`, a re-training
config. Reductions happen in every block after the first (``interval=1``, the layer-wise
setting of R-MeeTo's Fig. 1): with 8 blocks and 50 tokens, reducing every second block cannot go
past a ratio of 0.51.

The Transformer rows (R-MeeTo Fig. 1a and Table 4) run the same reductions on ``deit_fmnist``
(the same 50 tokens and 8 blocks). A DeiT reduces between a block's attention and its MLP, from
block 0 on; its rows skip block 0 (``r=[0,r,r,...]``) so that both models keep exactly the same
tokens per block at every ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from vimerge.reduce import format_spec
from vimerge.reduce.schedule import r_for_ratio, reduction_ratio
from vimerge.reduce.stm import settings_for_mean_ratio

MODEL = "vim_fmnist"
TRANSFORMER = "deit_fmnist"
INTERVAL = 1


@dataclass(frozen=True)
class Plan:
    """What the study measures. ``test_images`` None: the whole test set (10,000 images)."""
    ratios: tuple[float, ...] = (0.14, 0.28, 0.42, 0.54)
    stm_own: tuple[float, ...] = (0.15, 0.2, 0.3, 0.4)
    order_ratios: tuple[float, ...] = (0.28, 0.54)
    retrain_ratios: tuple[float, ...] = (0.54,)
    order_retrain_ratio: float | None = 0.54
    transformer: bool = True
    test_images: int | None = None
    secondary_images: int | None = 2000
    retrain_images: int = 8000
    retrain_lr: float = 1e-3
    retrain_batch: int = 64
    batch_size: int = 256
    seed: int = 0
    viz_classes: tuple[int, ...] = (0, 1, 7, 8)   # T-shirt/top, Trouser, Sneaker, Bag


FULL = Plan()
QUICK = Plan(ratios=(0.28, 0.54), stm_own=(0.2, 0.4), order_ratios=(0.54,), test_images=1000,
             secondary_images=None, retrain_images=2000)

FAMILIES = {   # family -> label in tables and plots
    "baseline": "Unreduced",
    "prune": "Pruning",
    "rmeeto": "R-MeeTo (merge)",
    "rmeeto-shuffled": "R-MeeTo, odd-even shuffled",
    "stm-bnnm": "STM: BNNM",
    "stm-hsp": "STM: BNNM + HSP",
    "rmeeto-retrained": "R-MeeTo re-trained",
    "prune-retrained": "Pruning re-trained",
    "rmeeto-shuffled-retrained": "R-MeeTo shuffled, re-trained",
    "deit-baseline": "DeiT unreduced",
    "deit-prune": "DeiT pruning",
    "deit-rmeeto": "DeiT R-MeeTo (merge)",
    "deit-rmeeto-shuffled": "DeiT R-MeeTo, odd-even shuffled",
    "deit-rmeeto-retrained": "DeiT R-MeeTo re-trained",
    "deit-rmeeto-shuffled-retrained": "DeiT R-MeeTo shuffled, re-trained",
}


def family_model(family: str) -> str:
    """The model a family's rows run on."""
    return TRANSFORMER if family.startswith("deit-") else MODEL


@dataclass
class RowSpec:
    """One row of the study: its key, family, human-readable setting and reduction spec.

    ``target``: the mean-token reduction ratio the row is set to (None: STM's own settings and
    the baseline). ``retrain``: the base is re-trained with ``reduce`` before evaluation.
    ``secondary``: evaluated on the first ``Plan.secondary_images`` test images only (to keep
    the full study within its time budget; comparisons pair the images both rows saw).
    """
    key: str
    family: str
    setting: str
    target: float | None
    reduce: str
    retrain: bool = False
    secondary: bool = False

    @property
    def model(self) -> str:
        return family_model(self.family)


def plan_rows(plan: Plan, num_tokens: int, depth: int) -> list[RowSpec]:
    """Every row of the study, in the order they run (training-free first, re-trained last)."""

    def rmeeto(t: float, method: str = "rmeeto", **extra) -> tuple[str, str]:
        r = r_for_ratio(t, num_tokens, depth, INTERVAL)
        return f"ratio {t:g}, r={r}", format_spec(method, {"r": r, "interval": INTERVAL, **extra})

    def deit(t: float, method: str = "rmeeto", **extra) -> tuple[str, str]:
        # the Vim rows' tokens per block: nothing in block 0, r in every later block
        r = r_for_ratio(t, num_tokens, depth, INTERVAL)
        return f"ratio {t:g}, r={r}", format_spec(method, {"r": [0] + [r] * (depth - 1), **extra})

    rows = [RowSpec("baseline", "baseline", "no reduction", None, "none")]
    for t in plan.ratios:
        setting, spec = rmeeto(t)
        rows.append(RowSpec(f"prune@{t:g}", "prune", setting, t, rmeeto(t, "prune")[1]))
        rows.append(RowSpec(f"rmeeto@{t:g}", "rmeeto", setting, t, spec))
    for t in plan.order_ratios:
        setting, spec = rmeeto(t, ordered=False)
        rows.append(RowSpec(f"rmeeto-shuffled@{t:g}", "rmeeto-shuffled", setting, t, spec, secondary=True))
    if plan.transformer:
        rows.append(RowSpec("deit-baseline", "deit-baseline", "no reduction", None, "none"))
        for t in plan.ratios:
            setting, spec = deit(t)
            rows.append(RowSpec(f"deit-prune@{t:g}", "deit-prune", setting, t, deit(t, "prune")[1]))
            rows.append(RowSpec(f"deit-rmeeto@{t:g}", "deit-rmeeto", setting, t, spec))
        for t in plan.order_ratios:
            setting, spec = deit(t, ordered=False)
            rows.append(RowSpec(f"deit-rmeeto-shuffled@{t:g}", "deit-rmeeto-shuffled", setting, t, spec))
    stm: list[tuple[str, str, float | None, dict]] = []
    for t in plan.ratios:   # STM at the tokens R-MeeTo actually keeps at this ratio
        reached = reduction_ratio(r_for_ratio(t, num_tokens, depth, INTERVAL), num_tokens, depth, INTERVAL)
        stm.append((f"{t:g}", f"ratio {t:g}", t, settings_for_mean_ratio(reached, num_tokens, depth)))
    for p in plan.stm_own:   # STM's own settings: the share of tokens gone after the last block
        stm.append((f"own{p:g}", f"STM {round(100 * p)}%", None, {"final_ratio": p}))
    for tag, setting, target, opts in stm:
        if opts.get("per_side") is not None:
            setting += f" (STM {round(100 * opts['final_ratio'])}%, {opts['per_side']}/side)"
        rows.append(RowSpec(f"stm-bnnm@{tag}", "stm-bnnm", setting, target,
                            format_spec("stm", {**opts, "hsp": False}), secondary=True))
        rows.append(RowSpec(f"stm-hsp@{tag}", "stm-hsp", setting, target, format_spec("stm", opts),
                            secondary=True))
    for t in plan.retrain_ratios:   # merging and pruning after the same short re-training (Table 18)
        setting, spec = rmeeto(t)
        rows.append(RowSpec(f"rmeeto-retrained@{t:g}", "rmeeto-retrained", setting, t, spec, retrain=True))
        rows.append(RowSpec(f"prune-retrained@{t:g}", "prune-retrained", setting, t, rmeeto(t, "prune")[1],
                            retrain=True))
    t = plan.order_retrain_ratio    # token order after re-training, Vim and DeiT (Table 4)
    if t is not None:
        setting, spec = rmeeto(t, ordered=False)
        rows.append(RowSpec(f"rmeeto-shuffled-retrained@{t:g}", "rmeeto-shuffled-retrained", setting, t, spec,
                            retrain=True))
        if plan.transformer:
            for fam, extra in (("deit-rmeeto-retrained", {}), ("deit-rmeeto-shuffled-retrained", {"ordered": False})):
                setting, spec = deit(t, **extra)
                rows.append(RowSpec(f"{fam}@{t:g}", fam, setting, t, spec, retrain=True))
    return rows


__all__ = ["MODEL", "TRANSFORMER", "INTERVAL", "Plan", "FULL", "QUICK", "FAMILIES", "family_model", "RowSpec",
           "plan_rows"]

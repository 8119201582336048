"""What the demo measures: the plan (ratios, budgets) and the rows it expands to.

Every row is a reduction spec (:func:`vimerge.reduce.parse_spec`), so a row is rebuilt anywhere
from one string: ``vimerge eval --reduce SPEC``, :func:`vimerge.reduce.apply`, a re-training
config. Reductions happen in every block after the first (``interval=1``, the layer-wise
setting of R-MeeTo's Fig. 1): with 8 blocks and 50 tokens, reducing every second block cannot go
past a ratio of 0.51.
"""

from __future__ import annotations

from dataclasses import dataclass

from vimerge.reduce import format_spec
from vimerge.reduce.schedule import r_for_ratio, reduction_ratio
from vimerge.reduce.stm import settings_for_mean_ratio

MODEL = "vim_fmnist"
INTERVAL = 1


@dataclass(frozen=True)
class Plan:
    """What the study measures. ``test_images`` None: the whole test set (10,000 images)."""
    ratios: tuple[float, ...] = (0.14, 0.28, 0.42, 0.54)
    stm_own: tuple[float, ...] = (0.15, 0.2, 0.3, 0.4)
    order_ratios: tuple[float, ...] = (0.28, 0.54)
    retrain_ratios: tuple[float, ...] = (0.28, 0.54)
    test_images: int | None = None
    retrain_images: int = 8000
    retrain_lr: float = 1e-3
    retrain_batch: int = 64
    batch_size: int = 256
    seed: int = 0
    viz_classes: tuple[int, ...] = (0, 1, 7, 8)   # T-shirt/top, Trouser, Sneaker, Bag


FULL = Plan()
QUICK = Plan(ratios=(0.28, 0.54), stm_own=(0.2, 0.4), order_ratios=(0.54,), test_images=1000,
             retrain_images=2000)

FAMILIES = {   # family -> label in tables and plots
    "baseline": "Unreduced",
    "prune": "Pruning",
    "rmeeto": "R-MeeTo (merge)",
    "rmeeto-shuffled": "R-MeeTo, odd-even shuffled",
    "stm-bnnm": "STM: BNNM",
    "stm-hsp": "STM: BNNM + HSP",
    "rmeeto-retrained": "R-MeeTo re-trained",
}


@dataclass
class RowSpec:
    """One row of the study: its key, family, human-readable setting and reduction spec.

    ``target``: the mean-token reduction ratio the row is set to (None: STM's own settings and
    the baseline). ``retrain``: the base is re-trained with ``reduce`` before evaluation.
    """
    key: str
    family: str
    setting: str
    target: float | None
    reduce: str
    retrain: bool = False


def plan_rows(plan: Plan, num_tokens: int, depth: int) -> list[RowSpec]:
    """Every row of the study, in the order they run (training-free first, re-trained last)."""

    def rmeeto(t: float, method: str = "rmeeto", **extra) -> tuple[str, str]:
        r = r_for_ratio(t, num_tokens, depth, INTERVAL)
        return f"ratio {t:g}, r={r}", format_spec(method, {"r": r, "interval": INTERVAL, **extra})

    rows = [RowSpec("baseline", "baseline", "no reduction", None, "none")]
    for t in plan.ratios:
        setting, spec = rmeeto(t)
        rows.append(RowSpec(f"prune@{t:g}", "prune", setting, t, rmeeto(t, "prune")[1]))
        rows.append(RowSpec(f"rmeeto@{t:g}", "rmeeto", setting, t, spec))
    for t in plan.order_ratios:
        setting, spec = rmeeto(t, ordered=False)
        rows.append(RowSpec(f"rmeeto-shuffled@{t:g}", "rmeeto-shuffled", setting, t, spec))
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
                            format_spec("stm", {**opts, "hsp": False})))
        rows.append(RowSpec(f"stm-hsp@{tag}", "stm-hsp", setting, target, format_spec("stm", opts)))
    for t in plan.retrain_ratios:
        setting, spec = rmeeto(t)
        rows.append(RowSpec(f"rmeeto-retrained@{t:g}", "rmeeto-retrained", setting, t, spec, retrain=True))
    return rows


__all__ = ["MODEL", "INTERVAL", "Plan", "FULL", "QUICK", "FAMILIES", "RowSpec", "plan_rows"]

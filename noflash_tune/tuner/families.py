"""Families far behind the best: no more trials for one within a study (slow), and none at all on a run's later
shapes of the same kind (hopeless)."""
from __future__ import annotations

import math

import optuna

from ..shapes import Shape
from ..variants import FAMILIES

SLOW_FAMILY = 4.0  # a family whose best is over this many times the best candidate's gets no more trials
# A family this far behind the best at some sequence length is not measured at all at longer ones of the same kind,
# later in the same run: at N = 80k the online tier's defaults alone take 21 s a call on an H200.
HOPELESS_FAMILY = 25.0


def family_bests(study: optuna.Study) -> dict[str, float]:
    """The best time (ms) each family measured in ``study``, its native backends each a family of their own."""
    best: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        family = t.user_attrs.get("variant", "").partition("|")[0]
        if family and t.value is not None:
            best[family] = min(best.get(family, math.inf), t.value)
    return best


def _slow_family(study: optuna.Study, vid: str) -> str:
    """Why ``vid``'s family is not worth more trials here: its best time so far is over ``SLOW_FAMILY`` times the
    best of any candidate (measured ones only; a family with no measurement yet is always tried)."""
    family = vid.partition("|")[0]
    bests = family_bests(study)
    if FAMILIES[family].kind == "native" or family not in bests or bests[family] <= SLOW_FAMILY * min(bests.values()):
        return ""
    return (f"family {family} is not competitive here: its best {bests[family]:.3g} ms is over "
            f"{SLOW_FAMILY:g}x the best {min(bests.values()):.3g} ms")


class HopelessFamilies:
    """The families a run found hopeless (over ``HOPELESS_FAMILY`` times the best) on a shape, so that its later
    shapes of the same kind (dtype, head dims, causal, mask, GQA, grad) with as many scores or more skip them."""

    def __init__(self):
        self._seen: dict[tuple, tuple[int, str]] = {}  # (kind, family) -> (L*S where seen, why)

    @staticmethod
    def _kind(shape: Shape) -> tuple:
        b = shape.bucket()
        return (*b.family_key, b.gqa)

    def record(self, shape: Shape, study: optuna.Study | None) -> None:
        best = family_bests(study) if study is not None else {}
        if not best:
            return
        top, size = min(best.values()), shape.L * shape.S
        for family, ms in best.items():
            key = (self._kind(shape), family)
            if (FAMILIES[family].kind != "native" and ms > HOPELESS_FAMILY * top
                    and size < self._seen.get(key, (math.inf, ""))[0]):
                self._seen[key] = (size, f"family {family} was {ms / top:.0f}x behind the best at {shape.label()} "
                                         f"earlier in this run; not measured at as long a sequence or longer")

    def skips(self, shape: Shape) -> dict[str, str]:
        kind, size = self._kind(shape), shape.L * shape.S
        return {family: why for (k, family), (seen, why) in self._seen.items() if k == kind and size >= seen}

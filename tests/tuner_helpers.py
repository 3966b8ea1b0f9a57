"""Stand-ins and look-ups shared by the ``test_tuner_*`` files: this CPU's device key, the trial states, a study
loaded by shape, and two stand-in trial runners (fixed times; one with the online tier far behind)."""
from __future__ import annotations

import optuna

from noflash_tune import device, tuner
from noflash_tune.shapes import Shape
from noflash_tune.trials import variant_id
from noflash_tune.variants import Variant

KEY = device.device_key("cpu")  # not configs.this_device_info: that imports triton at collection
COMPLETE, PRUNED, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL)


def load_study(storage_url: str, shape: Shape) -> optuna.Study:
    return optuna.load_study(study_name=tuner.study_name(KEY, shape, "cpu"), storage=tuner.open_storage(storage_url))


class OnlineFarBehind:
    """A stand-in trial runner: every candidate takes 1 ms, the online tier's 100 ms; it records what it ran."""

    def __init__(self):
        self.ran: list[tuple[Shape, Variant]] = []

    def run(self, variant, shape, cap, budget_ms):
        self.ran.append((shape, variant))
        return {"status": "ok", "ms": 100.0 if variant.family == "torch_online" else 1.0, "peak_bytes": 0}

    def close(self):
        pass


class ReplayRunner:
    """Stands in for the trial worker: every candidate 'runs' at a fixed time (the search logic is under test)."""

    def __init__(self):
        self.ran = []

    def run(self, variant, shape, cap, budget_ms):
        self.ran.append(variant_id(variant))
        return {"status": "ok", "ms": 1.0 + 0.01 * len(self.ran), "p20": 1.0, "p80": 1.0, "peak_bytes": 1 << 20}

    def close(self, kill=False):
        pass

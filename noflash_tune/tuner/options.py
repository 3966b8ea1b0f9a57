"""A tuning run's options, and the trial runner and compile pool they make."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..runtime.native import check_pinning, pinning
from ..trials import TrialRunner, Warmer
from ..variants import FAMILIES


@dataclass
class TuneOptions:
    device: str = "cpu"
    vram_cap_bytes: int | None = None
    trials: int | None = None  # per bucket
    time_budget_s: float | None = None  # for the whole run
    storage: str | None = None
    budget_ms: float | None = None  # timing budget per trial
    in_process: bool = False
    trial_timeout_s: float = 300.0
    seed: int = 0
    # "synthetic": a deterministic cost model instead of running kernels (see ``synthetic_trial``).
    objective: str = "measure"
    synthetic_sleep_ms: float = 5.0
    compile_workers: int | None = None  # processes compiling kernels ahead of the trials; None: auto
    families: tuple[str, ...] | None = None  # search only these of our families (natives always); None: all
    # "math": every native measurement and comparison of the run with native's fused backends switched off, as on
    # a GPU without them (runtime.native.math_only): its entries record it ("native_pinned": "math").
    native: str = "all"

    def __post_init__(self):
        if self.families is not None:  # a worker process gets them back from asdict() as a list
            self.families = tuple(sorted(self.families))
        check_pinning(self.native)

    def native_context(self):
        """The context every process of the run measures in: native as it is, or its math path alone."""
        return pinning(self.native)

    def searches_triton(self) -> bool:
        """Whether any Triton family is searched (else no kernel is compiled ahead of its trial)."""
        return self.families is None or any(FAMILIES[n].kind == "triton" for n in self.families if n in FAMILIES)

    def warmer(self, share: int = 1) -> Warmer | None:
        """The pool compiling Triton kernels ahead of their trials: on GPUs, one process per spare CPU core
        (split between ``share`` tuning processes); none on CPUs, for the synthetic objective, or for a run that
        searches no Triton family (``--families torch``)."""
        n = self.compile_workers
        if n is None:
            n = 0 if torch.device(self.device).type == "cpu" else min(16, max(0, (os.cpu_count() or 1) - 2))
        n //= max(1, share)
        return Warmer(self.device, n) if n > 0 and self.objective == "measure" and self.searches_triton() else None

    @property
    def trial_budget_ms(self) -> float:
        """The timing budget of one trial (crowning's re-measurements take twice as long)."""
        return self.budget_ms or 100.0

    def trial_runner(self) -> TrialRunner:
        return TrialRunner(self.device, in_process=self.in_process, timeout_s=self.trial_timeout_s,
                           objective=self.objective, sleep_ms=self.synthetic_sleep_ms, native=self.native)

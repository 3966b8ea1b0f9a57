"""What a tuning run measured, read back from its optuna storage: per bucket, every trial's variant, status, time.

    python bench/tune_log.py journal:path/to/optuna-journal.log [--all]

Trials pruned analytically or as a family far behind are counted, not listed, unless --all. The table of winners
is `noflash-tune show`; this is the search behind it (what ran, what failed the accuracy check and why, what a
deadline left unrun).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from noflash_tune import tuner  # noqa: E402
from noflash_tune.shapes import Shape  # noqa: E402

QUIET = ("pruned_analytic", "pruned_family")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("storage", help="an optuna storage URL (journal:PATH, sqlite:///…, postgresql://…)")
    ap.add_argument("--all", action="store_true", help="list the analytic and family prunes too")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = tuner.open_storage(args.storage)
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        shape = Shape(**study.user_attrs["shape"]) if "shape" in study.user_attrs else None
        print(f"\n{shape.label() if shape else summary.study_name}  ({summary.study_name})")
        rows, quiet = [], collections.Counter()
        for t in study.get_trials(deepcopy=False):
            status = t.user_attrs.get("status", t.state.name.lower())
            if status in QUIET and not args.all:
                quiet[status] += 1
                continue
            secs = (t.datetime_complete - t.datetime_start).total_seconds() \
                if t.datetime_complete and t.datetime_start else float("nan")
            rows.append((t.value if t.value is not None else float("inf"), status,
                         t.user_attrs.get("variant", "?"), t.user_attrs.get("reason", ""), secs))
        for ms, status, vid, why, secs in sorted(rows, key=lambda r: (r[0], r[1], r[2])):
            shown = f"{ms:9.3f}" if ms != float("inf") else "        -"
            print(f"  {shown} ms  {status:16} {vid}" + (f"  [{why[:90]}]" if why else "") + f"  ({secs:.1f} s)")
        if quiet:
            print("  not listed: " + ", ".join(f"{n} {k}" for k, n in sorted(quiet.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

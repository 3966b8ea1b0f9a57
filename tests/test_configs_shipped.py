"""The tuned_configs shipped in the package: each file passes the schema with nothing dropped, and no entry's
winner was measured with templates other than today's (a template edit that would leave a shipped bucket to be
skipped as stale on its device, at a user's first call, fails here instead: re-tune the bucket or drop it)."""
from __future__ import annotations

import warnings

import pytest

from noflash_tune import configs, paths
from noflash_tune.configs.fingerprint import family_templates_for

SHIPPED = sorted(paths.shipped_configs_dir().glob("*.json"))


def test_the_package_ships_tuned_configs():
    assert {p.stem for p in SHIPPED} >= {"sm_90", "cpu-x86_64"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_file_is_valid_and_its_winners_use_todays_templates(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dropped entry or runner-up warns
        cfg = configs.load_file(path)
    assert cfg.entries and not cfg.dropped
    assert cfg.device.key == path.stem
    today = dict(family_templates_for(cfg.device.key))
    tuned = dict(cfg.device.family_templates or ())
    stale = sorted({f"{e.winner.family}: tuned {tuned.get(e.winner.family)}, today {today[e.winner.family]}"
                    for e in cfg.entries.values()
                    if e.winner.kind != "native" and tuned.get(e.winner.family) != today[e.winner.family]})
    assert not stale, f"{path.name}: entries whose templates changed since tuning: {stale}"

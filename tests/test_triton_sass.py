"""The Triton forward as it compiles for Hopper (sm_90), checked on a CPU: Triton cross-compiles with its bundled
ptxas, and `bench/triton_sass.py` reads the cubin. What an H100/H200 user relies on: the tiles the tuner seeds
first compile to warpgroup MMAs with 16-byte (or bulk tensor) loads and no register spills, and the
warp-specialised variant really is warp-specialised."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "nvdisasm").exists() or not (TOOLS / "ptxas").exists(),
                                reason="this triton build bundles no NVIDIA toolchain")


def _compiled(tile, E, causal=False):
    """bench/triton_sass.py's report for one tile, from a process without TRITON_INTERPRET (this suite's kernels
    are interpreted; these are compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(REPO / "bench" / "triton_sass.py"), "--json", "-L", "1024", "-D", str(E),
           "--tile", ",".join(map(str, tile))] + (["--causal"] if causal else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in rep, rep
    return rep


@pytest.mark.parametrize("E,causal", [(128, False), (64, True)])
def test_the_first_seed_tile_compiles_to_wgmma_with_16_byte_async_loads_and_no_spills(E, causal):
    rep = _compiled((128, 128, 8, 3, 0, 0), E=E, causal=causal)
    assert rep["HGMMA"] > 0 and rep["HMMA"] == 0, rep
    assert rep["LDGSTS.128"] > 0 and rep["LDG narrower"] == 0, rep
    assert rep["local ld/st (spills)"] == 0, rep
    assert rep["shared KiB"] <= 227, rep


def test_the_tensor_map_tile_loads_through_the_bulk_copy_engine():
    rep = _compiled((128, 128, 8, 3, 0, 1), E=128)
    assert rep["UTMALDG"] > 0 and rep["LDGSTS.128"] == 0 and rep["HGMMA"] > 0, rep


def test_tma2_is_warp_specialised_for_hopper():
    rep = _compiled((128, 128, 4, 2, 0, 2), E=128)
    assert rep["warp-specialised"] and rep["warps"] > 4, rep
    assert rep["UTMALDG"] > 0 and rep["HGMMA"] > 0, rep

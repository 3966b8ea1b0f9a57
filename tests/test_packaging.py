"""A non-editable install (a wheel in a fresh venv) finds its templates and tuned_configs and runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys
import torch
import noflash_tune
from noflash_tune import Variant, codegen, paths, render
from noflash_tune.runtime.native import original_sdpa

src = render(Variant("torch_online"))
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
out = noflash_tune.attention(q, k, v, variant=Variant("torch_online", block_m=32, block_n=64), is_causal=True)
err = (out - original_sdpa(q, k, v, is_causal=True)).abs().max().item()
tdir = codegen.templates_dir()
print(json.dumps({
    "package": noflash_tune.__file__,
    "templates": str(tdir),
    "template_files": sorted(p.relative_to(tdir).as_posix() for p in tdir.rglob("*.j2")),
    "configs": str(paths.shipped_configs_dir()),
    "configs_is_dir": paths.shipped_configs_dir().is_dir(),
    "source_has_forward": "def forward(" in src and "BLOCK_N = 512" in src,
    "max_err": err,
    "patched": noflash_tune.is_enabled(),
}))
"""


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
    return res


def test_wheel_in_a_fresh_venv_ships_templates_and_configs(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
          "-q", REPO, "-w", wheels], cwd=REPO)
    (wheel,) = wheels.glob("noflash_tune-*.whl")

    venv = tmp_path / "venv"
    # A venv without a pip of its own (seeding one takes seconds): this interpreter's pip installs into it.
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", wheel])
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    # torch, jinja2, optuna... resolve from this interpreter's site-packages, after the fresh venv's own.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_parent_site.pth").write_text("\n".join(sorted(ours)) + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = _run([venv / "bin" / "python", "-c", PROBE], cwd=outside, env=env)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    venv_root = venv.resolve()
    for key in ("package", "templates", "configs"):
        assert Path(info[key]).resolve().is_relative_to(venv_root), (key, info[key])
    assert info["configs_is_dir"]
    repo_templates = sorted(p.relative_to(REPO / "templates").as_posix() for p in (REPO / "templates").rglob("*.j2"))
    assert info["template_files"] == repo_templates
    assert info["source_has_forward"]
    assert info["max_err"] < 1e-5
    assert info["patched"]

    # The console script is installed and runs from anywhere.
    res = _run([venv / "bin" / "noflash-tune", "explain", "-H", "2", "-L", "64", "-D", "16", "--gpu", "cpu"],
               cwd=outside, env=env)
    assert "noflash-tune plan for q(1, 2, 64, 16)" in res.stdout

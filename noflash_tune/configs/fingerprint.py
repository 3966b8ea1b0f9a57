"""Fingerprints: what a tuned entry's measurements depend on, and why an entry may no longer hold.

An entry is served but marked ``.stale`` (with the reason) when the file's torch major.minor differs from this
machine's, or, where it matters for the winner, its triton version (Triton winners) or the templates hash of the
winner's family (any winner rendered from a template, i.e. not ``native:*``): its own templates and the shared
partials (``_*.j2``) of their folders, so adding or editing another family's template leaves it fresh. The
families hashed are those that can serve on the file's device: all of them on a GPU, the PyTorch tiers alone on a
CPU, where Triton never serves. A schema 1 file's entries follow the combined ``templates_hash`` instead, as does
any comparison with a schema 1 header. A winner whose family the file does not hash is stale (tuned before that
family's templates existed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .. import variants as _variants
from ..variants import Variant


def _torch_minor(version: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


@dataclass(frozen=True)
class Fingerprint:
    """The strict fingerprint an entry's measurements depend on (DESIGN lesson 6). ``family_templates``: the
    templates hash of each family that can serve on the device (``None``: unknown, a schema 1 file)."""

    torch: str
    triton: str | None
    templates_hash: str
    family_templates: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def current(cls, device_key: str) -> "Fingerprint":
        """This machine's fingerprint now, for entries of ``device_key`` (its templates hashes depend on it)."""
        from .. import device as _device

        v = _device.versions()
        return cls(torch=v["torch"], triton=v["triton"], templates_hash=templates_hash_for(device_key),
                   family_templates=family_templates_for(device_key))

    def family_hash(self, family: str) -> str | None:
        """The templates hash of ``family`` (``None``: not in this fingerprint)."""
        return dict(self.family_templates or ()).get(family)


def _serving_families(device_key: str) -> list:
    """The families rendered from templates that can serve on ``device_key``'s device: all of them on a GPU; on a
    CPU the PyTorch tiers alone (Triton never serves there)."""
    from .. import device as _device

    cpu = _device.is_cpu_key(device_key)
    return [f for f in _variants.FAMILIES.values() if f.kind != "native" and not (cpu and f.kind == "triton")]


def _hash_or_zero(fn: Callable[..., str], *args) -> str:
    """``fn(*args)``, or "0" where the templates folder is missing (nothing renders then)."""
    try:
        return fn(*args)
    except FileNotFoundError:
        return "0"


def templates_hash_for(device_key: str) -> str:
    """The hash of the templates whose kernels can serve on ``device_key``'s device, all together: every template
    on a GPU; on a CPU only the PyTorch tiers', so a Triton template edit leaves it unchanged there."""
    from .. import codegen

    templates = tuple(t for f in _serving_families(device_key) for t in f.templates)
    return _hash_or_zero(codegen.templates_hash, templates)


def family_templates_for(device_key: str) -> tuple[tuple[str, str], ...]:
    """Each family that can serve on ``device_key``'s device with the hash of its own templates (and the partials
    they include, :func:`noflash_tune.codegen.family_templates_hash`), sorted by family."""
    from .. import codegen

    return tuple(sorted((f.name, _hash_or_zero(codegen.family_templates_hash, f.name))
                        for f in _serving_families(device_key)))


def _version_reasons(kind: str, tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """The torch major.minor (any winner) and the triton version (Triton winners) that differ."""
    out = []
    if _torch_minor(tuned.torch) != _torch_minor(now.torch):
        out.append(f"tuned with torch {_torch_minor(tuned.torch)}, running torch {_torch_minor(now.torch)}")
    if kind == "triton" and tuned.triton != now.triton:
        out.append(f"tuned with triton {tuned.triton}, running triton {now.triton}")
    return out


def _combined_reasons(tuned: Fingerprint, now: Fingerprint) -> list[str]:
    if tuned.templates_hash == now.templates_hash:
        return []
    return [f"templates changed since tuning ({tuned.templates_hash} -> {now.templates_hash})"]


def _template_reasons(family: str, tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """Whether ``family``'s templates differ: by its own hash where both fingerprints have one per family, else
    (a schema 1 side) by the combined hash."""
    if tuned.family_templates is None or now.family_templates is None:
        return _combined_reasons(tuned, now)
    was, cur = tuned.family_hash(family), now.family_hash(family)
    if was is None:
        return [f"tuned before family {family}'s templates existed"]
    if cur is None:
        return [f"no hash of family {family}'s templates to compare with"]
    if was != cur:
        return [f"templates of {family} changed since tuning ({was} -> {cur})"]
    return []


def stale_reasons(winner: Variant, tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """Why an entry with ``winner``, measured under ``tuned``, may not hold under ``now`` (empty: fresh).

    torch major.minor matters for every winner (the tiers run torch GEMMs; native is torch's own); the triton
    version only for Triton winners; for every winner rendered from a template, the templates hash of its family
    (the combined hash where either fingerprint has none per family).
    """
    out = _version_reasons(winner.kind, tuned, now)
    if winner.kind != "native":
        out += _template_reasons(winner.family, tuned, now)
    return out


def _full_diff(tuned: Fingerprint, now: Fingerprint) -> list[str]:
    """Every fingerprint difference that matters to some winner of today's families: torch, triton, and the
    templates of every family either fingerprint hashes (or the combined hash)."""
    out = _version_reasons("triton", tuned, now)
    if tuned.family_templates is None or now.family_templates is None:
        return out + _combined_reasons(tuned, now)
    names = {n for n, _ in tuned.family_templates + now.family_templates} & set(_variants.FAMILIES)
    return out + [r for n in sorted(names) for r in _template_reasons(n, tuned, now)]

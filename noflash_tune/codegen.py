"""Render a Variant's templates into Python source, and load it as a module.

Only validated values reach a template: a :class:`Variant`'s params (members of a finite search space: ints and
enum strings) and a :class:`Specialization` (bools and one enum). jinja2 runs with ``StrictUndefined`` in a
sandboxed environment. Rendered modules are cached on disk by content hash (Triton needs real files to read its
kernels' source) and in memory by (variant, specialisation).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .variants import FAMILIES, Variant

MASK_KINDS = ("none", "bool", "float")


def templates_dir() -> Path:
    """``templates/``: inside the installed package (wheel), else at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "templates", here.parent / "templates"):
        if (cand / "torch").is_dir():
            return cand
    raise FileNotFoundError(f"noflash-tune's templates/ folder is missing (looked in {here} and {here.parent})")


@dataclass(frozen=True)
class Specialization:
    """The compile-time branches a rendered variant is specialised for."""

    causal: bool = False
    mask: str = "none"
    gqa: bool = False
    dropout: bool = False
    causal_bottom_right: bool = False
    # Beyond SDPA (the PyTorch tiers and the `triton` family render them; the other Triton families' reasons
    # refuse such calls): ``band``, a window or per-batch key lengths (the per-row key range of
    # contract.FeatureArgs); ``softcap``; ``alibi``.
    band: bool = False
    softcap: bool = False
    alibi: bool = False

    def __post_init__(self):
        for name in ("causal", "gqa", "dropout", "causal_bottom_right", "band", "softcap", "alibi"):
            if type(getattr(self, name)) is not bool:
                raise TypeError(f"Specialization.{name} must be bool")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"Specialization.mask must be one of {MASK_KINDS}, got {self.mask!r}")

    @property
    def banded(self) -> bool:
        """The PyTorch tiers' per-row key range is rendered: a band, or a bottom-right causal pattern."""
        return self.band or (self.causal and self.causal_bottom_right)

    @property
    def features(self) -> bool:
        """A PyTorch tier rendered for this takes the call's ``contract.FeatureArgs`` (``feat``)."""
        return self.banded or self.softcap or self.alibi

    @classmethod
    def of(cls, call) -> "Specialization":
        return cls(causal=call.causal, mask=call.mask_kind, gqa=call.groups > 1, dropout=call.dropout_p > 0,
                   causal_bottom_right=bool(call.causal and call.bottom_right),
                   band=call.window is not None or call.kv_lens is not None, softcap=call.softcap is not None,
                   alibi=call.alibi is not None)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


_COMPUTE_EXPR = {"input": "None", "fp32": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}


def _context(variant: Variant, spec: Specialization) -> dict:
    ctx: dict = {}
    for key, value in variant.params.items():
        if type(value) not in (int, str):  # a Variant only holds space members; this guards the template anyway
            raise TypeError(f"template parameter {key} must be int or str, got {type(value).__name__}")
        ctx[key] = value
    ctx.update(causal=spec.causal, mask=spec.mask, gqa=spec.gqa, dropout=spec.dropout,
               causal_bottom_right=spec.causal_bottom_right, band=spec.banded, softcap=spec.softcap,
               alibi=spec.alibi, features=spec.features,
               # the Triton templates' band: a window or per-batch key lengths alone (their bottom-right causal
               # pattern without either is the causal_bottom_right flag's)
               feature_band=spec.band,
               params_repr=", ".join(f"{k}={v}" for k, v in variant.params.items()))
    if "compute" in variant.params:
        ctx["compute_expr"] = _COMPUTE_EXPR[variant.params["compute"]]
    return ctx


def render(variant: Variant, spec: Specialization | None = None, template: int = 0) -> str:
    """The generated source of ``variant`` (its ``template``-th template), specialised for ``spec``."""
    if not isinstance(variant, Variant):
        raise TypeError("render() takes a Variant")
    names = variant.spec.templates
    if not names:
        raise ValueError(f"{variant.family} is a native backend: it has no template")
    return _env().get_template(names[template]).render(**_context(variant, spec or Specialization()))


def render_all(variant: Variant, spec: Specialization | None = None) -> str:
    return "\n".join(render(variant, spec, i) for i in range(len(variant.spec.templates)))


def _hash_files(root: Path, paths) -> str:
    """A hash of ``paths`` (in the order given) by their names relative to ``root`` and their contents."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


@lru_cache(maxsize=8)
def templates_hash(templates: tuple[str, ...] | None = None) -> str:
    """A hash of the folders holding ``templates`` (names as in ``Family.templates``; default: every template),
    their includes too: tuned entries made from other templates are flagged stale."""
    root = templates_dir()
    folders = [root] if templates is None else sorted({(root / t).parent for t in templates})
    return _hash_files(root, (path for folder in folders for path in sorted(folder.rglob("*.j2"))))


def _referenced_templates(name: str) -> set[str]:
    """``name`` and every template it imports, includes or extends, transitively (names as the loader takes them)."""
    from jinja2 import meta

    env, seen, todo = _env(), set(), [name]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        source = env.loader.get_source(env, t)[0]
        todo += [r for r in meta.find_referenced_templates(env.parse(source)) if r is not None]
    return seen


@lru_cache(maxsize=16)
def family_templates_hash(family: str) -> str:
    """A hash of the templates ``family`` renders: its own files and every template they import (the shared
    partials). Another family's own template, added or edited, leaves it unchanged."""
    root = templates_dir()
    names = set().union(*(_referenced_templates(t) for t in FAMILIES[family].templates))
    return _hash_files(root, sorted(root / t for t in names))


def clear_hash_caches() -> None:
    """Forget the template hashes computed so far (after the templates changed on disk)."""
    templates_hash.cache_clear()
    family_templates_hash.cache_clear()


def cache_dir() -> Path:
    from .paths import user_cache_dir

    d = Path(os.environ.get("NOFLASH_TUNE_KERNEL_CACHE") or user_cache_dir() / "kernels")
    d.mkdir(parents=True, exist_ok=True)
    return d


_modules: dict[tuple, ModuleType] = {}
_lock = threading.Lock()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load(variant: Variant, spec: Specialization | None = None, template: int = 0) -> ModuleType:
    """Render, write (once, by content hash) and import the generated module."""
    spec = spec or Specialization()
    key = (variant, spec, template)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        source = render(variant, spec, template)
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        name = f"noflash_tune_gen_{variant.family}_{digest}"
        path = cache_dir() / f"{name}.py"
        if not path.exists() or path.read_text() != source:
            _write_atomic(path, source)
        module_spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = mod  # triton resolves a kernel's globals through its module
        module_spec.loader.exec_module(mod)
        _modules[key] = mod
        return mod

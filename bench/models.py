"""Whole models through the patch: a ~100M-parameter random-init HF Llama (prefill, training step) and a
diffusers-style attention block, each under four SDPA configurations.

    python bench/models.py --device cuda --out bench/out     # bf16: Llama prefill 8k, train step 4k, block 4k/16k
    python bench/models.py --device cpu --tiny               # every size shrunk: a CPU check in well under a minute
    python bench/models.py --configs best,tune-nofused       # a subset: best, math, tune, tune-nofused

Configurations: "native best" (noflash-tune disabled, native SDPA with all its backends), "native math-only"
(disabled, native pinned to its math backend: a GPU without fused kernels), "noflash-tune" (enabled, its default
dispatch: tuned winner or native), "noflash-tune, no fused native" (enabled while native's flash, efficient and
cuDNN backends are switched off: where native has only math, noflash-tune's kernels serve).

For each workload it computes a reference once (the model upcast, fp32 for bf16 runs and fp64 for fp32 runs, on
native's math path) and native best's error against it. Each row then runs once untimed and passes when its
error in every output is at most 2x native best's plus a rounding floor (the shape of the accuracy rule in
noflash_tune/measure.py, applied to model outputs); then it is timed (noflash_tune.measure.time_fn) and its peak
memory taken (measure.peak_extra_bytes). An OOM is recorded as such. DIR/models.json holds every row with the
device and versions; the table is printed last.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noflash_tune  # noqa: E402
from noflash_tune import device as devmod, measure  # noqa: E402
from noflash_tune.runtime import dispatch  # noqa: E402
from noflash_tune.runtime.fallback import is_oom  # noqa: E402
from noflash_tune.runtime.native import pinned  # noqa: E402

BEST, MATH, TUNE, TUNE_NOFUSED = ("native best", "native math-only", "noflash-tune",
                                  "noflash-tune, no fused native")
CONFIGS = (BEST, MATH, TUNE, TUNE_NOFUSED)
CONFIG_KEYS = {"best": BEST, "math": MATH, "tune": TUNE, "tune-nofused": TUNE_NOFUSED}

# --- configurations ----------------------------------------------------------------------------------------

_FUSED_FLAGS = (("flash_sdp_enabled", "enable_flash_sdp"), ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
                ("cudnn_sdp_enabled", "enable_cudnn_sdp"))


def _fused_flags() -> list[bool]:
    return [getattr(torch.backends.cuda, getter)() for getter, _ in _FUSED_FLAGS]


def _set_fused_flags(values) -> None:
    for (_, setter), value in zip(_FUSED_FLAGS, values):
        getattr(torch.backends.cuda, setter)(value)


@contextlib.contextmanager
def configuration(name: str):
    """Run the body under one of CONFIGS; the patch state and native's backend flags are restored after."""
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; one of {CONFIGS}")
    was_enabled = noflash_tune.is_enabled()
    flags = _fused_flags()
    # The dispatcher caches a plan per bucket and its key does not include native's backend flags: forget the
    # plans whenever the flags change, else a plan made with fused native on would be reused with it off.
    noflash_tune.clear_cache()
    try:
        if name in (BEST, MATH):
            noflash_tune.disable()
        else:
            noflash_tune.enable()
        if name == TUNE_NOFUSED:
            _set_fused_flags([False] * len(_FUSED_FLAGS))
        with pinned("math" if name == MATH else None):
            yield
    finally:
        _set_fused_flags(flags)
        if was_enabled:
            noflash_tune.enable()
        else:
            noflash_tune.disable()
        noflash_tune.clear_cache()


def _plan_label(plan) -> str:
    if plan.variant is None:  # passed through; native picks among the fused backends that take the call
        return "native:" + ("/".join(plan.native_backends) or "math")
    return f"{plan.variant.family} ({plan.source})"  # no square brackets: rich reads them as markup


@contextlib.contextmanager
def recording_plans():
    """Count what the dispatcher chose for each SDPA call made in the body (a Counter of labels)."""
    seen: collections.Counter = collections.Counter()
    real = dispatch.route_for

    def spy(plan):
        route, label = real(plan), _plan_label(plan)

        def counted(*args):
            seen[label] += 1
            return route(*args)
        return counted

    dispatch.route_for = spy
    noflash_tune.clear_cache()  # routes made from here on count their calls
    try:
        yield seen
    finally:
        dispatch.route_for = real
        noflash_tune.clear_cache()


# --- workloads ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One benchmark subject, built on a device: ``step`` is timed, ``outputs`` is what the check compares, and
    ``reference`` computes the same outputs on an upcast copy (call it under native math)."""

    name: str
    tokens: int  # tokens processed by one step
    step: Callable[[], object]
    outputs: Callable[[], dict]
    reference: Callable[[], dict]
    reset: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)


@dataclass
class Spec:
    name: str
    build: Callable[[torch.device, torch.dtype], Workload]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _token_ids(vocab: int, batch: int, length: int, dev, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(dev)


def _upcast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(module).to(dtype)


def llama_config(tiny: bool):
    import transformers

    if tiny:
        size = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    else:  # 8 q heads of 128 sharing 2 kv heads; 100.4M parameters with the tied 32k embedding
        size = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    return transformers.LlamaConfig(tie_word_embeddings=True, attn_implementation="sdpa", **size)


def build_llama(cfg, dev, dtype, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"Llama got attention {model.config._attn_implementation!r}, not sdpa")
    return model.to(device=dev, dtype=dtype)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _llama_info(model, cfg, batch, length) -> dict:
    return dict(params=param_count(model), hidden=cfg.hidden_size, layers=cfg.num_hidden_layers,
                heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                head_dim=cfg.hidden_size // cfg.num_attention_heads, vocab=cfg.vocab_size, batch=batch,
                length=length)


def _llama_and_tokens(tiny: bool, dev, dtype, length: int, train: bool):
    cfg = llama_config(tiny)
    model = build_llama(cfg, dev, dtype).train(train)
    return cfg, model, _token_ids(cfg.vocab_size, 1, length, dev)


def llama_prefill(tiny: bool) -> Spec:
    length = 256 if tiny else 8192

    def build(dev, dtype):
        cfg, model, ids = _llama_and_tokens(tiny, dev, dtype, length, train=False)

        def logits(m):
            with torch.no_grad():
                return m(input_ids=ids).logits

        def reference():
            ref = _upcast(model, reference_dtype(dtype))
            return {"logits": logits(ref)}

        info = _llama_info(model, cfg, 1, length)
        return Workload(name=f"Llama {info['params'] / 1e6:.3g}M prefill B=1 L={length}", tokens=length,
                        step=lambda: logits(model), outputs=lambda: {"logits": logits(model)},
                        reference=reference, info=info)
    return Spec(f"Llama prefill L={length}", build)


def llama_train(tiny: bool) -> Spec:
    length = 256 if tiny else 4096

    def build(dev, dtype):
        cfg, model, ids = _llama_and_tokens(tiny, dev, dtype, length, train=True)

        def step(m=model):
            m.zero_grad(set_to_none=True)
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            return out

        def collect(m):
            out = step(m)
            grads = torch.cat([p.grad.flatten() for n, p in m.named_parameters()
                               if "self_attn" in n and p.grad is not None])
            result = {"loss": out.loss.detach().reshape(1), "logits": out.logits.detach(),
                      "attention grads": grads}
            m.zero_grad(set_to_none=True)
            return result

        def reference():
            ref = _upcast(model, reference_dtype(dtype))
            return collect(ref)

        info = _llama_info(model, cfg, 1, length)
        return Workload(name=f"Llama {info['params'] / 1e6:.3g}M train step B=1 L={length}", tokens=length,
                        step=lambda: step().loss.detach(), outputs=lambda: collect(model), reference=reference,
                        reset=lambda: model.zero_grad(set_to_none=True), info=info)
    return Spec(f"Llama train step L={length}", build)


class DiffusersStyleAttention(nn.Module):
    """A diffusers-style spatial self-attention block on (B, C, H, W) latents: GroupNorm, to_q/to_k/to_v, heads
    of ``head_dim``, SDPA (not causal), heads merged, to_out, residual."""

    def __init__(self, channels: int, head_dim: int = 64, groups: int = 32):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"{channels} channels do not split into heads of {head_dim}")
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        tokens = self.norm(x.reshape(b, c, n)).transpose(1, 2)  # (B, N, C)

        def split(t):
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)

        q, k, v = split(self.to_q(tokens)), split(self.to_k(tokens)), split(self.to_v(tokens))
        out = F.scaled_dot_product_attention(q, k, v)  # looked up per call: the patch applies
        out = self.to_out(out.transpose(1, 2).reshape(b, n, c))
        return out.transpose(1, 2).reshape(b, c, h, w) + x


def attention_block(tiny: bool, batch: int, side: int) -> Spec:
    channels = 128 if tiny else 640
    name = f"attn block C={channels} B={batch} N={side * side}"

    def build(dev, dtype):
        torch.manual_seed(0)
        block = DiffusersStyleAttention(channels).to(device=dev, dtype=dtype).eval()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(batch, channels, side, side, generator=g).to(device=dev, dtype=dtype)

        def run(m, inp):
            with torch.no_grad():
                return m(inp)

        def reference():
            rdt = reference_dtype(dtype)
            return {"out": run(_upcast(block, rdt), x.to(rdt))}

        info = dict(params=param_count(block), channels=channels, heads=block.heads, head_dim=block.head_dim,
                    batch=batch, length=side * side)
        return Workload(name=name, tokens=batch * side * side, step=lambda: run(block, x),
                        outputs=lambda: {"out": run(block, x)}, reference=reference, info=info)
    return Spec(name, build)


def workloads(tiny: bool = False) -> list[Spec]:
    """The four workloads; ``tiny`` shrinks every size (2 layers, hidden 128, N 256) for a CPU run."""
    blocks = [(2, 16), (1, 32)] if tiny else [(2, 64), (1, 128)]
    return [llama_prefill(tiny), llama_train(tiny)] + [attention_block(tiny, b, s) for b, s in blocks]


# --- accuracy ----------------------------------------------------------------------------------------------


def max_abs_errors(outputs: dict, ref: dict) -> dict:
    errs = {}
    for name, r in ref.items():
        e = (outputs[name].detach().to(r.dtype) - r).abs().max().item()
        errs[name] = math.inf if math.isnan(e) else e
    return errs


@dataclass
class Baseline:
    ref: dict  # output name -> reference tensor (upcast model, native math)
    errors: dict  # output name -> native best's max abs error against ref
    floors: dict  # output name -> rounding floor in the run dtype


def judge(outputs: dict, base: Baseline) -> dict:
    """Every output's error at most 2x native best's plus the floor."""
    errs = max_abs_errors(outputs, base.ref)
    per = {n: dict(err=e, native_best_err=base.errors[n], bound=2 * base.errors[n] + base.floors[n])
           for n, e in errs.items()}
    ratio = max((p["err"] / p["native_best_err"] if p["native_best_err"] > 0 else (0.0 if p["err"] == 0 else
                                                                                  math.inf)) for p in per.values())
    return dict(ok=all(p["err"] <= p["bound"] for p in per.values()), ratio=ratio, outputs=per)


def baseline_for(wl: Workload, dtype: torch.dtype) -> Baseline:
    with configuration(MATH):
        ref = wl.reference()
    _free()
    with configuration(BEST):
        ours = wl.outputs()
    errors = max_abs_errors(ours, ref)
    del ours
    return Baseline(ref=ref, errors=errors, floors={n: measure.rounding_floor(r, dtype) for n, r in ref.items()})


# --- rows ----------------------------------------------------------------------------------------------------


def _free(dev=None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (dev is None or torch.device(dev).type == "cuda"):
        torch.cuda.empty_cache()


def _served(cfg: str, seen: collections.Counter) -> str:
    if cfg == BEST:
        return "native"
    if cfg == MATH:
        return "native:math"
    if not seen:
        return "native (not dispatched)"
    return ", ".join(f"{label} x{n}" for label, n in seen.most_common())


def measure_row(wl: Workload, cfg: str, base: Baseline | None, dev, budget_ms: float) -> dict:
    """One (workload, configuration) row: the check once, then the time and the peak memory."""
    row = dict(workload=wl.name, configuration=cfg, tokens=wl.tokens, ms=None, p20=None, p80=None,
               tokens_per_s=None, peak_mib=None, speedup=None, accuracy=None, served=None, error=None)
    outs = None
    try:
        with configuration(cfg):
            with recording_plans() as seen:
                outs = wl.outputs()
            row["served"] = _served(cfg, seen)
            if base is not None:
                row["accuracy"] = judge(outs, base)
            outs = None
            _free(dev)
            t = measure.time_fn(wl.step, dev, budget_ms)
            row.update(ms=t.ms, p20=t.p20, p80=t.p80, tokens_per_s=wl.tokens / (t.ms / 1000))
            wl.reset()
            _free(dev)
            peak = measure.peak_extra_bytes(wl.step, dev)
            row["peak_mib"] = None if peak is None else peak / 2**20
            wl.reset()
    except Exception as exc:  # noqa: BLE001 - a row that fails is recorded, the others still run
        row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:200]}"
    outs = None  # an exception can leave the check's outputs here: drop them before emptying the cache
    wl.reset()
    _free(dev)
    return row


def run_rows(specs: list[Spec], configs=CONFIGS, device="cpu", budget_ms: float = 300.0, console=None,
             progress=None, task=None) -> tuple[list[dict], dict]:
    """Every (workload, configuration) row, with speed-ups against native best; and each workload's info."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows, infos = [], {}
    for spec in specs:
        if progress is not None:
            progress.update(task, description=f"{spec.name}: building, reference")
        wl = spec.build(dev, dtype)
        infos[wl.name] = wl.info
        if console is not None and "layers" in wl.info:
            i = wl.info
            console.print(f"{wl.name}: {i['params']:,} parameters ({i['layers']} layers, hidden {i['hidden']}, "
                          f"{i['heads']} q / {i['kv_heads']} kv heads of {i['head_dim']}, vocab {i['vocab']})")
        try:
            base = baseline_for(wl, dtype)
        except Exception as exc:  # noqa: BLE001
            base = None
            if console is not None:
                console.print(f"{wl.name}: no reference ({'OOM' if is_oom(exc) else type(exc).__name__}); "
                              "rows are timed without the accuracy check")
        _free(dev)
        for cfg in configs:
            if progress is not None:
                progress.update(task, description=f"{spec.name}: {cfg}")
            rows.append(measure_row(wl, cfg, base, dev, budget_ms))
            if progress is not None:
                progress.advance(task)
        del wl, base
        _free(dev)
    for row in rows:
        best = next((r["ms"] for r in rows if r["workload"] == row["workload"] and r["configuration"] == BEST), None)
        if best and row["ms"]:
            row["speedup"] = best / row["ms"]
    return rows, infos


# --- output ----------------------------------------------------------------------------------------------


def _accuracy_text(acc: dict | None) -> str:
    if acc is None:
        return "-"
    worst = max(acc["outputs"].values(), key=lambda p: p["err"])
    verdict = "pass" if acc["ok"] else "FAIL"
    return f"{verdict} {worst['err']:.2g} ({acc['ratio']:.2f}x)"


def make_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, caption="accuracy: every output's error within 2x native best's plus a rounding "
                                       "floor; the largest max abs error against the upcast math reference "
                                       "(the largest ratio to native best's error)")
    cols = ("workload", "configuration", "ms", "tokens/s", "peak MiB", "speed-up vs native best", "accuracy",
            "served by")
    for col in cols:
        table.add_column(col, justify="left" if col in ("workload", "configuration", "accuracy", "served by")
                         else "right")
    for r in rows:
        if r["error"]:
            timing = [r["error"] if r["error"] == "OOM" else "error", "-", "-", "-"]
        else:
            timing = [f"{r['ms']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}",
                      "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"]
        table.add_row(r["workload"], r["configuration"], *timing, _accuracy_text(r["accuracy"]), r["served"] or "-")
    return table


def _strict(obj):
    """JSON without NaN/Infinity literals: a non-finite float is written as its string."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def environment(dev: torch.device) -> dict:
    import transformers

    v = devmod.versions()
    return dict(device=devmod.device_name(dev), device_key=devmod.device_key(dev), torch=torch.__version__,
                transformers=transformers.__version__, triton=v["triton"], driver=v["driver"],
                dtype="bf16" if dev.type == "cuda" else "fp32", noflash_tune=noflash_tune.__version__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/out", help="directory for models.json")
    ap.add_argument("--tiny", action="store_true", help="shrink every size (a CPU check)")
    ap.add_argument("--configs", default=",".join(CONFIG_KEYS),
                    help="comma-separated subset of " + ", ".join(f"{k} ({v})" for k, v in CONFIG_KEYS.items()))
    ap.add_argument("--budget-ms", type=float, default=None,
                    help="timing budget per row (default 1000 on a GPU, 100 with --tiny, else 300)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    try:
        configs = [CONFIG_KEYS[k.strip()] for k in args.configs.split(",") if k.strip()]
    except KeyError as exc:
        ap.error(f"unknown configuration {exc}; choose from {', '.join(CONFIG_KEYS)}")
    budget = args.budget_ms or (1000.0 if dev.type == "cuda" else 100.0 if args.tiny else 300.0)
    specs = workloads(args.tiny)
    env = environment(dev)
    console = Console(width=180)
    with Progress(console=console) as progress:
        task = progress.add_task("models", total=len(specs) * len(configs))
        rows, infos = run_rows(specs, configs, dev, budget, console=console, progress=progress, task=task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(**env, tiny=args.tiny, budget_ms=budget, workloads=infos, rows=rows)
    (out / "models.json").write_text(json.dumps(_strict(report), indent=1))
    for r in rows:
        if r["error"] and r["error"] != "OOM":
            console.print(escape(f"{r['workload']} / {r['configuration']}: {r['error']}"))
    console.print(f"wrote {out / 'models.json'}")
    console.print(make_table(rows, f"Models on {env['device']} ({env['dtype']}; torch {env['torch']}, "
                                   f"transformers {env['transformers']}, triton {env['triton']})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

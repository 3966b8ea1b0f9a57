"""tuned_configs files: format, validation of hostile or broken files, merging, lookup, staleness, atomic and
concurrent writes, import and export."""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noflash_tune import configs as C
from noflash_tune.shapes import MASKS, Bucket, Shape
from noflash_tune.variants import FAMILIES, Variant, space_hash

REPO = Path(__file__).resolve().parent.parent
KEY = "test-dev"  # a device key no shipped file uses, so the shipped dir never interferes
FP = C.Fingerprint(torch="2.5.1", triton="3.1.0", templates_hash="abc123",
                   family_templates=(("torch_chunked", "c0ffee"), ("torch_inplace", "c0ffee"),
                                     ("torch_online", "c0ffee"), ("triton", "7717a0")))


def families(**changed) -> tuple:
    """FP's per-family templates hashes, with ``changed`` ones (None: the family left out)."""
    merged = {**dict(FP.family_templates), **changed}
    return tuple(sorted((k, v) for k, v in merged.items() if v is not None))


def device(**kw) -> C.DeviceInfo:
    base = dict(key=KEY, name="Test Device 9000", memory_bytes=16 << 30, torch=FP.torch, triton=FP.triton,
                driver="12.4", templates_hash=FP.templates_hash, space_hash=space_hash(),
                family_templates=FP.family_templates)
    base.update(kw)
    return C.DeviceInfo(**base)


def shape(L=1000, S=None, E=64, dtype="fp32", causal=False, mask="none", grad=False, H=8, Hkv=None) -> Shape:
    return Shape(B=2, H=H, Hkv=Hkv or H, L=L, S=S or L, E=E, dtype=dtype, causal=causal, mask=mask, grad=grad)


def entry(sh: Shape | None = None, ms=1.0, winner: Variant | None = None, **kw) -> C.Entry:
    sh = sh or shape()
    return C.Entry(bucket=sh.bucket(), shape=sh, winner=winner or Variant("torch_online", block_m=128), ms=ms,
                   tflops=3.5, peak_mib=12.25, runners_up=kw.pop("runners_up", [(Variant("torch_chunked"), ms * 1.02)]),
                   native=kw.pop("native", ("flash", ms * 2)),
                   trials=kw.pop("trials", {"complete": 30, "pruned_cap": 2, "pruned_accuracy": 1, "failed": 0}), **kw)


def cfgfile(entries=(), dev: C.DeviceInfo | None = None, cap=None) -> C.ConfigFile:
    return C.ConfigFile(device=dev or device(), created="2025-03-01T10:00:00Z", tool="noflash-tune 0.1.0",
                        vram_cap_gib=cap, entries={e.key: e for e in entries})


def write_raw(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (bytes, bytearray)):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def good_doc() -> dict:
    e2 = entry(shape(L=4096, causal=True), ms=7.5, winner=Variant("triton", BLOCK_M=64))
    return json.loads(C.dump(cfgfile([entry(), e2])))


def config_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, C.ConfigWarning)]


def load_counting(dirs, key=KEY, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cs = C.load_for_device(key, dirs, fingerprint=kw.pop("fingerprint", FP), **kw)
    return cs, config_warnings(rec)


# --- format -------------------------------------------------------------------------------------------------

def test_round_trip_through_a_file(tmp_path):
    cfg = cfgfile([entry(), entry(shape(L=300, E=128, dtype="bf16", grad=True), ms=2.5, native=None)], cap=12.0)
    path = tmp_path / f"{KEY}.json"
    C.write_file(path, cfg, merge=False)
    back = C.load_file(path)
    assert back == cfg
    e = back.entries[shape(L=300, E=128, dtype="bf16", grad=True).bucket().key]
    assert e.native is None and e.ms == 2.5 and e.shape.L == 300 and e.winner == Variant("torch_online", block_m=128)
    assert e.source == path and back.vram_cap_gib == 12.0


def test_dump_is_deterministic_and_readable():
    a, b, c = entry(shape(L=64)), entry(shape(L=8192)), entry(shape(L=512, causal=True))
    t1 = C.dump(cfgfile([a, b, c]))
    t2 = C.dump(cfgfile([c, a, b]))
    assert t1 == t2
    assert t1.endswith("}\n") and t1.startswith('{\n "created"')  # sorted keys, indent=1
    keys = [e["bucket"] for e in json.loads(t1)["entries"]]
    assert [Bucket(**k).key for k in keys] == sorted(Bucket(**k).key for k in keys)
    assert t1 == json.dumps(json.loads(t1), sort_keys=True, indent=1) + "\n"


def test_dump_refuses_what_parse_would_refuse(tmp_path):
    bad = entry(ms=float("nan"))
    with pytest.raises(C.ConfigError):
        C.dump(cfgfile([bad]))
    mismatched = C.Entry(bucket=shape(L=64).bucket(), shape=shape(L=4096), winner=Variant("torch_chunked"),
                         ms=1.0, tflops=1.0, peak_mib=1.0)
    path = tmp_path / f"{KEY}.json"
    with pytest.raises(C.ConfigError, match="belongs to bucket"):
        C.write_file(path, cfgfile([mismatched]))
    assert not path.exists()


@st.composite
def shapes(draw):
    hkv = draw(st.integers(1, 4))
    mask = draw(st.sampled_from(MASKS))
    causal = draw(st.booleans()) if mask == "none" else False
    e = draw(st.sampled_from([16, 32, 64, 80, 128, 256, 512]))
    return Shape(B=draw(st.integers(1, 8)), H=hkv * draw(st.sampled_from([1, 2, 4, 8])), Hkv=hkv,
                 L=draw(st.integers(1, 1 << 17)), S=draw(st.integers(1, 1 << 17)), E=e,
                 Ev=draw(st.sampled_from([e, 64])), dtype=draw(st.sampled_from(C.DTYPES)), causal=causal, mask=mask,
                 grad=draw(st.booleans()))


@st.composite
def variants(draw):
    fam = draw(st.sampled_from(sorted(FAMILIES)))
    return Variant(fam, **{k: draw(st.sampled_from(v)) for k, v in FAMILIES[fam].space.items()})


floats = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def entries(draw):
    sh = draw(shapes())
    return C.Entry(bucket=sh.bucket(), shape=sh, winner=draw(variants()), ms=draw(floats), tflops=draw(floats),
                   peak_mib=draw(floats), runners_up=draw(st.lists(st.tuples(variants(), floats), max_size=3)),
                   native=draw(st.none() | st.tuples(st.sampled_from(["flash", "math", "cudnn", "efficient"]), floats)),
                   trials=draw(st.fixed_dictionaries({k: st.integers(0, 10**6) for k in C.TRIAL_KEYS})))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries(), max_size=5), st.none() | floats)
def test_property_dump_parse_round_trip(es, cap):
    cfg = cfgfile(es, cap=cap)
    text = C.dump(cfg)
    back = C.parse(json.loads(text))
    assert back == cfg
    assert C.dump(back) == text


def _paths_of(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths_of(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths_of(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return doc


GOOD = good_doc()
PATHS = list(_paths_of(GOOD))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


STRING_PATHS = [p for p in PATHS if isinstance(_get(GOOD, p), str)]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(PATHS), json_values)
def test_property_any_mutation_is_accepted_cleanly_or_refused_with_config_error(path, value):
    doc = _set(copy.deepcopy(GOOD), path, value)
    try:
        cfg = C.parse(doc, warn=False)
    except C.ConfigError:
        return
    C.dump(cfg)  # whatever we accept, we can write back


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(STRING_PATHS), st.sampled_from(["{{ 7*7 }}", "{% if 1 %}", "__import__('os')", "\x00", "a\nb"]),
       st.integers(0, 64))
def test_property_template_syntax_dunders_and_control_chars_are_refused_anywhere(path, bad, at):
    doc = copy.deepcopy(GOOD)
    s = _get(doc, path)
    _set(doc, path, s[:at] + bad + s[at:])
    with pytest.raises(C.ConfigError):
        C.parse(doc)


# --- bad files: each skipped with exactly one warning, never raising ----------------------------------------

def _mut(fn):
    def make():
        d = good_doc()
        fn(d)
        return d
    return make


def _torch_entry(d):
    return next(e for e in d["entries"] if e["winner"]["family"] == "torch_online")


def _triton_entry(d):
    return next(e for e in d["entries"] if e["winner"]["family"] == "triton")


def _huge():
    d = good_doc()
    d["device"]["name"] = "x"
    return json.dumps(d).replace('"entries"', " " * (C.MAX_FILE_BYTES + 10) + '"entries"')


BAD = {
    "corrupt_json": lambda: "{ this is not json",
    "truncated": lambda: C.dump(cfgfile([entry()]))[:-40],
    "empty": lambda: "",
    "whitespace_only": lambda: "  \n",
    "not_utf8": lambda: b'{"schema": 1, "device": "\xff\xfe"}',
    "top_level_list": lambda: "[1, 2]",
    "wrong_schema_version": _mut(lambda d: d.update(schema=3)),
    "schema_as_string": _mut(lambda d: d.update(schema="2")),
    "schema_1_with_family_templates": _mut(lambda d: d.update(schema=1)),
    "schema_2_without_family_templates": _mut(lambda d: d["device"].pop("family_templates")),
    "family_templates_not_an_object": _mut(lambda d: d["device"].update(family_templates=["triton", "7717a0"])),
    "family_templates_null": _mut(lambda d: d["device"].update(family_templates=None)),
    "family_templates_path_key": _mut(lambda d: d["device"]["family_templates"].update({"../../etc/passwd": "ab"})),
    "family_templates_dunder_key": _mut(lambda d: d["device"]["family_templates"].update(__class__="ab")),
    "family_templates_jinja_value": _mut(lambda d: d["device"]["family_templates"].update(triton="{{ 7*7 }}")),
    "family_templates_not_a_hash": _mut(lambda d: d["device"]["family_templates"].update(triton="abcxyz")),
    "family_templates_int_value": _mut(lambda d: d["device"]["family_templates"].update(triton=7717)),
    "family_templates_too_many": _mut(lambda d: d["device"].update(
        family_templates={f"family{i}": "ab" for i in range(C.MAX_FAMILIES + 1)})),
    "foreign_device": _mut(lambda d: d["device"].update(key="sm_90")),
    "string_where_int_belongs": _mut(lambda d: d["entries"][0]["bucket"].update(head_dim="64")),
    "bool_where_int_belongs": _mut(lambda d: d["entries"][0]["trials"].update(complete=True)),
    "bool_gqa": _mut(lambda d: d["entries"][0]["bucket"].update(gqa=True)),
    "string_memory": _mut(lambda d: d["device"].update(memory_bytes="16GB")),
    "jinja_in_name": _mut(lambda d: d["device"].update(name="{{ 7*7 }}")),
    "jinja_block_in_param": _mut(lambda d: d["entries"][0]["winner"]["params"].update(compute="{% x %}")),
    "dunder_in_version": _mut(lambda d: d["device"].update(torch="__import__('os')")),
    "dunder_param_name": _mut(lambda d: d["entries"][0]["winner"]["params"].update(__class__=1)),
    "family_is_a_path": _mut(lambda d: d["entries"][0]["winner"].update(family="../../etc/passwd")),
    "nul_in_name": _mut(lambda d: d["device"].update(name="GPU\x00")),
    "param_outside_space": _mut(lambda d: _torch_entry(d)["winner"]["params"].update(block_m=48)),
    "triton_param_outside_space": _mut(lambda d: _triton_entry(d)["winner"]["params"].update(num_warps=3)),
    "unknown_param": _mut(lambda d: _torch_entry(d)["winner"]["params"].update(unroll=2)),
    "bool_param": _mut(lambda d: _torch_entry(d)["winner"]["params"].update(block_m=True)),
    "string_param": _mut(lambda d: _torch_entry(d)["winner"]["params"].update(block_m="64")),
    "unknown_family_same_space": _mut(lambda d: d["entries"][0]["winner"].update(family="cuda_magic")),
    "runner_up_outside_space": _mut(lambda d: _torch_entry(d)["runners_up"][0]["variant"]["params"].update(block_m=3)),
    "unknown_native_backend": _mut(lambda d: _torch_entry(d)["native"].update(backend="fastest")),
    "unknown_key": _mut(lambda d: d["entries"][0].update(extra=1)),
    "missing_key": _mut(lambda d: d["entries"][0].pop("trials")),
    "negative_ms": _mut(lambda d: d["entries"][0].update(ms=-1.0)),
    "nan_ms": lambda: C.dump(cfgfile([entry()])).replace('"ms": 1.0', '"ms": NaN', 1),
    "huge_number": lambda: C.dump(cfgfile([entry()])).replace('"ms": 1.0', '"ms": 1e400', 1),
    "duplicate_key": lambda: C.dump(cfgfile([entry()])).replace('"schema": 2', '"schema": 2, "schema": 2'),
    "duplicate_bucket": _mut(lambda d: d["entries"].append(copy.deepcopy(d["entries"][0]))),
    "shape_not_in_bucket": _mut(lambda d: d["entries"][0]["shape"].update(L=5000, S=5000)),
    "seq_not_pow2": _mut(lambda d: d["entries"][0]["bucket"].update(seq_q=1000)),
    "zero_heads": _mut(lambda d: d["entries"][0]["shape"].update(H=0, Hkv=0)),
    "bad_created": _mut(lambda d: d.update(created="yesterday")),
    "long_name": _mut(lambda d: d["device"].update(name="x" * 1000)),
    "deep_nesting": lambda: "[" * 100000 + "]" * 100000,
    "huge_file": _huge,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_is_skipped_with_exactly_one_warning(tmp_path, case):
    bad_dir, good_dir = tmp_path / "a", tmp_path / "b"
    data = BAD[case]()
    bad = write_raw(bad_dir / f"{KEY}.json", data)
    if case == "huge_file":
        assert bad.stat().st_size > C.MAX_FILE_BYTES
    good = cfgfile([entry(shape(L=64), ms=4.0)])
    C.write_file(good_dir / f"{KEY}.json", good)
    cs, ws = load_counting([bad_dir, good_dir])
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert str(bad) in str(ws[0].message)
    assert [p for p, _ in cs.skipped] == [bad] and cs.files == [good_dir / f"{KEY}.json"]
    assert [e.key for e in cs.entries] == [shape(L=64).bucket().key]  # the good dir still serves
    if case != "foreign_device":  # a foreign file is well formed: only its place is wrong
        with pytest.raises(C.ConfigError):
            C.load_file(bad)


def test_foreign_file_reason_names_both_devices(tmp_path):
    d = good_doc()
    d["device"]["key"] = "gfx906"
    write_raw(tmp_path / f"{KEY}.json", d)
    cs, ws = load_counting([tmp_path])
    assert cs.entries == [] and "foreign" in cs.skipped[0][1] and "gfx906" in str(ws[0].message)


def test_other_search_space_drops_only_out_of_space_items_with_one_warning(tmp_path):
    d = good_doc()
    d["device"]["space_hash"] = "0123456789ab"  # written by another version's search space
    torch_e, triton_e = sorted(d["entries"], key=lambda e: e["winner"]["family"])
    torch_e["winner"]["params"]["block_m"] = 48
    triton_e["runners_up"] = [{"variant": {"family": "gone_family", "params": {}}, "ms": 7.6},
                                     {"variant": {"family": "torch_chunked", "params": {}}, "ms": 7.7}]
    write_raw(tmp_path / f"{KEY}.json", d)
    cs, ws = load_counting([tmp_path])
    assert len(ws) == 1 and "search space" in str(ws[0].message)
    assert cs.skipped == []
    (kept,) = cs.entries
    assert kept.winner.family == "triton"
    assert kept.runners_up == [(Variant("torch_chunked"), 7.7)]
    assert len(cs.loaded[0].dropped) == 2


def test_hostile_content_is_refused_even_from_another_search_space(tmp_path):
    d = good_doc()
    d["device"]["space_hash"] = "0123456789ab"
    d["entries"][0]["winner"]["family"] = "../../etc/passwd"
    write_raw(tmp_path / f"{KEY}.json", d)
    cs, ws = load_counting([tmp_path])
    assert cs.entries == [] and len(ws) == 1 and "not a valid family name" in cs.skipped[0][1]


def test_not_a_regular_file_and_missing_files(tmp_path):
    (tmp_path / "a" / f"{KEY}.json").mkdir(parents=True)
    cs, ws = load_counting([tmp_path / "a", tmp_path / "missing"])
    assert len(ws) == 1 and "regular file" in cs.skipped[0][1] and cs.entries == []


def test_device_key_cannot_escape_the_config_dir(tmp_path):
    with pytest.raises(ValueError):
        C.load_for_device("../../etc/passwd", [tmp_path])


# --- merge, lookup, staleness ---------------------------------------------------------------------------------

def test_first_dir_wins_over_env_user_and_given_dirs(tmp_path, monkeypatch):
    env1, env2, user = tmp_path / "env1", tmp_path / "env2", tmp_path / "user"
    a, b, c = shape(L=64), shape(L=1024), shape(L=4096)
    C.write_file(env1 / f"{KEY}.json", cfgfile([entry(a, ms=1.0)]))
    C.write_file(env2 / f"{KEY}.json", cfgfile([entry(a, ms=2.0), entry(b, ms=2.0)]))
    C.write_file(user / f"{KEY}.json", cfgfile([entry(a, ms=3.0), entry(b, ms=3.0), entry(c, ms=3.0)]))
    monkeypatch.setenv("NOFLASH_TUNE_CONFIGS", os.pathsep.join([str(env1), str(env2)]))
    monkeypatch.setenv("NOFLASH_TUNE_USER_DIR", str(user))
    cs, ws = load_counting(None)
    assert ws == []
    assert {e.bucket.seq_q: e.ms for e in cs.entries} == {64: 1.0, 1024: 2.0, 4096: 3.0}
    assert cs.files == [env1 / f"{KEY}.json", env2 / f"{KEY}.json", user / f"{KEY}.json"]
    assert cs.searched[:3] == cs.files and len(cs.searched) == 4  # and the shipped dir, last
    assert cs.get(b.bucket().key).source == env2 / f"{KEY}.json"
    cs2, _ = load_counting([user, env1])  # explicit order
    assert cs2.get(a.bucket().key).ms == 3.0


def test_a_stale_entry_of_an_earlier_dir_yields_its_bucket_to_a_fresh_one(tmp_path):
    """After an upgrade the user dir's own tuning is stale (another torch here) while the shipped file is fresh:
    the fresh entry serves that bucket; where both are stale, or both fresh, the earlier dir still wins."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    a, b = shape(L=64), shape(L=1024)
    C.write_file(user / f"{KEY}.json", cfgfile([entry(a, ms=1.0), entry(b, ms=1.0)], dev=device(torch="2.4.0")))
    C.write_file(shipped / f"{KEY}.json", cfgfile([entry(a, ms=2.0)]))
    cs, ws = load_counting([user, shipped])
    assert ws == []
    assert (cs.get(a.bucket().key).ms, cs.get(a.bucket().key).stale) == (2.0, "")
    assert cs.get(b.bucket().key).ms == 1.0 and cs.get(b.bucket().key).stale  # nothing fresh for it: served, flagged
    C.write_file(shipped / f"{KEY}.json", cfgfile([entry(a, ms=2.0)], dev=device(torch="2.4.0")), merge=False)
    cs, _ = load_counting([user, shipped])
    assert cs.get(a.bucket().key).ms == 1.0  # both stale: first dir wins


def test_lookup_exact_then_nearest_same_family_then_none(tmp_path):
    es = [entry(shape(L=512), ms=1.0), entry(shape(L=4096), ms=2.0), entry(shape(L=1024, causal=True), ms=3.0),
          entry(shape(L=65536, grad=True), ms=9.0)]
    C.write_file(tmp_path / f"{KEY}.json", cfgfile(es))
    cs, _ = load_counting([tmp_path])
    e, how = cs.lookup(shape(L=300).bucket())
    assert (how, e.ms) == ("exact", 1.0)
    e, how = cs.lookup(shape(L=3000).bucket())  # q/k 4096 is one step from 4096... exact
    assert (how, e.ms) == ("exact", 2.0)
    e, how = cs.lookup(shape(L=1500).bucket())  # 2048: 512 is 4 steps away, 4096 is 2
    assert (how, e.ms) == ("nearest", 2.0)
    e, how = cs.lookup(shape(L=2000, causal=True).bucket())  # only the causal entry shares the family key
    assert (how, e.ms) == ("nearest", 3.0)
    e, how = cs.lookup(shape(L=65536).bucket())  # a fwd+bwd entry never serves a forward call, however near
    assert (how, e.ms) == ("nearest", 2.0)
    e, how = cs.lookup(shape(L=512, grad=True).bucket())  # nor a forward entry a call that needs gradients
    assert (how, e.ms) == ("nearest", 9.0)
    assert cs.lookup(shape(L=512, E=128, grad=True).bucket()) is None
    assert cs.lookup(shape(L=512, E=128).bucket()) is None
    assert cs.lookup(shape(L=512, mask="bool").bucket()) is None
    assert cs.lookup(shape(L=512, dtype="bf16").bucket()) is None
    e, how = cs.lookup(shape(L=512).bucket(), accept=lambda e: e.ms > 1.5)
    assert (how, e.ms) == ("nearest", 2.0)


def test_stale_marking_serves_but_flags_with_the_reason(tmp_path):
    torch_w, triton_w, native_w = Variant("torch_chunked"), Variant("triton"), Variant("native:flash")
    es = [entry(shape(L=64), winner=torch_w), entry(shape(L=128), winner=triton_w),
          entry(shape(L=256), winner=native_w)]
    C.write_file(tmp_path / f"{KEY}.json", cfgfile(es))

    def stale(now):
        cs, ws = load_counting([tmp_path], fingerprint=now)
        assert ws == [] and len(cs.entries) == 3  # stale entries are still served
        return {e.winner.family: e.stale for e in cs.entries}

    assert stale(FP) == {"torch_chunked": "", "triton": "", "native:flash": ""}
    assert stale(replace(FP, torch="2.5.0+cu124")) == {"torch_chunked": "", "triton": "",
                                                      "native:flash": ""}  # patch release only
    s = stale(replace(FP, torch="2.6.0"))
    assert all("torch 2.5" in r and "torch 2.6" in r for r in s.values())
    s = stale(replace(FP, triton="3.2.0"))
    assert s["triton"] and "triton 3.1.0" in s["triton"] and not s["torch_chunked"] and not s["native:flash"]
    s = stale(replace(FP, templates_hash="def456", family_templates=families(triton="def456")))
    assert s == {"triton": "templates of triton changed since tuning (7717a0 -> def456)", "torch_chunked": "",
                 "native:flash": ""}
    s = stale(replace(FP, templates_hash="def456", family_templates=families(torch_chunked="def456")))
    assert "templates of torch_chunked changed" in s["torch_chunked"] and not s["triton"] and not s["native:flash"]


def test_file_from_this_machine_is_fresh_by_default(tmp_path):
    info = C.this_device_info("cpu")
    cfg = C.ConfigFile.new(info, entries=[entry()])
    C.write_file(tmp_path / f"{info.key}.json", cfg)
    cs = C.load_for_device(info.key, [tmp_path])
    assert [e.stale for e in cs.entries] == [""]
    assert C.load_file(tmp_path / f"{info.key}.json").tool.startswith("noflash-tune ")


def test_stale_entry_loses_nearest_tie_to_fresh_one(tmp_path):
    C.write_file(tmp_path / "a" / f"{KEY}.json", cfgfile([entry(shape(L=512), ms=1.0)],
                                                         dev=device(torch="2.4.0")))
    C.write_file(tmp_path / "b" / f"{KEY}.json", cfgfile([entry(shape(L=2048), ms=5.0)]))
    cs, _ = load_counting([tmp_path / "a", tmp_path / "b"])
    e, how = cs.lookup(shape(L=1024).bucket())  # both one step away
    assert how == "nearest" and e.ms == 5.0 and e.stale == ""


# --- writing --------------------------------------------------------------------------------------------------

def test_write_merge_keeps_other_entries_and_new_ones_replace(tmp_path):
    path = tmp_path / "sub" / f"{KEY}.json"
    C.write_file(path, cfgfile([entry(shape(L=64), ms=1.0), entry(shape(L=128), ms=1.0)], cap=8.0))
    C.write_file(path, cfgfile([entry(shape(L=128), ms=0.5), entry(shape(L=256), ms=0.7)], cap=4.0))
    got = C.load_file(path)
    assert {e.bucket.seq_q: e.ms for e in got.entries.values()} == {64: 1.0, 128: 0.5, 256: 0.7}
    assert got.vram_cap_gib == 8.0  # every entry respects the loosest cap
    C.write_file(path, cfgfile([entry(shape(L=64), ms=9.0)]), merge=False)
    assert [e.ms for e in C.load_file(path).entries.values()] == [9.0]


def test_write_merge_never_relabels_entries_of_another_fingerprint(tmp_path):
    path = tmp_path / f"{KEY}.json"
    C.write_file(path, cfgfile([entry(shape(L=64), winner=Variant("triton")),
                                entry(shape(L=128), winner=Variant("torch_chunked"))]))
    with pytest.warns(C.ConfigWarning, match="another fingerprint"):
        C.write_file(path, cfgfile([entry(shape(L=256))], dev=device(triton="3.2.0")))
    got = C.load_file(path)
    # the Triton winner was measured under triton 3.1.0: the new header would misdescribe it
    assert sorted(e.bucket.seq_q for e in got.entries.values()) == [128, 256]
    with pytest.raises(C.ConfigError, match="refusing to merge"):
        C.write_file(path, cfgfile([entry()], dev=device(key="gfx906")))


def test_write_moves_a_corrupt_file_aside(tmp_path):
    path = write_raw(tmp_path / f"{KEY}.json", "{ broken")
    with pytest.warns(C.ConfigWarning, match="unreadable"):
        C.write_file(path, cfgfile([entry()]))
    assert len(C.load_file(path).entries) == 1
    (aside,) = tmp_path.glob(f"{KEY}.json.corrupt-*")
    assert aside.read_text() == "{ broken"


CHILD = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, sys.argv[1])
    from noflash_tune import configs as C
    from noflash_tune.shapes import Shape
    from noflash_tune.variants import Variant, space_hash

    def build(tag, n):
        dev = C.DeviceInfo(key="test-dev", name="T", memory_bytes=1, torch="2.5.1", triton="3.1.0", driver=None,
                           templates_hash="abc123", space_hash=space_hash(),
                           family_templates=(("torch_chunked", "c0ffee"), ("torch_online", "c0ffee")))
        cfg = C.ConfigFile(device=dev, created="2025-03-01T10:00:00Z", tool="noflash-tune 0.1.0",
                           vram_cap_gib=None)
        for i in range(n):
            s = Shape(B=1, H=1, L=2 ** (i % 13), E=16 * (1 + i // 13), dtype=tag)
            cfg.add(C.Entry(bucket=s.bucket(), shape=s, winner=Variant("torch_online", block_m=64), ms=1.0 + i,
                            tflops=1.0, peak_mib=1.0,
                            runners_up=[(Variant("torch_chunked", block_m=b), 2.0 + i) for b in (32, 64, 128)]))
        return cfg
""")


def _child(mode: str, path: Path, *args) -> subprocess.Popen:
    src = CHILD + textwrap.dedent({
        "merge": """
            path, tag, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
            for i in range(1, n + 1):
                full = build(tag, n)
                part = C.ConfigFile(full.device, full.created, full.tool, None, dict(list(full.entries.items())[:i]))
                C.write_file(path, part, merge=True)
        """,
        "loop": """
            path = sys.argv[2]
            a, b = build("fp32", 500), build("fp16", 550)
            texts = {len(a.entries): C.dump(a), len(b.entries): C.dump(b)}
            C.dump = lambda cfg: texts[len(cfg.entries)]  # time goes to the write itself, where a kill can hurt
            C.write_file(path, a, merge=False)
            print("ready", flush=True)
            while True:
                C.write_file(path, b, merge=False)
                C.write_file(path, a, merge=False)
        """,
        "die_at_replace": """
            path = sys.argv[2]
            C.write_file(path, build("fp32", 50), merge=False)
            def die(*a, **k):
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace = die
            C.write_file(path, build("fp16", 60), merge=False)
        """,
    }[mode])
    return subprocess.Popen([sys.executable, "-c", src, str(REPO), str(path), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _build(tag, n):
    ns: dict = {}
    exec(compile(CHILD.replace("sys.path.insert(0, sys.argv[1])", ""), "child", "exec"), ns)
    return ns["build"](tag, n)


def test_two_processes_writing_one_file_keep_both_their_entries(tmp_path):
    path = tmp_path / f"{KEY}.json"
    n = 25
    procs = [_child("merge", path, tag, n) for tag in ("fp32", "fp16")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = C.load_file(path)
    assert len(got.entries) == 2 * n
    assert set(got.entries) == set(_build("fp32", n).entries) | set(_build("fp16", n).entries)
    assert not list(tmp_path.glob(f".{KEY}.json.*.tmp"))


def test_a_writer_killed_mid_way_leaves_the_old_or_the_new_file(tmp_path):
    texts = {C.dump(_build("fp32", 500)): "old", C.dump(_build("fp16", 550)): "new"}

    def which(path):
        text = path.read_text()
        return texts.get(text, f"partial ({len(text)} bytes)")

    rng = random.Random(7)
    paths = [tmp_path / f"r{i}" / f"{KEY}.json" for i in range(3)]
    for p in paths:
        p.parent.mkdir()
    # The last child dies deterministically after its new content is on disk but before the rename.
    procs = [_child("loop", p) for p in paths[:2]] + [_child("die_at_replace", paths[2])]
    try:
        for proc, path in zip(procs[:2], paths[:2]):
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline:  # a reader never sees a partial file while the writer keeps going
                assert which(path) in ("old", "new")
                time.sleep(rng.uniform(0.0, 0.005))
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert which(path) in ("old", "new")
            C.load_file(path)
        procs[2].communicate(timeout=60)
        assert procs[2].returncode == -signal.SIGKILL
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close(), proc.stderr.close()
    path = paths[2]
    assert C.load_file(path) == _build("fp32", 50)  # the old content
    assert len(list(path.parent.glob(f".{KEY}.json.*.tmp"))) == 1  # the orphan...
    C.write_file(path, _build("fp32", 3))
    assert list(path.parent.glob(f".{KEY}.json.*.tmp")) == []  # ...is cleaned by the next write


# --- import / export ------------------------------------------------------------------------------------------

def test_import_reports_added_replaced_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("NOFLASH_TUNE_USER_DIR", str(tmp_path / "user"))
    a, b, c = shape(L=64), shape(L=128), shape(L=256)
    src = tmp_path / "in.json"
    C.write_file(src, cfgfile([entry(a, ms=2.0), entry(b, ms=2.0)]))
    rep = C.import_file(src, fingerprint=FP)
    assert rep.dest == tmp_path / "user" / f"{KEY}.json"
    assert [k for k, _ in rep.added] == sorted([a.bucket().key, b.bucket().key]) and not rep.rejected

    C.write_file(src, cfgfile([entry(a, ms=1.0), entry(b, ms=3.0), entry(c, ms=3.0)]), merge=False)
    rep = C.import_file(src, fingerprint=FP)
    assert [k for k, _ in rep.added] == [c.bucket().key]
    assert rep.replaced == [(a.bucket().key, "faster: 1 ms < 2 ms")]
    assert rep.rejected[0][0] == b.bucket().key and "not faster" in rep.rejected[0][1]
    got = C.load_for_device(KEY, [tmp_path / "user"], fingerprint=FP)
    assert {e.bucket.seq_q: e.ms for e in got.entries} == {64: 1.0, 128: 2.0, 256: 3.0}
    assert "1 added, 1 replaced, 1 rejected" in str(rep)


def test_import_freshness_rules_and_fingerprint_header(tmp_path):
    dest = tmp_path / "dest"
    a, b = shape(L=64), shape(L=128)
    old = tmp_path / "old.json"
    C.write_file(old, cfgfile([entry(a, ms=1.0), entry(b, ms=1.0)], dev=device(torch="2.4.0")))
    C.import_file(old, dest, fingerprint=FP)
    # A fresh file (this machine's fingerprint) replaces stale entries even when slower, and takes the header;
    # the destination's other stale entries cannot stay under it.
    new = tmp_path / "new.json"
    C.write_file(new, cfgfile([entry(a, ms=5.0)]))
    rep = C.import_file(new, dest, fingerprint=FP)
    assert rep.replaced[0][0] == a.bucket().key and "stale" in rep.replaced[0][1]
    assert [k for k, _ in rep.dropped] == [b.bucket().key]
    got = C.load_file(dest / f"{KEY}.json")
    assert got.device.torch == FP.torch and list(got.entries) == [a.bucket().key]
    # A stale incoming entry never replaces a fresh one, even when faster.
    rep = C.import_file(old, dest, fingerprint=FP)
    assert [k for k, _ in rep.rejected] == sorted([a.bucket().key, b.bucket().key])
    assert "existing entry is fresh" in dict(rep.rejected)[a.bucket().key]
    assert "another fingerprint" in dict(rep.rejected)[b.bucket().key]
    assert C.load_file(dest / f"{KEY}.json").entries[a.bucket().key].ms == 5.0
    rep = C.import_file(old, dest, force=True, fingerprint=FP)
    assert len(rep.replaced) == 1 and len(rep.added) == 1
    assert C.load_file(dest / f"{KEY}.json").device.torch == "2.4.0"


def test_import_rejects_out_of_space_entries_and_refuses_bad_files(tmp_path):
    d = good_doc()
    d["device"]["space_hash"] = "0123456789ab"
    _torch_entry(d)["winner"]["params"]["block_m"] = 48
    src = write_raw(tmp_path / "in.json", d)
    rep = C.import_file(src, tmp_path / "dest", fingerprint=FP)
    assert len(rep.added) == 1 and len(rep.rejected) == 1 and "search space" in rep.rejected[0][1]
    bad = write_raw(tmp_path / "bad.json", "{{ 7*7 }}")
    with pytest.raises(C.ConfigError):
        C.import_file(bad, tmp_path / "dest")
    assert len(C.load_file(tmp_path / "dest" / f"{KEY}.json").entries) == 1


def test_export_writes_one_self_describing_merged_file(tmp_path):
    a, b, c = shape(L=64), shape(L=128), shape(L=256)
    C.write_file(tmp_path / "x" / f"{KEY}.json", cfgfile([entry(a, ms=1.0)], cap=8.0))
    C.write_file(tmp_path / "y" / f"{KEY}.json", cfgfile([entry(a, ms=2.0), entry(b, ms=2.0)], cap=4.0))
    C.write_file(tmp_path / "z" / f"{KEY}.json", cfgfile([entry(c, ms=3.0)], dev=device(
        templates_hash="ffff", family_templates=families(torch_online="ffff"))))
    out = tmp_path / "out" / "shared.json"
    rep = C.export(KEY, out, dirs=[tmp_path / "x", tmp_path / "y", tmp_path / "z"])
    got = C.load_file(out)
    assert got.device.key == KEY and got.device.templates_hash == FP.templates_hash
    assert {e.bucket.seq_q: e.ms for e in got.entries.values()} == {64: 1.0, 128: 2.0}
    assert got.vram_cap_gib == 8.0 and rep.entries == 2
    assert [k for k, _ in rep.omitted] == [c.bucket().key] and "templates" in rep.omitted[0][1]
    # the export re-imports elsewhere unchanged
    rep2 = C.import_file(out, tmp_path / "elsewhere", fingerprint=FP)
    assert len(rep2.added) == 2
    with pytest.raises(C.ConfigError, match="no tuned entries"):
        C.export(KEY, tmp_path / "none.json", dirs=[tmp_path / "empty"])


@pytest.fixture
def edit_template(tmp_path, monkeypatch):
    """A copy of the templates folder that codegen reads instead; ``edit_template(name)`` appends a comment to one
    of its templates (a new file if there is none) and forgets the template hashes computed so far."""
    from noflash_tune import codegen

    tdir = tmp_path / "templates"
    shutil.copytree(codegen.templates_dir(), tdir)
    monkeypatch.setattr(codegen, "templates_dir", lambda: tdir)

    def edit(name):
        with open(tdir / name, "a") as f:
            f.write("{# an edit #}\n")
        codegen.clear_hash_caches()

    codegen.clear_hash_caches()
    yield edit
    codegen.clear_hash_caches()


def templates_now(device_key: str) -> C.Fingerprint:
    """FP with the templates hashes of the (copied) templates folder now."""
    return replace(FP, templates_hash=C.templates_hash_for(device_key),
                   family_templates=C.family_templates_for(device_key))


def test_a_cpu_files_freshness_ignores_triton_templates_a_gpu_files_does_not(edit_template):
    """Triton never serves on a CPU: editing a Triton template must not mark a CPU's tuned entries stale (nor reset
    its studies), while a GPU's entries, which may hold Triton winners, follow every template."""
    assert [n for n, _ in C.family_templates_for("cpu-x86_64")] == ["torch_chunked", "torch_inplace", "torch_online"]
    assert [n for n, _ in C.family_templates_for("sm_90")] == ["torch_chunked", "torch_inplace", "torch_online",
                                                                "triton", "triton_chunked", "triton_chunked_ws", "triton_ws"]
    cpu, gpu = C.templates_hash_for("cpu-x86_64"), C.templates_hash_for("sm_90")
    edit_template("triton/attention_fwd.py.j2")
    assert C.templates_hash_for("cpu-x86_64") == cpu and C.templates_hash_for("sm_90") != gpu
    gpu = C.templates_hash_for("sm_90")
    edit_template("torch/_blocks.py.j2")  # an include the tiers share
    assert C.templates_hash_for("cpu-x86_64") != cpu and C.templates_hash_for("sm_90") != gpu
    # What marks entries stale: a CPU file written before the Triton edit is still fresh after it.
    fp = C.Fingerprint(torch="2.5.1", triton=None, templates_hash=C.templates_hash_for("cpu-x86_64"))
    edit_template("triton/_shared.py.j2")
    now = C.Fingerprint(torch="2.5.1", triton=None, templates_hash=C.templates_hash_for("cpu-x86_64"))
    assert not C.stale_reasons(Variant("torch_chunked"), fp, now)


TEMPLATED = ("torch_chunked", "torch_online", "torch_inplace", "triton", "triton_chunked", "triton_chunked_ws",
             "triton_ws")


def test_a_new_template_file_leaves_every_familys_entries_fresh(edit_template):
    """A new family's own template (beside Triton's) changes the combined hash, and no existing family's."""
    tuned = templates_now("sm_90")
    edit_template("triton/attention_varlen.py.j2")
    now = templates_now("sm_90")
    assert now.templates_hash != tuned.templates_hash
    assert {f: C.stale_reasons(Variant(f), tuned, now) for f in TEMPLATED} == {f: [] for f in TEMPLATED}


def test_a_template_edit_stales_only_the_families_rendered_from_it(edit_template, tmp_path):
    def stale_after(name):
        tuned = templates_now("sm_90")
        edit_template(name)
        now = templates_now("sm_90")
        return {f for f in TEMPLATED if C.stale_reasons(Variant(f), tuned, now)}

    assert stale_after("triton/attention_fwd.py.j2") == {"triton"}
    # A partial stales the families whose templates import it, and no other beside it.
    assert stale_after("triton/_shared.py.j2") == {"triton", "triton_chunked", "triton_chunked_ws", "triton_ws"}
    assert stale_after("triton/_chunked.py.j2") == {"triton_chunked", "triton_chunked_ws"}
    assert stale_after("triton/_tma.py.j2") == {"triton_chunked_ws"}
    assert stale_after("torch/_blocks.py.j2") == {"torch_chunked", "torch_online", "torch_inplace"}
    assert stale_after("torch/chunked.py.j2") == {"torch_chunked"}
    # Through a file: the reason names the family and both hashes.
    info = C.this_device_info("cpu")
    es = [entry(shape(L=64), winner=Variant("torch_chunked")), entry(shape(L=128), winner=Variant("torch_online"))]
    C.write_file(tmp_path / f"{info.key}.json", C.ConfigFile.new(info, entries=es))
    before = dict(info.family_templates)["torch_chunked"]
    edit_template("torch/chunked.py.j2")
    after = dict(C.family_templates_for(info.key))["torch_chunked"]
    cs = C.load_for_device(info.key, [tmp_path])
    assert {e.winner.family: e.stale for e in cs.entries} == {
        "torch_chunked": f"templates of torch_chunked changed since tuning ({before} -> {after})", "torch_online": ""}


def test_a_schema_1_file_loads_and_follows_the_combined_hash(tmp_path):
    doc = good_doc()
    doc["schema"] = 1
    del doc["device"]["family_templates"]
    path = write_raw(tmp_path / "a" / f"{KEY}.json", doc)
    cfg = C.load_file(path)
    assert cfg.device.family_templates is None and cfg.device.fingerprint.family_templates is None
    assert C.dump(cfg) == json.dumps(doc, sort_keys=True, indent=1) + "\n"  # written back as it was: schema 1

    def stale(now):
        cs, ws = load_counting([path.parent], fingerprint=now)
        assert ws == []
        return {e.winner.family: e.stale for e in cs.entries}

    assert stale(FP) == {"torch_online": "", "triton": ""}
    changed = "templates changed since tuning (abc123 -> def456)"
    assert stale(replace(FP, templates_hash="def456")) == {"torch_online": changed, "triton": changed}
    # A schema 2 header with another combined hash would misdescribe every entry made from a template.
    with pytest.warns(C.ConfigWarning, match="another fingerprint"):
        C.write_file(path, cfgfile([entry(shape(L=64), winner=Variant("native:flash"))],
                                   dev=device(templates_hash="def456")))
    got = C.load_file(path)
    assert got.device.family_templates == FP.family_templates and len(got.entries) == 1


def test_family_templates_name_unknown_families_and_leave_out_missing_ones(tmp_path):
    """A family unknown today (a newer version's) is accepted and never matched; a winner whose family the file
    does not hash was tuned before its templates existed."""
    d = good_doc()
    d["device"]["family_templates"]["triton_varlen"] = "0123"
    del d["device"]["family_templates"]["triton"]
    cs, ws = load_counting([write_raw(tmp_path / f"{KEY}.json", d).parent])
    assert ws == [] and cs.loaded[0].device.fingerprint.family_hash("triton_varlen") == "0123"
    assert {e.winner.family: e.stale for e in cs.entries} == {
        "torch_online": "", "triton": "tuned before family triton's templates existed"}
    assert C.dump(cs.loaded[0]) == json.dumps(d, sort_keys=True, indent=1) + "\n"


@pytest.mark.parametrize("bad", [(("../x", "ab"),), (("__class__", "ab"),), (("triton", "{{ 1 }}"),),
                                 (("triton", "xyz"),), tuple((f"f{i}", "ab") for i in range(C.MAX_FAMILIES + 1))])
def test_dump_refuses_a_hostile_family_templates_header(bad):
    with pytest.raises(C.ConfigError, match="family_templates"):
        C.dump(cfgfile([entry()], dev=device(family_templates=bad)))


def test_a_merge_keeps_the_entries_of_families_whose_templates_hash_matches(tmp_path):
    path = tmp_path / f"{KEY}.json"
    C.write_file(path, cfgfile([entry(shape(L=64), winner=Variant("triton")),
                                entry(shape(L=128), winner=Variant("torch_chunked")),
                                entry(shape(L=256), winner=Variant("torch_online"))]))
    new = device(templates_hash="def456", family_templates=families(torch_chunked="def456"))
    with pytest.warns(C.ConfigWarning, match=r"templates of torch_chunked changed since tuning \(c0ffee -> def456\)"):
        C.write_file(path, cfgfile([entry(shape(L=512))], dev=new))
    got = C.load_file(path)
    assert got.device == new
    assert {e.bucket.seq_q: e.winner.family for e in got.entries.values()} == {
        64: "triton", 256: "torch_online", 512: "torch_online"}


def test_import_takes_this_machines_header_when_one_familys_templates_differ(tmp_path):
    """The destination's header differs from this machine's only in the chunked tier's templates: it is not this
    machine's fingerprint, so a fresh incoming file's header replaces it, and only the chunked entry goes."""
    dest = tmp_path / "dest"
    a, b, c = shape(L=64), shape(L=128), shape(L=256)
    old = device(templates_hash="0dd", family_templates=families(torch_chunked="0dd"))
    C.write_file(dest / f"{KEY}.json", cfgfile([entry(a, winner=Variant("triton")),
                                                entry(b, winner=Variant("torch_chunked"))], dev=old))
    src = tmp_path / "in.json"
    C.write_file(src, cfgfile([entry(c)]))
    rep = C.import_file(src, dest, fingerprint=FP)
    got = C.load_file(dest / f"{KEY}.json")
    assert got.device.fingerprint == FP
    assert [k for k, _ in rep.dropped] == [b.bucket().key] and [k for k, _ in rep.added] == [c.bucket().key]
    assert sorted(e.winner.family for e in got.entries.values()) == ["torch_online", "triton"]

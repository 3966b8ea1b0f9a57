"""Validation (noflash_tune.configs.validate): hostile or broken documents refused with ConfigError wherever the
mutation sits (property tests), each kind of bad file skipped by a load with exactly one warning while the other
dirs still serve, items outside today's search space dropped (another version's file) or refused (an edited one),
and dump refusing what parse would refuse."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noflash_tune import configs as C
from noflash_tune.variants import Variant

from configs_helpers import (KEY, cfgfile, device, entry, good_doc, load_counting, shape, torch_entry, triton_entry,
                             write_raw)


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


# --- bad files: each skipped with exactly one warning, never raising ------------------------------------------

def _mut(fn):
    def make():
        d = good_doc()
        fn(d)
        return d
    return make


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
    "param_outside_space": _mut(lambda d: torch_entry(d)["winner"]["params"].update(block_m=48)),
    "triton_param_outside_space": _mut(lambda d: triton_entry(d)["winner"]["params"].update(num_warps=3)),
    "unknown_param": _mut(lambda d: torch_entry(d)["winner"]["params"].update(unroll=2)),
    "bool_param": _mut(lambda d: torch_entry(d)["winner"]["params"].update(block_m=True)),
    "string_param": _mut(lambda d: torch_entry(d)["winner"]["params"].update(block_m="64")),
    "unknown_family_same_space": _mut(lambda d: d["entries"][0]["winner"].update(family="cuda_magic")),
    "runner_up_outside_space": _mut(lambda d: torch_entry(d)["runners_up"][0]["variant"]["params"].update(block_m=3)),
    "unknown_native_backend": _mut(lambda d: torch_entry(d)["native"].update(backend="fastest")),
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


@pytest.mark.parametrize("bad", [(("../x", "ab"),), (("__class__", "ab"),), (("triton", "{{ 1 }}"),),
                                 (("triton", "xyz"),), tuple((f"f{i}", "ab") for i in range(C.MAX_FAMILIES + 1))])
def test_dump_refuses_a_hostile_family_templates_header(bad):
    with pytest.raises(C.ConfigError, match="family_templates"):
        C.dump(cfgfile([entry()], dev=device(family_templates=bad)))

"""The tuned_configs format (noflash_tune.configs.schema): entries and files to JSON and back through a file, the
deterministic text that dump writes, and a property test that any file dump writes parses back equal."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noflash_tune import configs as C
from noflash_tune.shapes import MASKS, Bucket, Shape
from noflash_tune.variants import FAMILIES, Variant

from configs_helpers import KEY, cfgfile, entry, shape


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

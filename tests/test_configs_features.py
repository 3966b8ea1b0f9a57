"""Feature buckets in the tuned_configs format (noflash_tune.configs): an entry of a bucket with features beyond SDPA
(window, softcap, ALiBi, per-sequence key lengths, bottom-right alignment) written and read back equal under schema
2, plain entries written as before; every malformed feature field refused (an unknown feature name, wrong types, a
shape whose features are not its bucket's); and the store's lookup keeping feature and SDPA entries apart, its
nearest-bucket rule among entries of the same features only."""
from __future__ import annotations

import copy
import json

import pytest

from noflash_tune import configs as C
from noflash_tune.shapes import Bucket, FeatureBucket, Shape
from noflash_tune.variants import Variant

from configs_helpers import KEY, cfgfile, entry, load_counting, write_raw


def feature_shape(L=1000, **features) -> Shape:
    features = features or dict(window=(255, 0), softcap=50.0)
    return Shape(B=2, H=8, L=L, E=64, dtype="fp32", causal=True, **features)


def feature_entry(sh: Shape | None = None, ms=1.0) -> C.Entry:
    return entry(sh or feature_shape(), ms=ms, native=None)


def doc_of(*entries) -> dict:
    return json.loads(C.dump(cfgfile(list(entries))))


def test_a_feature_entry_round_trips_and_plain_entries_are_written_as_before(tmp_path):
    every = Shape(B=3, H=8, L=1000, E=64, dtype="fp32", window=(None, 16), softcap=30, alibi=True, kv_lens=True,
                  bottom_right=True)
    fe, every_e, plain = feature_entry(), feature_entry(every, ms=2.0), entry()
    cfg = cfgfile([fe, every_e, plain])
    path = tmp_path / f"{KEY}.json"
    C.write_file(path, cfg, merge=False)
    back = C.load_file(path)
    assert back == cfg
    got = back.entries[fe.key]
    assert isinstance(got.bucket, FeatureBucket) and got.key.endswith("/fwd/window+softcap")
    assert got.shape.window == (255, 0) and got.shape.softcap == 50.0 and got.native is None
    assert back.entries[every_e.key].key.endswith("/fwd/window+softcap+alibi+kv_lens+bottom_right")

    d = json.loads(path.read_text())
    assert d["schema"] == C.SCHEMA == 2  # an optional field: no new schema number
    rows = {json.dumps(e["bucket"], sort_keys=True): e for e in d["entries"]}
    feat = next(e for e in rows.values() if "features" in e["bucket"])
    assert feat["bucket"]["features"] in (["window", "softcap"], ["window", "softcap", "alibi", "kv_lens",
                                                                   "bottom_right"])
    old = next(e for e in rows.values() if "features" not in e["bucket"])
    # A plain entry reads exactly as every file before feature buckets: no new key anywhere in it.
    assert set(old["bucket"]) == {"dtype", "head_dim", "head_dim_v", "causal", "mask", "gqa", "seq_q", "seq_k",
                                  "grad"}
    assert set(old["shape"]) == {"B", "H", "L", "Hkv", "S", "E", "Ev", "dtype", "causal", "mask", "grad"}
    assert Bucket.from_json(old["bucket"]) == plain.bucket and type(Bucket.from_json(old["bucket"])) is Bucket


def _mutated(change) -> dict:
    d = doc_of(feature_entry(), entry())
    e = next(x for x in d["entries"] if "features" in x["bucket"])
    change(e)
    return d


BAD_FEATURE_FIELDS = {
    "unknown_feature_name": (lambda e: e["bucket"].update(features=["window", "rope"]), "unknown feature"),
    "features_as_a_string": (lambda e: e["bucket"].update(features="window+softcap"), "list of feature names"),
    "features_empty": (lambda e: e["bucket"].update(features=[]), "empty list"),
    "features_out_of_order": (lambda e: e["bucket"].update(features=["softcap", "window"]), "in the order"),
    "features_twice": (lambda e: e["bucket"].update(features=["window", "window", "softcap"]), "once each"),
    "feature_name_not_a_string": (lambda e: e["bucket"].update(features=["window", 7]), "expected a string"),
    "feature_name_a_dunder": (lambda e: e["bucket"].update(features=["window", "__class__"]), "refused"),
    "window_a_string": (lambda e: e["shape"].update(window="255,0"), "expected \\[left, right\\]"),
    "window_three_sides": (lambda e: e["shape"].update(window=[255, 0, 1]), "expected \\[left, right\\]"),
    "window_side_negative": (lambda e: e["shape"].update(window=[-1, 0]), "outside"),
    "window_side_a_float": (lambda e: e["shape"].update(window=[255.0, 0]), "expected an integer"),
    "window_side_a_bool": (lambda e: e["shape"].update(window=[True, 0]), "expected an integer"),
    "window_unbounded_both": (lambda e: e["shape"].update(window=[None, None]), "no window"),
    "softcap_zero": (lambda e: e["shape"].update(softcap=0), "softcap"),
    "softcap_a_string": (lambda e: e["shape"].update(softcap="50"), "expected a number"),
    "softcap_a_bool": (lambda e: e["shape"].update(softcap=True), "expected a number"),
    "alibi_not_a_bool": (lambda e: e["shape"].update(alibi="yes"), "expected true or false"),
    "kv_lens_of_one_row": (lambda e: (e["shape"].update(B=1, kv_lens=True),
                                      e["bucket"].update(features=["window", "softcap", "kv_lens"])),
                           "key lengths that differ"),
    "unknown_shape_field": (lambda e: e["shape"].update(rope=True), "unknown key"),
    # The shape measured must be of its bucket: features included.
    "shape_without_the_buckets_feature": (lambda e: e["shape"].pop("softcap"), "belongs to bucket"),
    "bucket_without_the_shapes_feature": (lambda e: e["bucket"].update(features=["window"]), "belongs to bucket"),
    "features_on_a_plain_shape": (lambda e: [e["shape"].pop(n) for n in ("window", "softcap")], "belongs to bucket"),
}


@pytest.mark.parametrize("name", sorted(BAD_FEATURE_FIELDS))
def test_malformed_feature_fields_are_refused(name):
    change, match = BAD_FEATURE_FIELDS[name]
    with pytest.raises(C.ConfigError, match=match):
        C.parse(_mutated(change))


def test_a_file_with_a_bad_feature_entry_is_skipped_with_one_warning_and_the_others_serve(tmp_path):
    good, bad = tmp_path / "a", tmp_path / "b"
    C.write_file(good / f"{KEY}.json", cfgfile([feature_entry()]), merge=False)
    write_raw(bad / f"{KEY}.json", _mutated(lambda e: e["bucket"].update(features=["window", "rope"])))
    cs, warned = load_counting([bad, good])
    assert len(warned) == 1 and "unknown feature" in str(warned[0].message)
    assert [e.key for e in cs.entries] == [feature_entry().key]


def test_the_store_keeps_feature_and_sdpa_entries_apart(tmp_path):
    """An SDPA call's bucket never finds a feature entry, not even as the nearest, nor a feature call's an SDPA
    entry; the nearest-bucket rule serves a feature call from an entry of the same features only."""
    plain_sh = Shape(B=2, H=8, L=1000, E=64, dtype="fp32", causal=True)
    feat = feature_entry(feature_shape(L=1000))
    C.write_file(tmp_path / f"{KEY}.json", cfgfile([feat]), merge=False)
    cs, warned = load_counting([tmp_path])
    assert not warned
    assert cs.lookup(plain_sh.bucket()) is None  # same dims and length: still no match
    assert cs.lookup(Shape(B=2, H=8, L=4000, E=64, dtype="fp32", causal=True).bucket()) is None
    assert cs.lookup(feat.bucket) == (cs.get(feat.key), "exact")
    assert cs.lookup(feature_shape(L=3000).bucket()) == (cs.get(feat.key), "nearest")
    # Another window size is the same bucket (the kernels take it as an argument); other features are not.
    assert cs.lookup(feature_shape(L=1000, window=(31, 0), softcap=5.0).bucket())[1] == "exact"
    assert cs.lookup(feature_shape(L=1000, window=(255, 0)).bucket()) is None
    assert cs.lookup(feature_shape(L=1000, window=(255, 0), softcap=50.0, alibi=True).bucket()) is None

    plain = entry(plain_sh)
    C.write_file(tmp_path / f"{KEY}.json", cfgfile([plain]), merge=False)
    cs, _ = load_counting([tmp_path])
    assert cs.lookup(plain_sh.bucket()) == (cs.get(plain.key), "exact")
    assert cs.lookup(feat.bucket) is None and cs.lookup(feature_shape(L=3000).bucket()) is None


def test_a_feature_entrys_winner_outside_todays_space_is_dropped_like_any_other():
    d = doc_of(feature_entry(), entry())
    d["device"]["space_hash"] = "0123456789ab"  # another version's search space
    e = next(x for x in d["entries"] if "features" in x["bucket"])
    e["winner"] = {"family": "torch_online", "params": {"block_m": 3}}
    cfg = C.parse(copy.deepcopy(d), warn=False)
    assert list(cfg.entries) == [entry().key]
    assert [k for k, _ in cfg.dropped] == [feature_entry().key]  # named by its feature bucket's key
    assert cfg.entries[entry().key].winner == Variant("torch_online", block_m=128)

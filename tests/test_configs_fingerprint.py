"""Fingerprints and staleness (noflash_tune.configs.fingerprint): stale entries served but flagged with the reason
(torch major.minor, triton for Triton winners, each family's own templates hash), a CPU's freshness blind to
Triton templates, a template edit staling only the families rendered from it, schema 1 files following the
combined hash, and families a file does or does not hash."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from noflash_tune import configs as C
from noflash_tune.variants import Variant

from configs_helpers import FP, KEY, cfgfile, device, entry, families, good_doc, load_counting, shape, write_raw


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


# --- template edits -------------------------------------------------------------------------------------------

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
                                                                "triton", "triton_chunked", "triton_chunked_ws",
                                                                "triton_decode", "triton_ws"]
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
             "triton_ws", "triton_decode")


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
    assert stale_after("triton/decode_splitkv.py.j2") == {"triton_decode"}  # a family's own file, no partial
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

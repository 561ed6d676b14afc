"""Broken entries and mismatched models: a clear error, no partially bound model, nothing left mapped."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import attach_fails as _attach_fails
from helpers import entry_copy as _entry
from helpers import from_pretrained, mappings_of
from sharedcache_integrations import hf
from sharedcache import ArenaError, AttachTimeout, BindError, FingerprintMismatch, ManifestError


def test_copy_of_a_good_entry_attaches(published, cache_dir, models):
    _entry(published, cache_dir)
    model = from_pretrained("decode", cache_dir, models["tiny"])
    rep = hf.instance_of(model).report
    assert rep.mode == "load" and rep.owner_alive is False and rep.weight_bytes_allocated == 0
    owner = published[1]
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, owner(ids).logits)
    del model, owner, rep
    assert mappings_of(cache_dir) == [], "the mapping goes when the last view goes"


def test_manifest_missing_times_out(published, cache_dir, models):
    dst = _entry(published, cache_dir)
    (dst / "manifest.json").unlink()
    _attach_fails(cache_dir, models["tiny"], AttachTimeout, "manifest.json", "no owner has published it yet")


def test_manifest_truncated(published, cache_dir, models):
    _entry(published, cache_dir, lambda d: json.dumps(d).encode()[:500])
    _attach_fails(cache_dir, models["tiny"], ManifestError, "not valid JSON", "truncated")


def test_manifest_not_json(published, cache_dir, models):
    _entry(published, cache_dir, lambda d: b"\x00\xff this is no manifest")
    _attach_fails(cache_dir, models["tiny"], ManifestError, "not valid JSON")


def test_manifest_unknown_schema_version(published, cache_dir, models):
    _entry(published, cache_dir, lambda d: d.update(schema=99))
    _attach_fails(cache_dir, models["tiny"], ManifestError, "schema version 99 is not supported")


def test_offset_out_of_bounds(published, cache_dir, models):
    def mutate(d):
        d["tensors"][0]["offset"] = d["arena"]["size"]
    _entry(published, cache_dir, mutate)
    _attach_fails(cache_dir, models["tiny"], ManifestError, "lie outside", "model.embed_tokens.weight")


def test_unknown_dtype(published, cache_dir, models):
    _entry(published, cache_dir, lambda d: d["tensors"][1].update(dtype="complex32"))
    _attach_fails(cache_dir, models["tiny"], ManifestError, "dtype 'complex32' is not one of")


def test_alias_to_missing_tensor(published, cache_dir, models):
    def mutate(d):
        tied = next(t for t in d["tensors"] if t["alias_of"])
        tied["alias_of"] = "model.no_such.weight"
    _entry(published, cache_dir, mutate)
    _attach_fails(cache_dir, models["tiny"], ManifestError, "alias_of 'model.no_such.weight' names no earlier")


def test_edited_tensor_table_fails_the_layout_digest(published, cache_dir, models):
    def mutate(d):  # a consistent-looking edit: swap two same-size tensors' offsets
        a, b = (t for t in d["tensors"] if t["name"].endswith("input_layernorm.weight"))
        a["offset"], b["offset"] = b["offset"], a["offset"]
    _entry(published, cache_dir, mutate)
    _attach_fails(cache_dir, models["tiny"], ManifestError, "layout_digest does not match")


def test_arena_file_shorter_than_manifest(published, cache_dir, models):
    _entry(published, cache_dir, mutate_arena=lambda p: os.truncate(p, p.stat().st_size // 2))
    _attach_fails(cache_dir, models["tiny"], ArenaError, "truncated", "manifest says")


def test_arena_file_missing(published, cache_dir, models):
    _entry(published, cache_dir, mutate_arena=lambda p: p.unlink())
    _attach_fails(cache_dir, models["tiny"], ArenaError, "is gone", "Start the prefill")


def test_fingerprint_mismatch_other_model_names_fields(published, cache_dir, models):
    _entry(published, cache_dir)
    msg = _attach_fails(cache_dir, models["default"], FingerprintMismatch, "model", "config_sha256", "weights")
    assert "dtype" not in msg.split("differing fields:")[1].split(")")[0]


def test_fingerprint_mismatch_other_dtype_names_dtype(published, cache_dir, models):
    _entry(published, cache_dir)
    msg = _attach_fails(cache_dir, models["tiny"], FingerprintMismatch, "differing fields: dtype)",
                        dtype="bfloat16")
    assert "ours='bfloat16' published='float32'" in msg


def test_fingerprint_mismatch_with_fallback_loads_normally(published, cache_dir, models):
    _entry(published, cache_dir)
    model = from_pretrained("decode", cache_dir, models["tiny"], "cache.on_mismatch=fallback", dtype="bfloat16")
    rep = hf.instance_of(model).report
    assert rep.fallback and "dtype" in rep.fallback
    assert rep.weight_bytes_allocated > 0 and rep.tensors == 0
    assert model.dtype == torch.bfloat16
    assert mappings_of(cache_dir) == []
    plain = from_pretrained("plain", cache_dir, models["tiny"], dtype="bfloat16")
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_config_edited_for_the_decode_is_a_fingerprint_mismatch(published, cache_dir, models):
    """The effective config (with the call's overrides) is fingerprinted, not only config.json."""
    _entry(published, cache_dir)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(models["tiny"])
    cfg.intermediate_size = 96
    _attach_fails(cache_dir, models["tiny"], FingerprintMismatch, "differing fields: config_sha256)", config=cfg)
    _attach_fails(cache_dir, models["tiny"], FingerprintMismatch, "config_sha256", cls=None,
                  rms_norm_eps=1e-3)  # a config override passed as a keyword


def test_skeleton_and_entry_disagree_on_tensor_names(published, cache_dir, models):
    """A self-consistent manifest (digest recomputed) that names other tensors: binding refuses it."""
    from sharedcache.layout import TensorSpec, layout_digest

    def mutate(d):
        t = next(x for x in d["tensors"] if x["name"] == "model.norm.weight")
        t["name"] = "model.final_norm.weight"
        specs = [TensorSpec(**{**x, "shape": tuple(x["shape"]), "stride": tuple(x["stride"])}) for x in d["tensors"]]
        d["arena"]["layout_digest"] = layout_digest(specs, d["arena"]["size"], d["arena"]["alignment"])
    _entry(published, cache_dir, mutate)
    _attach_fails(cache_dir, models["tiny"], BindError, "missing from the entry ['model.norm.weight']",
                  "model.final_norm.weight")


def test_non_contiguous_stride_is_refused(published, cache_dir, models):
    def mutate(d):
        t = next(x for x in d["tensors"] if len(x["shape"]) == 2 and not x["alias_of"])
        t["stride"] = [0, 1]
    _entry(published, cache_dir, mutate)
    _attach_fails(cache_dir, models["tiny"], ManifestError, "is not the contiguous stride")


@pytest.mark.parametrize("kind", ["fifo", "directory", "deep", "huge-int", "far-future"])
def test_odd_manifest_files_are_refused_without_hanging(published, cache_dir, models, kind):
    dst = _entry(published, cache_dir)
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        path.mkdir(mode=0o700)
    elif kind == "deep":
        path.write_text("[" * 100_000)
    elif kind == "huge-int":
        path.write_text(json.dumps({**data, "created": 0}).replace('"created": 0', '"created": ' + "9" * 5000))
    else:
        path.write_text(json.dumps({**data, "created": 1e300}))
    with pytest.raises(ManifestError):
        from_pretrained("decode", cache_dir, models["tiny"], "cache.wait_timeout_s=0.5")

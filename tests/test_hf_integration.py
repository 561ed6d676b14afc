"""The transformers adapter: patching, concrete classes, tied weights, unsupported requests."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from helpers import from_pretrained, mappings_of
from sharedcache_integrations import hf
from sharedcache import UnsupportedModel


@pytest.fixture
def owner(models, cache_dir):
    model = from_pretrained("prefill", cache_dir, models["tiny"], "role.phases=[intercept,align,verify,serialize]")
    yield model
    hf.instance_of(model).close()


def test_install_uninstall_restores_from_pretrained(cache_dir, models):
    original = PreTrainedModel.__dict__["from_pretrained"]
    from_pretrained("plain", cache_dir, models["tiny"])
    assert PreTrainedModel.__dict__["from_pretrained"] is original


def test_owner_is_rebound_into_its_arena(owner, cache_dir):
    rep = hf.instance_of(owner).report
    assert rep.mode == "save" and rep.weight_bytes_allocated == rep.arena_bytes
    assert owner.lm_head.weight is owner.model.embed_tokens.weight
    maps = mappings_of(cache_dir)
    start, end = (int(x, 16) for x in maps[0].split()[0].split("-"))
    for name, t in list(owner.named_parameters()) + list(owner.named_buffers()):
        assert start <= t.data_ptr() < end, name


def test_concrete_class_attach_with_verify(owner, cache_dir, models):
    model = from_pretrained("decode", cache_dir, models["tiny"], "role.phases=[intercept,serialize,align,verify]",
                            cls=LlamaForCausalLM)
    assert isinstance(model, LlamaForCausalLM)
    rep = hf.instance_of(model).report
    assert [p["name"] for p in rep.phases] == ["intercept", "serialize", "align", "verify"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inv = model.model.rotary_emb.inv_freq
    assert inv.data_ptr() != owner.model.rotary_emb.inv_freq.data_ptr()  # own mapping, same bytes
    assert torch.equal(inv, owner.model.rotary_emb.inv_freq)
    assert model.generation_config.eos_token_id == owner.generation_config.eos_token_id
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([[1, 70, 71, 72, 73]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, owner(ids).logits)


def test_verify_catches_bytes_changed_after_publishing(owner, cache_dir, models):
    """Another process of the user scribbles over a published tensor through the arena file (the owner's
    own mapping is read-only once published, so it could not)."""
    from sharedcache import ArenaError
    from sharedcache.cache import CacheDir

    entry = CacheDir(cache_dir).entry("k")
    manifest = entry.read()
    spec = next(t for t in manifest.tensors if t.name == "model.norm.weight")
    with open(entry.dir / manifest.handle["file"], "r+b") as f:
        f.seek(spec.offset)
        f.write(b"\x7f" * 16)
    with pytest.raises(ArenaError, match="differ from the published checksums"):
        from_pretrained("decode", cache_dir, models["tiny"], "role.phases=[intercept,serialize,align,verify]")


@pytest.mark.parametrize("kwargs,words", [
    ({"device_map": {"model": "cpu", "lm_head": "disk"}}, "offloads the model to the CPU or disk"),
    ({"quantization_config": {"load_in_4bit": True, "quant_method": "bitsandbytes"}}, "bitsandbytes"),
    ({"offload_folder": "/tmp/x"}, "offload"),
])
@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_unsupported_requests_fail_before_anything_loads(role, kwargs, words, cache_dir, models):
    with pytest.raises(UnsupportedModel, match=words):
        from_pretrained(role, cache_dir, models["tiny"], **kwargs)
    assert not list(cache_dir.glob("*/manifest.json")) and mappings_of(cache_dir) == []


def test_peft_adapter_dir_is_refused(cache_dir, models, tmp_path):
    import shutil

    peft = tmp_path / "peft"
    shutil.copytree(models["tiny"], peft)
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(UnsupportedModel, match="PEFT"):
        from_pretrained("decode", cache_dir, peft)


def test_unsupported_with_fallback_takes_the_normal_path(cache_dir, models):
    model, info = from_pretrained("prefill", cache_dir, models["tiny"], "cache.on_unsupported=fallback",
                                  output_loading_info=True)
    rep = hf.instance_of(model).report
    assert rep.fallback and "output_loading_info" in rep.fallback and rep.mode == "off"
    assert isinstance(info, dict) and "missing_keys" in info
    assert not list(cache_dir.glob("*/manifest.json")), "a fallback publishes nothing"


class LlamaWithLooseTensor(LlamaForCausalLM):
    """Keeps a tensor outside its parameters and buffers, as some custom layers do: binding cannot reach it."""

    def __init__(self, config):
        super().__init__(config)
        self.loose = torch.ones(4)


def test_model_binding_cannot_fully_reach_is_refused_or_falls_back(owner, cache_dir, models):
    with pytest.raises(UnsupportedModel, match="outside its parameters and buffers"):
        from_pretrained("decode", cache_dir, models["tiny"], cls=LlamaWithLooseTensor)
    model = from_pretrained("decode", cache_dir, models["tiny"], "cache.on_unsupported=fallback",
                            cls=LlamaWithLooseTensor)
    rep = hf.instance_of(model).report
    assert "outside its parameters and buffers" in rep.fallback
    assert rep.backend is None and rep.weight_bytes_allocated > 0  # loaded normally, nothing half-bound
    assert not any(t.is_meta for t in model.parameters())


def test_one_call_from_pretrained_with_the_packaged_settings(models, cache_dir):
    """hf.from_pretrained(path, role=...) composes the packaged conf's role and cache groups: an auto call
    publishes, a decode call attaches to it with zero weight bytes; the key is the model directory's name."""
    import torch

    from sharedcache import configured
    from sharedcache_integrations import hf

    path = models["tiny"]
    owner = hf.from_pretrained(path, role="auto", overrides=[f"cache.dir={cache_dir}"])
    try:
        first = hf.instance_of(owner).report
        assert first.mode == "save" and first.fallback is None and first.key == path.name
        model = hf.from_pretrained(path, role="decode", overrides=[f"cache.dir={cache_dir}"])
        second = hf.instance_of(model).report
        assert second.mode == "load" and second.weight_bytes_allocated == 0 and second.key == path.name
        ids = torch.tensor([[1, 5, 9, 2]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, owner(ids).logits)
        hf.instance_of(model).close()
    finally:
        hf.instance_of(owner).close()
    role, settings = configured("decode", f"cache.dir={cache_dir}")
    assert role.name == "decode" and settings.dir == str(cache_dir) and settings.wait_timeout_s > 0


def test_one_call_keeps_an_install_of_the_process_own_and_takes_any_path(models, cache_dir, tmp_path):
    """hf.from_pretrained() beside hf.install(): the install's role still routes later calls afterwards; a
    model directory named with a comma and spaces loads, keyed as a launcher would key it."""
    import shutil

    from transformers import AutoModelForCausalLM

    from helpers import role_and_settings
    from sharedcache_integrations import hf

    odd = tmp_path / "tiny,v2 (copy)"
    shutil.copytree(models["tiny"], odd)
    role, settings, _ = role_and_settings("prefill", cache_dir, "cache.key=installed")
    hf.install(role=role, cache=settings)
    try:
        one = hf.from_pretrained(odd, role="auto", overrides=[f"cache.dir={cache_dir}"])
        assert hf.instance_of(one).report.key == "tiny-v2--copy-"
        after = AutoModelForCausalLM.from_pretrained(models["tiny"])  # still through the install's role
        assert hf.instance_of(after).report.key == "installed" and hf.instance_of(after).report.mode == "save"
        hf.instance_of(after).close()
        hf.instance_of(one).close()
    finally:
        hf.uninstall()
    plain = AutoModelForCausalLM.from_pretrained(models["tiny"])
    assert hf.instance_of(plain) is None  # uninstalled: transformers' own load again

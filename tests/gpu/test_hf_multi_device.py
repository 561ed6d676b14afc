"""transformers models spread over two GPUs (pytest -m gpu, on a machine with at least two): one arena
and one manifest per device, attached and bound together, each instance its own process
(tests/gpu/spread_probe.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = REPO / "tests" / "gpu" / "spread_probe.py"


def _gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return len([line for line in out.splitlines() if line.startswith("GPU ")])


# a marker, not a skip at import: a run that deselects these tests (-m slow) does not report them skipped
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs: the model is spread over them")]


# the embedded default model (8 layers, tied embeddings): layers 0-3 and the tied pair on GPU 0, the rest on 1
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, **{f"model.layers.{i}": 0 if i < 4 else 1 for i in range(8)},
         "model.norm": 1, "lm_head": 0}


def probe(model_dir, cache_dir, role: str, device_map, *, hold: bool = False, key: str = "spread"):
    args = [sys.executable, str(PROBE), "--role", role, "--model-dir", str(model_dir), "--cache-dir", str(cache_dir),
            "--key", key, "--device-map", device_map if isinstance(device_map, str) else json.dumps(device_map)]
    if hold:
        proc = subprocess.Popen(args + ["--hold"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(proc.stderr.read())
        return proc, json.loads(line)
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-4000:]
    return done.returncode, json.loads(lines[-1]), done.stderr


def release(proc: subprocess.Popen) -> int:
    proc.communicate("go\n", timeout=120)
    return proc.returncode


def published_keys(cache_dir) -> list[str]:
    return sorted(p.parent.name for p in cache_dir.glob("*/manifest.json"))


def test_spread_model_shares_one_arena_per_gpu_and_decodes_bit_identical(models, cache_dir):
    owner, pre = probe(models["default"], cache_dir, "prefill", SPLIT, hold=True)
    try:
        rep = pre["report"]
        assert rep["mode"] == "save" and rep["fallback"] is None, rep
        assert [p["device"] for p in rep["parts"]] == ["cuda:0", "cuda:1"], rep["parts"]
        assert [p["key"] for p in rep["parts"]] == ["spread", "spread-part1"]
        assert published_keys(cache_dir) == ["spread", "spread-part1"]
        rc, same, err = probe(models["default"], cache_dir, "decode", SPLIT)
        assert rc == 0, err[-4000:]
        rc, auto, err = probe(models["default"], cache_dir, "decode", "auto")  # takes the owner's placement
        assert rc == 0, err[-4000:]
        rc, plain, err = probe(models["default"], cache_dir, "plain", SPLIT)
        assert rc == 0, err[-4000:]
        for dec in (same, auto):
            r = dec["report"]
            assert r["mode"] == "load" and r["fallback"] is None and r["weight_bytes_allocated"] == 0, r
            assert [p["device"] for p in r["parts"]] == ["cuda:0", "cuda:1"]
            assert dec["weight_memory_allocated"] == [0, 0], dec["weight_memory_allocated"]
            assert dec["param_devices"] == ["cuda:0", "cuda:1"] and dec["tied"] is True
            assert dec["hf_device_map"] == pre["hf_device_map"] == plain["hf_device_map"]
            assert dec["logits_sha256"] == pre["logits_sha256"] == plain["logits_sha256"]
            assert dec["tokens"] == pre["tokens"] == plain["tokens"]
        assert sum(p["bytes"] for p in rep["parts"]) == rep["bytes_shared"] > 0
    finally:
        assert release(owner) == 0
    assert published_keys(cache_dir) == [], "the owner's exit unpublishes every part"


def test_a_decode_that_asks_otherwise_is_refused_naming_what_differs(models, cache_dir):
    owner, pre = probe(models["default"], cache_dir, "prefill", SPLIT, hold=True)
    try:
        assert len(pre["report"]["parts"]) == 2
        rc, one, _ = probe(models["default"], cache_dir, "decode", "cuda:0")
        assert rc == 2 and one["error"] == "FingerprintMismatch" and "differing fields: devices" in one["message"], one
        other = dict(SPLIT, **{"model.layers.3": 1})
        rc, moved, _ = probe(models["default"], cache_dir, "decode", other)
        assert rc == 2 and "model.layers.3" in moved["message"] and "otherwise than the owner" in moved["message"], moved
    finally:
        assert release(owner) == 0


def test_tied_weights_split_over_two_gpus_are_shared_or_refused_cleanly(models, cache_dir):
    """lm_head is tied to embed_tokens; a map that runs them on two GPUs either gets two distinct copies
    from transformers (each shared on its own GPU) or one tensor used on both, which is refused."""
    split_tie = dict(SPLIT, lm_head=1)
    rc, pre, err = probe(models["default"], cache_dir, "prefill", split_tie)
    if rc == 0:  # transformers placed distinct tensors: the decode must match a plain load
        print("tied weights across GPUs: transformers untied them; shared as two parts")
        owner, pre = probe(models["default"], cache_dir, "prefill", split_tie, hold=True, key="tied")
        try:
            rc, dec, err = probe(models["default"], cache_dir, "decode", split_tie, key="tied")
            assert rc == 0, err[-4000:]
            _, plain, _ = probe(models["default"], cache_dir, "plain", split_tie)
            assert dec["report"]["weight_bytes_allocated"] == 0
            assert dec["logits_sha256"] == pre["logits_sha256"] == plain["logits_sha256"]
        finally:
            assert release(owner) == 0
    else:
        print("tied weights across GPUs: refused:", pre.get("message"))
        assert pre["error"] == "UnsupportedModel" and "tied weights split over two devices" in pre["message"], pre
        assert published_keys(cache_dir) == [], "a refused save leaves no part published"

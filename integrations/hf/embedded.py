"""Deterministic, offline generation of the project's embedded default model.

The model is a small Llama-architecture causal LM with random (but seeded) weights
and a training-free byte-level tokenizer. It exists so that the project always has
a real Hugging Face checkpoint to load without any hub access; it is not meant to
produce meaningful text. Generation is reproducible bit for bit and safe to race:
several processes may ask for the same directory at once.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_MARKER = ".complete"
# Wide enough that greedy decoding wanders over many tokens instead of repeating one,
# so parity checks compare varied sequences (0.02, the usual init, collapses to one token).
_INIT_STD = 0.08
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama-style unk/bos/eos order


@dataclass(frozen=True)
class EmbeddedSpec:
    """Everything that determines the generated checkpoint (sizes, dtype and seed)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # "float32" | "bfloat16" | "float16"
    seed: int

    def __post_init__(self) -> None:
        # Fail early with a clear message instead of deep inside torch/transformers.
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide by num_attention_heads, and that by num_key_value_heads")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> EmbeddedSpec:
        """Build a spec from config data, rejecting typos and omissions rather than guessing."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(m) - names), sorted(names - set(m))
        if unknown or missing:
            raise ValueError(f"invalid embedded model spec: unknown keys {unknown}, missing keys {missing}")
        return cls(**{k: m[k] for k in names})


def ensure_embedded_model(directory: str | os.PathLike, spec: EmbeddedSpec) -> pathlib.Path:
    """Return `directory`, generating the model there first if it is not already complete."""
    target = pathlib.Path(directory)
    if _is_complete(target, spec):  # fast path: no lock needed for a finished directory
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock is a sibling that is never removed: deleting it would let two processes lock different inodes.
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target, spec):  # another process finished while we waited
                return target
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # leftover of a killed run
            elif target.exists() or target.is_symlink():
                target.unlink()
            for stale in target.parent.iterdir():  # temp dirs of killed runs (no glob: names may hold '[')
                if stale.name.startswith(f".{target.name}.tmp-"):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                tmp.mkdir()
                _generate(tmp, spec, target)
                _write_synced(tmp / _MARKER, json.dumps(dataclasses.asdict(spec), sort_keys=True) + "\n")
                _fsync_tree(tmp)
                try:
                    os.rename(tmp, target)  # atomic: readers see either nothing or a complete model
                except OSError as e:
                    # Only a process that ignores the lock can get here; accept its result if it is ours.
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_complete(target, spec):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _is_complete(target: pathlib.Path, spec: EmbeddedSpec) -> bool:
    """True if `target` holds a finished model for `spec`; raise if it holds one for another spec."""
    try:
        recorded = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):  # missing or unreadable marker: treat as incomplete
        return False
    if recorded != dataclasses.asdict(spec):
        raise ValueError(
            f"{target} holds another embedded model spec ({recorded}); remove it or choose another path"
        )
    return True


def _write_synced(path: pathlib.Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: pathlib.Path) -> None:
    """Flush every file so a crash right after the rename cannot leave truncated weights behind."""
    for path in root.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_tokenizer(model_max_length: int, vocab_size: int | None = None) -> Any:
    """Byte-level BPE with no merges: one token per byte, so any UTF-8 text round-trips without training.

    With `vocab_size` (a model whose vocabulary is larger, e.g. Llama-3's 128,256), the ids past the
    bytes are filler tokens `~<id>`: no merge reaches them, so encoding stays byte-level, but each
    decodes to visible text, so a server streams text for every id such a model emits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _SPECIAL_TOKENS + tuple(sorted(pre_tokenizers.ByteLevel.alphabet()))
    filler = tuple(f"~{i}" for i in range(len(symbols), vocab_size or 0))
    vocab = {tok: i for i, tok in enumerate(symbols + filler)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=model_max_length,
    )


def _param_count(spec: EmbeddedSpec, vocab_size: int) -> int:
    """Parameter count of the Llama model for `spec`, computed up front for the log message."""
    h, head_dim = spec.hidden_size, spec.hidden_size // spec.num_attention_heads
    attn = 2 * h * h + 2 * h * spec.num_key_value_heads * head_dim
    layer = attn + 3 * h * spec.intermediate_size + 2 * h
    embeddings = vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return embeddings + spec.num_hidden_layers * layer + h


def _generate(out: pathlib.Path, spec: EmbeddedSpec, target: pathlib.Path) -> None:
    """Write tokenizer, config, generation config and seeded weights into `out` (destined for `target`)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.max_position_embeddings)
    vocab_size = len(tokenizer)  # every id the model can emit decodes to a byte
    size_mb = _param_count(spec, vocab_size) * _DTYPE_BYTES[spec.dtype] / 1e6
    logger.info("generating embedded model %s (%.0f MB) ...", target, size_mb)
    start = time.monotonic()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        # transformers 5.x: RoPE settings live in `rope_parameters`; a top-level rope_theta is legacy.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=spec.tie_word_embeddings,
        **ids,
    )
    model = LlamaForCausalLM(config)
    # Overwrite transformers' init with our own seeded draw so the weights depend only on `spec`.
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):  # tied weights are listed once
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, _INIT_STD, generator=generator))
    model = model.to(getattr(torch, spec.dtype))
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    model.save_pretrained(out)  # 5.x always writes safetensors (`safe_serialization` was removed)
    tokenizer.save_pretrained(out)
    logger.info("generated embedded model %s in %.1f s", target, time.monotonic() - start)

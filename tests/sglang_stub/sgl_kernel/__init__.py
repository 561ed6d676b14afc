"""Test-only stand-in for `sgl_kernel`, SGLang's compiled kernel package.

Why: SGLang's CPU engine imports these names at import time from the Intel CPU build of
sgl_kernel (a package no wheel on our registries provides; the CUDA build does not define
them). They serve speculative decoding and KV-cache moves, which the tests never run.
Each one raises if called, so a test that reached one would fail loudly instead of
computing something wrong. The package deliberately has no submodules (SGLang probes
`sgl_kernel.scalar_type` and `sgl_kernel.allreduce` under try/except) and registers no
torch ops (so SGLang's AMX detection stays off and its native PyTorch paths run).
Only tests/with_sglang puts this directory on sys.path (and the SGLang servers it starts).
"""

_NAMES = (
    "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu", "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu", "copy_all_layer_kv_cache_cpu", "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu", "verify_tree_greedy_cpu",
)


def _unavailable(name: str):
    def kernel(*_args, **_kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is a test stand-in (tests/sglang_stub); the real CPU "
                                  "kernel is not installed, and this test path was not expected to call it.")

    kernel.__name__ = name
    return kernel


for _name in _NAMES:
    globals()[_name] = _unavailable(_name)

__version__ = "0.0.0+sharedcache-test-stand-in"

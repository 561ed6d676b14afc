"""Attach and drop a model on the GPU N times in one process; print fds, RSS and the device's
free memory before and after (one JSON line). Run by tests/gpu/test_cuda_leaks.py."""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_kb() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


def main() -> None:
    cache_dir, model_dir, cycles = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    import torch

    from helpers import from_pretrained
    from sharedcache import backends

    torch.cuda.init()
    backends.prepare(torch.device("cuda", 0))

    def cycle() -> None:
        model = from_pretrained("decode", cache_dir, model_dir, "cache.key=sc-llama-100m", device_map="cuda")
        del model
        gc.collect()
        torch.cuda.synchronize()

    for _ in range(10):
        cycle()
    before = {"fds": len(os.listdir("/proc/self/fd")), "rss_kb": rss_kb(), "free": torch.cuda.mem_get_info()[0]}
    for _ in range(cycles):
        cycle()
    after = {"fds": len(os.listdir("/proc/self/fd")), "rss_kb": rss_kb(), "free": torch.cuda.mem_get_info()[0]}
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    main()

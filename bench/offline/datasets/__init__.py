"""Stand-in for Hugging Face `datasets` on the offline GPU machine, which lacks it.

SGLang's bench_serving imports `datasets.load_dataset` at import time (for its MMMU dataset); the
serving benchmark uses the `random-ids` dataset, which never calls it. Only on bench_serving's path.
"""


def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is not installed on this machine; bench/sglang_serving.py uses random-ids only")

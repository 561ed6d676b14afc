"""How a tensor-parallel SGLang server's ranks fail together: the launcher's one message from the ranks'
failure reports, and the rule that a server shares on every rank or on none. No SGLang needed here; on a
GPU, bench/sglang_tp.py runs both against real TP-4 servers."""
from __future__ import annotations

from sharedcache import ExitCode
from sharedcache_integrations.sglang.hooks import disagreement
from sharedcache_integrations.sglang.server import rank_failure


def failure(rank: str, error: str = "FingerprintMismatch", code: int = ExitCode.CONFIG) -> dict:
    return {"ok": False, "rank": rank, "error": error, "exit_code": code, "hint": "Start the decode with the "
            "prefill's settings.", "message": f"entry 'm-{rank}' was published by another model (differing "
                                              "fields: tp_size)."}


def test_every_rank_refusing_is_one_message_with_the_first_reason_and_its_exit_code():
    err = rank_failure([failure(f"tp{r}") for r in range(4)], 4)
    assert str(err).count("differing fields: tp_size") == 1
    assert "all 4 of its ranks refused to start. tp0: entry 'm-tp0'" in str(err)
    assert "(the same on tp1, tp2, tp3)" in str(err) and err.hint.startswith("Start the decode")
    assert err.exit_code == ExitCode.CONFIG  # a mismatch stays a configuration error through the server


def test_ranks_failing_for_different_reasons_are_all_named():
    err = rank_failure([failure("tp0"), failure("tp2", "OwnerGone", ExitCode.RETRY)], 4)
    assert "ranks tp0, tp2 of 4 refused to start, and SGLang stopped the others with it" in str(err)
    assert "(also tp2: OwnerGone)" in str(err)
    assert "rank tp1 of 2 refused to start" in str(rank_failure([failure("tp1")], 2))
    assert rank_failure([failure("tp0")], 1).message.startswith("the SGLang server stopped: its rank refused")


def test_ranks_agree_when_all_share_or_none_does():
    shared = [{"rank": f"tp{r}", "shared": True, "why": None} for r in range(4)]
    alone = [{"rank": f"tp{r}", "shared": False, "why": "no entry"} for r in range(4)]
    assert disagreement(shared) is None and disagreement(alone) is None
    mixed = shared[:2] + [{"rank": "tp2", "shared": False, "why": "the owner is gone"}] + shared[3:]
    problem = disagreement(mixed)
    assert problem.startswith("ranks tp0, tp1, tp3 share their weights") and "1 of 4 could not" in problem
    assert "tp2: the owner is gone" in problem and "every rank refuses" in problem


def test_failure_reports_are_read_in_rank_order(tmp_path):
    from sharedcache_integrations.sglang.server import _rank_order

    tp = ["failed-tp10.json", "failed-tp2.json", "failed-tp1.json"]
    assert [p.name for p in sorted((tmp_path / n for n in tp), key=_rank_order)] == \
        ["failed-tp1.json", "failed-tp2.json", "failed-tp10.json"]
    pp = ["failed-pp1-tp0.json", "failed-pp0-tp3.json"]
    assert sorted((tmp_path / n for n in pp), key=_rank_order)[0].name == "failed-pp0-tp3.json"

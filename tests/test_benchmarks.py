"""Each benchmark script runs end to end on tiny sizes, so that they cannot rot. (No timing is asserted.)"""

from __future__ import annotations

from benchmarks import decode, train


def test_decode_benchmark_runs():
    result = decode.main(["--quick"])
    assert set(result["models"]) == {"itera-lite", "llama", "mamba2"}
    sizes = [row["cache_bytes"] for row in result["models"]["itera-lite"]["decode_by_context"].values()]
    assert len(set(sizes)) == 1  # the recurrent state does not grow with the context
    assert all(v > 0 for v in result["ratios"].values())


def test_train_benchmark_runs():
    result = train.main(["--quick"])
    assert all(row["train_tokens_per_s"] > 0 for row in result["models"].values())

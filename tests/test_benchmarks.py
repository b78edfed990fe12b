"""Each benchmark script runs end to end on tiny sizes, so that they cannot rot. (No timing is asserted.)"""

from __future__ import annotations

from benchmarks import decode, load_test, profile_train, train, ttft


def test_decode_benchmark_runs():
    result = decode.main(["--quick"])
    assert set(result["models"]) == {"itera-lite", "llama", "mamba2"}
    sizes = [row["cache_bytes"] for row in result["models"]["itera-lite"]["decode_by_context"].values()]
    assert len(set(sizes)) == 1  # the recurrent state does not grow with the context
    assert result["models"]["itera-lite"]["generate"]["compiled/batch1"]["tokens_per_s"] > 0
    # the smoke run does not compile the peers, so the one ratio against compiled Llama is undefined there
    assert all(v > 0 for k, v in result["ratios"].items() if k != "compiled_vs_llama_compiled_b1")


def test_train_benchmark_runs():
    result = train.main(["--quick"])
    assert set(result["models"]) == set(train.MODELS)
    for row in result["models"].values():
        eager = row["settings"]["eager"]
        assert eager["train_tokens_per_s"] > 0 and eager["prefill_tokens_per_s"] > 0 and eager["peak_step_mb"] > 0
    assert all(v["ratio"] > 0 for v in result["ratios"].values())


def test_train_profile_runs_and_accounts_for_every_op():
    text = profile_train.main(["--setting", "eager", "--batch", "1", "--length", "16", "--no-save"])
    assert "itera-lite: top" in text and "llama: top" in text
    shares = [line for line in text.splitlines() if line.startswith("| ") and "(" in line and "%" in line]
    # every op falls in one group: each model's shares add up to the whole
    for column in (1, 2):
        total = sum(int(line.split("|")[column + 1].split("(")[1].rstrip("%) ")) for line in shares)
        assert 95 <= total <= 105


def test_load_test_soak_runs():
    # one server thread: the test must not depend on free cores (two spinning threads on a busy CPU crawl)
    args = ["--tiny", "--duration", "2", "--clients", "1", "4", "--no-save", "--server-threads", "1"]
    result = load_test.main(args)
    assert [level["clients"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert level["wrong"] == 0 and level["ok"] > 0


def test_load_test_with_distinct_prompts_streams_a_cold_prompt_per_request():
    args = ["--tiny", "--distinct-prompts", "--clients", "2", "--requests", "4", "--max-tokens", "4", "--no-save"]
    result = load_test.main([*args, "--server-threads", "1"])
    [level] = result["levels"]
    assert level["ok"] == 4 and level["first_byte_p50_s"] is not None and level["prompt_tokens_mean"] >= 100
    assert len({load_test.distinct_prompt(0, i) for i in range(8)}) == 8


def test_ttft_benchmark_runs():
    result = ttft.main(["--tiny", "--repeats", "2", "--no-save", "--server-threads", "1"])
    assert set(result["first_chunk_ms"]) == set(ttft.CASES) and all(v > 0 for v in result["first_chunk_ms"].values())
    assert result["greedy_equal_to_no_cache"] and len(result["branch_texts"]) == 2 * len(ttft.ASKS)
    assert result["state_cache"]["hits"] > 0

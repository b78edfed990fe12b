"""What `training.evaluate` and `training.names` measure: per-story scores equal each story scored alone, bits per
byte from bytes; which words are names, the name-consistency share, and the re-casing rule. Also the dropout
settings of the config: off in eval mode, on in training."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from training import evaluate, names
from training.tokenizer import train_tokenizer

from .conftest import TINY, WORDS

STORIES = [
    "Lily saw a big dog. The dog ran to Lily and Tom.",
    "Tom had a red ball.",
    'Mom said, "Look at the sun!" Lily and Ben looked up. Ben smiled at Lily.',
    "The cat sat.",
]


@pytest.fixture
def tokenizer():
    return train_tokenizer(STORIES * 20 + [" ".join(WORDS)] * 20, vocab_size=300)


@torch.no_grad()
def test_per_story_scores_are_each_story_alone_summed(tokenizer):
    model = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "vocab_size": len(tokenizer)})).eval()
    got = evaluate.per_story(model, tokenizer, STORIES, tokens_per_batch=64)  # batches of padded stories
    nll = tokens = 0
    for story in STORIES:
        ids = torch.tensor([tokenizer(story)["input_ids"] + [tokenizer.eos_token_id]])
        assert ids[0, 0] == tokenizer.bos_token_id
        logits = model(ids).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    n_bytes = sum(len(s.encode()) for s in STORIES)
    assert got["tokens"] == tokens and got["bytes"] == n_bytes and got["stories"] == len(STORIES)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / sum(len(s.split()) for s in STORIES)), rel=1e-5)


def test_names_are_the_words_capitalised_mid_sentence():
    text = ["Lily and Tom went out. Then Lily saw the dog. The dog liked Lily and Tom. I saw Tom."] * 5
    found = names.proper_nouns(text)
    assert found == {"lily", "tom"}  # not "the", "then" (sentence starts), not "i"


def test_name_consistency_is_the_share_of_mentions_that_repeat_a_name():
    known = frozenset({"lily", "tom", "bob", "sue"})
    keeps = "Lily went out. Lily saw Tom. Tom and Lily's dog played."  # 5 mentions, 2 names: 3 repeats
    wanders = "Bob ran. Then Sue came. Tom sat."  # 3 mentions, 3 names
    score = names.name_consistency([keeps, wanders], known)
    assert score["name_consistency"] == pytest.approx(3 / 8)
    assert score["name_mentions_per_sample"] == 4 and score["distinct_names_per_sample"] == 2.5
    assert names.name_consistency([keeps], known)["name_consistency"] > score["name_consistency"]
    assert math.isnan(names.name_consistency(["the dog ran."], known)["name_consistency"])


def test_recasing_restores_sentence_starts_names_and_i():
    known = frozenset({"lily", "tom"})
    lowered = (
        '"wow!" said lily. i think tom\'s dog is big. "let\'s go," she said. "yes." they ran.\n<|endoftext|>\nthe end.'
    )
    assert names.recase(lowered, known) == (
        '"Wow!" said Lily. I think Tom\'s dog is big. "Let\'s go," she said. "Yes." They ran.\n<|endoftext|>\nThe end.'
    )


def test_dropout_acts_in_training_only_and_zero_dropout_is_the_plain_model():
    torch.manual_seed(0)
    ids = torch.randint(3, TINY["vocab_size"], (2, 40))  # > 32 tokens: the MoE's grouped dispatch
    plain = IteraLiteForCausalLM(IteraLiteConfig(**TINY))
    dropped = IteraLiteForCausalLM(IteraLiteConfig(**TINY, hidden_dropout=0.3, expert_dropout=0.3))
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(ids).logits, plain.eval()(ids).logits)
        a, b = dropped.train()(ids).logits, dropped(ids).logits
        assert not torch.allclose(a, b)  # a new mask each call
        torch.testing.assert_close(plain.train()(ids).logits, plain(ids).logits)  # no dropout: deterministic
    with pytest.raises(ValueError, match="hidden_dropout must be a float in"):
        IteraLiteConfig(**TINY, hidden_dropout=1.0)

"""Character names in TinyStories-style text: which words are names, a name-consistency score, and re-casing.

A *name* is a word that the reference text (cased TinyStories) writes with a capital letter in at least 90% of its
mid-sentence uses, and uses at least 5 times mid-sentence: Lily, Tom, Max, Mom, Spot, ... ("I" is left out). The
same list serves two jobs:

- `name_consistency(samples, names)`: of all name mentions in the samples, the share that repeat a name already
  mentioned earlier in the same sample. A story that keeps to its characters scores high ("Lily ... Lily ... her
  mom ... Lily"); one that keeps introducing new ones scores low ("Bob ... Tim ... Tom ... Sam"). It does not see
  pronouns, or whether the repeated name plays the same part, and a sample that names no one does not count.
- `recase(text, names)`: capitalises a lowercased story by rule: the first letter of each sentence, the pronoun
  "i" (also in "i'm", "i'll"), and every word of `names`. Used for `train-extra-lowercase.txt`:

    python -m training.names recase ../shared/data/tinystories/train-extra-lowercase.txt runs/data/extra.txt \
        --names_from ../shared/data/tinystories/train.txt
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from training.data import DOC_SEPARATOR, read_documents

# Words (with inner apostrophes), the punctuation that ends a sentence, and quotation marks.
TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|[.!?]|[\"“”]")
SENTENCE_END = frozenset(".!?")
QUOTES = frozenset('"“”')
# After `"Wow!"` a sentence goes on when a speech tag follows: `"Wow!" said Tom.`, `"Wow!" she said.`
SPEECH_VERBS = frozenset("said asked replied shouted cried yelled whispered exclaimed answered called laughed".split())
PRONOUNS = frozenset("he she they it we you".split())


def key(word: str) -> str:
    """The lowercased word without its clitic: "Anna's" -> "anna", "I'm" -> "i"."""
    return word.partition("'")[0].lower()


def words(text: str) -> list[tuple[re.Match, bool]]:
    """Each word of `text` with whether it starts a sentence: at the start, after . ! ?, and at the start of quoted
    speech; but not a speech tag after a quotation that ended with . ! ? (`"Wow!" said Tom`)."""
    tokens = list(TOKEN.finditer(text))
    out, initial, quote_ended = [], True, False
    for i, match in enumerate(tokens):
        token = match.group()
        if token in SENTENCE_END:
            initial, quote_ended = True, False
        elif token in QUOTES:
            opening = match.start() == 0 or text[match.start() - 1].isspace()
            if opening:
                initial, quote_ended = True, False
            else:
                quote_ended = initial  # a closing quote right after . ! ?
        else:
            if quote_ended:
                following = next((t.group() for t in tokens[i + 1 : i + 2]), "")
                tag = key(token) in SPEECH_VERBS or (key(token) in PRONOUNS and key(following) in SPEECH_VERBS)
                initial = initial and not tag
            out.append((match, initial))
            initial = quote_ended = False
    return out


def proper_nouns(texts: Iterable[str], min_count: int = 5, capitalised_share: float = 0.9) -> frozenset[str]:
    """The lowercased words that `texts` capitalise mid-sentence in at least `capitalised_share` of `min_count` or
    more mid-sentence uses."""
    uses, capitalised = Counter(), Counter()
    for text in texts:
        for match, initial in words(text):
            if not initial:
                word = match.group()
                uses[key(word)] += 1
                capitalised[key(word)] += word[0].isupper()
    return frozenset(
        w for w, n in uses.items() if n >= min_count and capitalised[w] >= capitalised_share * n and w != "i"
    )


def name_mentions(text: str, names: frozenset[str]) -> list[str]:
    """The names mentioned in `text`, in order (a capitalised word of `names`, at any position)."""
    return [key(m.group()) for m, _ in words(text) if m.group()[0].isupper() and key(m.group()) in names]


def name_consistency(samples: Iterable[str], names: frozenset[str]) -> dict:
    """The share of name mentions, pooled over `samples`, that repeat a name used earlier in the same sample."""
    count = mentions = distinct = 0
    for sample in samples:
        found = name_mentions(sample, names)
        count, mentions, distinct = count + 1, mentions + len(found), distinct + len(set(found))
    return {
        "name_consistency": (mentions - distinct) / mentions if mentions else float("nan"),
        "name_mentions_per_sample": mentions / max(1, count),
        "distinct_names_per_sample": distinct / max(1, count),
    }


def recase(text: str, names: frozenset[str]) -> str:
    """`text` with sentence starts, the pronoun "i" and the words of `names` capitalised. Documents separated by
    `<|endoftext|>` are re-cased one by one (the separator stays as it is)."""
    if DOC_SEPARATOR in text:
        return DOC_SEPARATOR.join(recase(part, names) for part in text.split(DOC_SEPARATOR))
    chars = list(text)
    for match, initial in words(text):
        if initial or key(match.group()) in names or key(match.group()) == "i":
            chars[match.start()] = chars[match.start()].upper()
    return "".join(chars)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.names", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recase_cmd = commands.add_parser("recase", help="re-case a lowercased .txt file by the rule above")
    recase_cmd.add_argument("input")
    recase_cmd.add_argument("output")
    recase_cmd.add_argument("--names_from", required=True, help="cased text the names are learnt from")
    args = parser.parse_args(argv)
    names = proper_nouns(read_documents(args.names_from))
    text = Path(args.input).read_text(encoding="utf-8")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(recase(text, names), encoding="utf-8")
    print(f"{args.output}: re-cased with {len(names)} names from {args.names_from}")


if __name__ == "__main__":
    main()

"""Write the documents of a text file as JSONL ({"text": ...} per line), e.g. for lm-evaluation-harness tasks.

python -m training.export_jsonl ../shared/data/tinystories/valid.txt lm_eval_tasks/tinystories_valid.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from training.data import read_documents


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    docs = read_documents(argv[0])
    Path(argv[1]).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} documents to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

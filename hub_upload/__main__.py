"""Command line: `python -m hub_upload <model-folder> <repo-id> [options]`; see `python -m hub_upload --help`.

The token comes from huggingface_hub's usual places (HF_TOKEN, then the `hf auth login` cache) and the Hub from
HF_ENDPOINT: neither is a flag, so neither ends up in shell history.
"""

from __future__ import annotations

import argparse
import sys

from .card import DEFAULT_LICENSE
from .push import HubUploadError, push_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hub_upload", description=__doc__.split("\n")[0])
    parser.add_argument(
        "model_folder", help="a model folder written by training.pretrain / finetune (or, with --format, the export)"
    )
    parser.add_argument("repo_id", help="namespace/name of the Hub model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private (new repos only)")
    parser.add_argument("--revision", "--branch", dest="revision", help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message", help="default: 'Upload <folder> with hub_upload'")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="license of the weights (Hub id)")
    parser.add_argument(
        "--format",
        choices=("itera", "gguf", "granite"),
        default="itera",
        help="itera (default): the model folder; gguf: a .gguf file; granite: a GraniteMoeHybrid folder "
        "(both from python -m modeling_itera.export), each pushed as its own repository with its card",
    )
    parser.add_argument("--dry-run", action="store_true", help="only write the repository folder; contact nothing")
    parser.add_argument("--output-dir", help="folder the dry run writes (default: <model_folder>-hub)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.format != "itera":
        return push_export(args)
    try:
        result = push_model(
            args.model_folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
            dry_run=args.dry_run,
            output_dir=args.output_dir,
            license=args.license,
        )
    except (HubUploadError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"hub_upload: error: {err}", file=sys.stderr)
        return 1
    if result.folder is not None:
        print(f"wrote {len(result.files)} files to {result.folder} (dry run: nothing was pushed)")
    elif not result.changed:
        print(f"{result.repo_id} is up to date: no commit made (head {result.commit_oid})")
    else:
        print(f"pushed {len(result.files)} files to {result.repo_id}: {result.pr_url or result.commit_url}")
    return 0


def push_export(args: argparse.Namespace) -> int:
    from .engines import push_engine_format

    if args.dry_run or args.create_pr:
        print("hub_upload: error: --dry-run and --create-pr are for model folders only", file=sys.stderr)
        return 1
    try:
        result = push_engine_format(
            args.model_folder,
            args.repo_id,
            args.format,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            license=args.license,
        )
    except (HubUploadError, FileNotFoundError, ValueError) as err:
        print(f"hub_upload: error: {err}", file=sys.stderr)
        return 1
    state = f"pushed {len(result.files)} files to" if result.changed else "no change: nothing committed to"
    print(f"{state} {result.repo_id} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

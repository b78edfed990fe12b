"""Assemble the Hub repository in a temporary folder and push it in one commit, or write it locally (dry run).

Idempotence comes from the Hub itself: `preupload` returns each remote file's blob id and `create_commit` drops the
files whose content is unchanged; when nothing is left it makes no commit at all and returns the current head.
Retries: huggingface_hub retries `preupload` and downloads on 5xx/429 and network errors (`http_backoff`, 5 tries),
but not `create_repo`, `create_branch`, `repo_info` or the commit POST itself; those get a small bounded retry
here. Retrying a commit is safe because each attempt re-runs `preupload`: a commit that landed although its answer
was lost makes the next attempt a no-op. Pull requests are the exception (a retry would open a second one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2  # huggingface_hub's HTTP client; its transport errors are what "no network" raises
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers.utils import logging

from .card import DEFAULT_LICENSE, build_model_card
from .folder import files_to_ship, write_repo

logger = logging.get_logger(__name__)
T = TypeVar("T")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}  # the codes huggingface_hub's own http_backoff retries
CLIENT_TRIES = 6  # http_backoff: the first try and 5 retries


class HubUploadError(RuntimeError):
    """A push that failed; the message names the cause (network, authentication, permission, server)."""


@dataclass
class PushResult:
    """What a push did. `changed` is False when the repository already held exactly these files (no commit made)."""

    repo_id: str
    files: list[str]
    folder: Path | None = None  # the written folder (dry run only)
    commit_oid: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    changed: bool = True


def explain(err: Exception, endpoint: str, repo_id: str, attempts: int = 1) -> HubUploadError:
    """A `HubUploadError` whose message says what went wrong, for a person, not a traceback."""
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(err, OfflineModeIsEnabled):
        return HubUploadError(f"offline mode is on (HF_HUB_OFFLINE=1): cannot push to {endpoint}; unset it to push")
    if isinstance(err, httpx2.TransportError):
        return HubUploadError(
            f"network error: could not reach the Hub at {endpoint}{tries} ({type(err).__name__}: {err}); "
            "check the connection, a proxy, or HF_ENDPOINT"
        )
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    detail = f" Server said: {err.server_message.strip()}" if getattr(err, "server_message", None) else ""
    if status == 401:
        return HubUploadError(
            f"authentication failed (HTTP 401) at {endpoint}: the token is missing, invalid or expired. "
            f"Set HF_TOKEN or run `hf auth login` with a write token.{detail}"
        )
    if status == 403:
        return HubUploadError(
            f"permission denied (HTTP 403): the token may not write to {repo_id!r}. Use a token with write access "
            f"to that namespace (fine-grained tokens need 'write' on it).{detail}"
        )
    if status == 429:
        return HubUploadError(f"rate limited by the Hub (HTTP 429){tries}; wait and push again.{detail}")
    if status in TRANSIENT_STATUS or status is not None and status >= 500:
        return HubUploadError(
            f"the Hub server failed (HTTP {status}){tries}; nothing was committed. Try again later.{detail}"
        )
    if status is not None:
        return HubUploadError(f"the Hub refused the upload to {repo_id!r} (HTTP {status}).{detail}")
    return HubUploadError(f"push to {repo_id!r} failed: {type(err).__name__}: {err}")


def is_transient(err: Exception) -> bool:
    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return err.response.status_code in TRANSIENT_STATUS
    return isinstance(err, httpx2.TransportError)


def with_retries(call: Callable[[], T], *, attempts: int, wait: float, endpoint: str, repo_id: str) -> T:
    """Runs `call`, again after transient failures (up to `attempts` in all, waits doubling from `wait` s)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled) as err:
            if attempt == attempts or not is_transient(err):
                raise explain(err, endpoint, repo_id, attempt) from err
            logger.warning(f"push to {repo_id}: {type(err).__name__} ({err}); retry {attempt}/{attempts - 1}")
            time.sleep(wait * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def write_folder(model_folder: Path, repo_id: str, output_dir: Path, license: str) -> list[str]:
    """Writes the repository into `output_dir` all at once: built in a sibling temp folder, then renamed."""
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists; remove it or choose another --output-dir")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        names = write_repo(model_folder, staging, build_model_card(model_folder, repo_id, license=license))
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def commit_folder(api: HfApi, folder: Path, names: list[str], repo_id: str, **commit_kwargs):
    """One commit attempt, with fresh operations so that the preupload re-reads the remote blob ids.

    The preupload is retried inside huggingface_hub already; its failure is final here (a `HubUploadError`, which
    `with_retries` lets through), so a Hub outage does not multiply the client's retries by ours.
    """
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in names]
    preupload = {k: commit_kwargs[k] for k in ("revision", "create_pr")}
    try:
        api.preupload_lfs_files(repo_id, operations, free_memory=False, **preupload)
    except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled) as err:
        raise explain(err, api.endpoint, repo_id, attempts=CLIENT_TRIES) from err
    return api.create_commit(repo_id, operations, **commit_kwargs)


def head(api: HfApi, repo_id: str, revision: str) -> str | None:
    return api.repo_info(repo_id, revision=revision).sha


def push_model(
    model_folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    output_dir: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
    token: str | None = None,
    endpoint: str | None = None,
    attempts: int = 3,
    retry_wait: float = 2.0,
) -> PushResult:
    """Pushes `model_folder` (a `training.pretrain` output) as a complete Hub repository `repo_id`.

    Args:
        model_folder: model + tokenizer + generation config (+ metrics.json for the card's evaluation).
        repo_id: "namespace/name"; created if missing (`private` applies only then; an existing repository's
            visibility is never changed).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: default "Upload <folder name> with hub_upload".
        create_pr: open a pull request instead of committing to the branch.
        dry_run: write the repository to `output_dir` (default `<model_folder>-hub`) and contact nothing.
        token: default: huggingface_hub's resolution (HF_TOKEN, then the `hf auth login` cache).
        endpoint: default: HF_ENDPOINT or https://huggingface.co.
        attempts, retry_wait: the bounded retry of the calls huggingface_hub does not retry itself.

    Returns:
        A `PushResult`; `changed=False` when the remote already held these exact files (no commit was made).

    Raises:
        HubUploadError: the push failed; the message names the cause. FileNotFoundError / ValueError: the folder
            is not a complete Itera-Lite model (checked before any network access).
    """
    folder = Path(model_folder).resolve()  # "." or "run/" still give a name for the default output and message
    if dry_run:
        output = Path(output_dir) if output_dir else folder.with_name(folder.name + "-hub")
        names = write_folder(folder, repo_id, output, license)
        return PushResult(repo_id=repo_id, files=names, folder=output)
    files_to_ship(folder)  # fail on an incomplete folder before touching the network
    api = HfApi(endpoint=endpoint, token=token)
    retry = dict(attempts=attempts, wait=retry_wait, endpoint=api.endpoint, repo_id=repo_id)
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="hub_upload-") as tmp:
        names = write_repo(folder, tmp, build_model_card(folder, repo_id, license=license))
        # private=None, not False: without --private, a new repo follows its organization's default visibility.
        with_retries(lambda: api.create_repo(repo_id, private=private or None, exist_ok=True), **retry)
        if branch != "main":
            with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), **retry)
        before = with_retries(lambda: head(api, repo_id, branch), **retry)
        message = commit_message or f"Upload {folder.name} with hub_upload"
        # Each retry of a PR commit would open another PR: only one attempt then.
        commit_retry = {**retry, "attempts": 1} if create_pr else retry
        info = with_retries(
            lambda: commit_folder(
                api, Path(tmp), names, repo_id, commit_message=message, revision=branch, create_pr=create_pr
            ),
            **commit_retry,
        )
    changed = info.pr_url is not None or info.oid != before
    if not changed:
        logger.info(f"{repo_id}@{branch} already holds these files: no commit was made")
    return PushResult(
        repo_id=repo_id,
        files=names,
        commit_oid=info.oid,
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        changed=changed,
    )

"""Publish a trained output folder to the Hugging Face Hub (or a Hub-compatible server), or to a git remote.

Only what a user of the model needs is published: safetensors weights, configs, tokenizer/processor
files, adapter files, the model card, eval reports and plots. Training state (checkpoints, optimizer,
RNG states, tensorboard events) stays local unless asked for; pickle weights are never published.
Only a finished run is published (run_summary.json, written last by the trainer), unless forced; a
checkpoint or an evaluation report folder never is. The remote ends up holding exactly the published
files: what an earlier publish left there and this one does not include is deleted in the same commit.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.config import check_git_remote
from pipelines.errors import UserError
from pipelines.output_folder import FINISHED_MARKER  # imports no torch: a refusal is said at once

logger = logging.getLogger(__name__)

HUB_ENDPOINTS = ("https://huggingface.co", "https://hub-ci.huggingface.co")  # the ones that speak Xet
LFS_SIZE = 10 * 1024 * 1024  # the Hub sends files of 10 MB and more to LFS

# fnmatch patterns (as upload_folder applies them: "*" also matches "/").
MODEL_FILES = [
    "*.safetensors", "*.safetensors.index.json",
    "*config.json",  # config, generation_config, tokenizer/preprocessor/processor/adapter/run configs
    "*tokenizer.json", "*special_tokens_map.json", "*added_tokens.json", "*vocab.txt", "*vocab.json",
    "*merges.txt", "*.model", "*.spm", "*.tiktoken", "*chat_template.jinja", "*chat_template.json",
    "*normalizer.json",  # Whisper's English spelling map (tokenizer file)
    "README.md", "*eval_report.json", "*eval_report.md", "*.png",
    "example.*",  # the input the card's how-to snippet runs on (Recipe.example_file: example.png, .wav, .txt, ...)
]
TRAINING_STATE = [
    "checkpoints/*", "*/checkpoints/*", "checkpoint-*", "*/checkpoint-*", "runs/*", "*tfevents*",
    "*optimizer*", "*scheduler.bin", "*scheduler.pt", "*random_states*", "*rng_state*", "*training_args.bin",
]
# Partial writes (.tmp*) and caches are never useful to anyone downloading the model.
# ... and the bookkeeping of a run in progress (pipelines/output_folder.py INTERNAL): a staged run, the swap, the lock.
ALWAYS_IGNORED = [".tmp*", "*/.tmp*", ".git/*", "*/.git/*", ".cache/*", "*/.cache/*", ".next-run/*", ".old-final/*",
                  ".swap.json*", ".run.lock*"]
PICKLE_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
# Git route: the Hub's default .gitattributes LFS patterns, plus images (the Hub refuses binaries in git).
GIT_LFS_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
    "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz",
    "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp",
    "*.wav", "*.flac", "*.mp3", "*.ogg",
]
HUB_GIT_HOSTS = ("huggingface.co", "hf.co")  # git remotes that are Hub repositories


def _patterns(include_checkpoints: bool) -> tuple[list[str], list[str]]:
    if include_checkpoints:
        return MODEL_FILES + TRAINING_STATE, ALWAYS_IGNORED
    return MODEL_FILES, TRAINING_STATE + ALWAYS_IGNORED


def select_files(folder: str | os.PathLike, include_checkpoints: bool = False) -> list[str]:
    """The relative paths that would be published, exactly as upload_folder selects them."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"output folder not found: {root}")
    every = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    allow, ignore = _patterns(include_checkpoints)
    chosen = list(filter_repo_objects(every, allow_patterns=allow, ignore_patterns=ignore))
    pickles = list(filter_repo_objects(every, allow_patterns=PICKLE_WEIGHTS, ignore_patterns=TRAINING_STATE + ALWAYS_IGNORED))
    if pickles and not any(p.endswith(".safetensors") for p in chosen):
        # Publishing would give a repo without usable weights, or pickles that run code when loaded.
        raise UserError(f"refusing to publish pickle weights ({', '.join(pickles)}) from {root}: "
                        "save the model with safetensors (save_pretrained does by default) and publish again")
    if pickles:
        logger.warning("not publishing pickle files %s (the safetensors weights are published)", pickles)
    base = root.resolve()
    for rel in chosen:  # a symbolic link would publish whatever it points at (a token file, /etc/...)
        target = (root / rel).resolve()
        if not target.is_relative_to(base):
            raise UserError(f"refusing to publish {rel}: it leads to {target}, outside {root} (a symbolic link?); "
                            "copy the file into the folder if it belongs to the model")
    if not chosen:
        raise UserError(f"nothing to publish in {root}: no model, tokenizer, card or report files found")
    return chosen


def check_finished_run(folder, allow_unfinished: bool = False) -> None:
    """Refuse, before any request, a folder that is not a finished run's output folder.

    A finished run holds run_summary.json (the trainer writes it last). A checkpoint (trainer state for
    --resume, not a loadable model) and a report folder of scripts/evaluate_model.py (no model at all) are
    always refused; another unfinished folder (a killed run) only unless `allow_unfinished`, and then
    only if it holds model weights.
    """
    from pipelines.checkpoints import STATE_FILE

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"output folder not found: {root}")
    if (root / FINISHED_MARKER).is_file():
        return
    has_weights = any(root.glob("*.safetensors"))
    here = root.resolve()
    in_checkpoints = here.parent.name == "checkpoints"  # OUTPUT_DIR/checkpoints/step-N (pipelines/checkpoints.py)
    if (root / STATE_FILE).is_file() or (in_checkpoints and re.fullmatch(r"(\.tmp-)?step-\d+", here.name)):
        run_dir = here.parent.parent if in_checkpoints else None
        if run_dir is not None and (run_dir / FINISHED_MARKER).is_file():
            todo = f"publish the run's output folder {run_dir} instead"
        else:
            todo = (f"finish the run with `python scripts/run.py <its options> --output-dir {run_dir or 'OUTPUT_DIR'} "
                    f"--resume`, then publish the run's output folder{f' {run_dir}' if run_dir else ''}")
        raise UserError(f"refusing to publish {root}: it is a training checkpoint (state for --resume, not a "
                        f"loadable model) and has no {FINISHED_MARKER}; {todo}")
    if (root / "eval_report.json").is_file() and not has_weights:
        raise UserError(f"refusing to publish {root}: it is an evaluation report folder (eval_report.json and plots "
                        "from scripts/evaluate_model.py), not a model; publish the output folder of the run that trained "
                        "the model")
    if not allow_unfinished:
        lacks = FINISHED_MARKER + ("" if has_weights else " and no model weights (*.safetensors)")
        raise UserError(f"refusing to publish {root}: it is not a finished run, it has no {lacks} (the trainer writes "
                        f"{FINISHED_MARKER} last: the run was stopped or is still running); finish it with "
                        f"`python scripts/run.py <its options> --output-dir {root} --resume`, "
                        "or pass --allow-unfinished to publish it as it is")
    if not has_weights:
        raise UserError(f"refusing to publish {root}: it holds no model weights (*.safetensors), so there is no "
                        "model to publish even with --allow-unfinished; publish a run's output folder")
    logger.warning("warning: publishing %s although it is not a finished run (no %s): its model may be "
                   "half-trained and its card and reports missing or from an earlier run", root, FINISHED_MARKER)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def _is_transport_error(err: BaseException) -> bool:
    # httpx/httpx2 transport errors (connection refused, DNS, timeouts) are not OSErrors.
    return any(c.__name__ == "TransportError" for c in type(err).__mro__)


def _failure(what: str, endpoint: str, err: Exception) -> UserError:
    """A one-line message naming the step, the endpoint and the cause (never the token)."""
    from huggingface_hub.errors import HfHubHTTPError

    # huggingface_hub wraps some failures (e.g. an LFS PUT) in a RuntimeError: use the root cause.
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, HfHubHTTPError):
        cause = cause.__cause__
    if isinstance(cause, (HfHubHTTPError, ConnectionError, TimeoutError)) or _is_transport_error(cause):
        err = cause
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        detail = err.server_message or err.response.reason_phrase
        hint = " (check HF_TOKEN or `hf auth login`)" if err.response.status_code in (401, 403) else ""
        return UserError(f"{what} failed: HTTP {err.response.status_code} from {endpoint}: {_one_line(detail)}{hint}")
    if isinstance(err, (ConnectionError, TimeoutError)) or _is_transport_error(err):
        return UserError(f"{what} failed: could not reach {endpoint} ({type(err).__name__}: {_one_line(err)})")
    return UserError(f"{what} failed at {endpoint}: {type(err).__name__}: {_one_line(err)}")


@contextlib.contextmanager
def _hub_settings(endpoint: str):
    """Switch off, for this call only, two settings huggingface_hub reads from the environment at import.

    - Xet: the client uploads through Xet whenever hf_xet is importable and never falls back, so any
      endpoint but the real Hub needs it off. `is_xet_available()` reads constants.HF_HUB_DISABLE_XET
      at call time, so setting the constant works even if huggingface_hub was imported long ago
      (setting os.environ would not).
    - Offline mode: HF_HUB_OFFLINE=1 makes every request raise. It exists to stop *implicit* downloads;
      publishing is an explicit request to use the network, so we honour the request and lift it here.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE
    if constants.HF_HUB_OFFLINE:
        logger.info("HF_HUB_OFFLINE is set; publishing anyway since publishing was asked for")
        # Headers of the first request name the calling agent from a registry fetched from
        # huggingface.co: resolve it now, while still offline, so that only `endpoint` is contacted.
        with contextlib.suppress(Exception):
            from huggingface_hub.utils import detect_agent

            detect_agent()
    constants.HF_HUB_OFFLINE = False
    if endpoint not in HUB_ENDPOINTS:
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = saved


def _card(folder, **target) -> str | None:
    """The run's card rendered for the publishing target (pipelines/cards.py card_for), or None."""
    from pipelines.cards import card_for

    try:
        return card_for(folder, **target)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken run file: one line naming the folder
        raise UserError(f"could not render the model card of {folder} for publishing: "
                        f"{type(e).__name__}: {_one_line(e)}") from None


@contextlib.contextmanager
def _staged(folder, files: list[str], readme: str | None):
    """(folder, files) to upload: `folder` itself when its README.md is already `readme` (or there is no
    card to change), else a temporary copy with that README.md. The copy hard-links the other files
    where it can (no second copy of the weights) and writes README.md as a new file, so the user's
    folder is never written to."""
    current = Path(folder) / "README.md"
    if readme is None or (current.is_file() and current.read_bytes() == readme.encode("utf-8")):
        yield Path(folder), files
        return
    with tempfile.TemporaryDirectory(prefix="publish-stage-") as stage:
        for rel in files:
            if rel == "README.md":
                continue
            target = Path(stage) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(folder) / rel, target)
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(Path(folder) / rel, target)
        (Path(stage) / "README.md").write_bytes(readme.encode("utf-8"))
        yield Path(stage), sorted({*files, "README.md"})


def _remove_branch(api, repo_id: str, branch: str) -> str:
    """Delete a branch this publish created, after its upload failed; say what happened to it."""
    try:
        api.delete_branch(repo_id, branch=branch)
    except Exception as e:  # noqa: BLE001 - the upload error is the one to report; say the branch stayed
        return f"the new branch {branch} could not be removed ({type(e).__name__}: {_one_line(e)[:120]})"
    return f"the new branch {branch} was removed"


def publish_to_hub(folder, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
                   private: bool = False, revision: str | None = None, commit_message: str | None = None,
                   include_checkpoints: bool = False, allow_unfinished: bool = False) -> str:
    """Upload the publishable files of `folder` to `repo_id` in one commit; return the commit URL.

    The branch then holds exactly these files (and .gitattributes): files an earlier publish left there
    are deleted in the same commit. Only a finished run is published (see check_finished_run).

    The return value is huggingface_hub's CommitInfo, a str (the URL) whose `.oid` is the commit sha.
    Publishing an unchanged folder makes no commit and returns the current head. A run's card is
    rendered for `repo_id` (its snippet names the repo, not the local folder) in a staging copy.
    A failed upload leaves the remote as it was: no commit, and a branch created for it is deleted.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)  # before any request: a typo must not create a stray repo
    except HFValidationError as e:
        raise UserError(f"invalid repo id {repo_id!r}: {_one_line(e)}") from None
    check_finished_run(folder, allow_unfinished)
    files = select_files(folder, include_checkpoints)
    readme = _card(folder, repo_id=repo_id, revision=revision)
    # HF_ENDPOINT is read at call time too, in case it was set after huggingface_hub was imported.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc:
        raise UserError(f"invalid hub endpoint {endpoint!r}: expected http(s)://host[:port]")
    allow, ignore = _patterns(include_checkpoints)
    api = HfApi(endpoint=endpoint, token=token)  # token=None: huggingface_hub uses HF_TOKEN or the saved login
    with _hub_settings(endpoint), _staged(folder, files, readme) as (source, files):
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except Exception as e:
            raise _failure(f"creating repository {repo_id}", endpoint, e) from None
        new_branch = False
        if revision and revision != "main":
            try:
                api.create_branch(repo_id, branch=revision)
                new_branch = True
            except HfHubHTTPError as e:
                if e.response is None or e.response.status_code != 409:  # 409: it exists already
                    raise _failure(f"creating branch {revision} of {repo_id}", endpoint, e) from None
            except Exception as e:
                raise _failure(f"creating branch {revision} of {repo_id}", endpoint, e) from None
        try:
            logger.info("publishing %d files from %s to %s/%s", len(files), folder, endpoint, repo_id)
            # One commit (Xet off, or small folders with Xet): the remote shows all of it or none of it.
            # Unchanged files are dropped by the client, so re-publishing makes no (empty) commit.
            # delete_patterns="*": remote files of `revision` (only) that this publish does not include (a removed
            # plot, an earlier --include-checkpoints) are deleted in the same commit; .gitattributes is kept.
            info = api.upload_folder(folder_path=str(source), repo_id=repo_id, revision=revision,
                                     commit_message=commit_message or "Publish model", allow_patterns=allow,
                                     ignore_patterns=list(ignore), delete_patterns="*")
        except Exception as e:
            failure = _failure(f"uploading {folder} to {repo_id}", endpoint, e)
            if new_branch:
                failure = UserError(f"{failure}; {_remove_branch(api, repo_id, revision)}")
            raise failure from None
    logger.info("published: %s", info)
    return info


def _git(*args: str, cwd: str | None = None, env: dict | None = None) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError(f"git {args[0]} did not finish in 10 minutes") from None
    if done.returncode != 0:
        raise UserError(f"git {args[0]} failed: {_one_line(done.stderr.strip() or '(no output)')}")
    return done.stdout.strip()


def _write_gitattributes(work: Path, files: list[str]) -> None:
    """Keep the remote's .gitattributes lines and add the Hub's LFS patterns plus one line per large file."""
    path = work / ".gitattributes"
    lines = path.read_text().splitlines() if path.exists() else []
    wanted = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in GIT_LFS_PATTERNS]
    wanted += [f"{rel.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text"
               for rel in files if (work / rel).stat().st_size >= LFS_SIZE
               and not any(fnmatch.fnmatch(Path(rel).name, p) for p in GIT_LFS_PATTERNS)]
    lines += [line for line in wanted if line not in lines]
    path.write_text("\n".join(lines) + "\n")


def git_card_target(url: str) -> tuple[str | None, str]:
    """For the card of a git-published model: its Hub repo id when the remote is a Hub repository
    (https://huggingface.co/NS/NAME, git@hf.co:NS/NAME), else None; and the folder `git clone URL` makes."""
    parts = urlsplit(url)
    host, path = parts.hostname, parts.path
    if not parts.scheme and re.match(r"^[\w.-]+@[\w.-]+:", url):  # scp-like syntax: user@host:path
        host, path = url.split("@", 1)[1].split(":", 1)
    path = path.strip("/")
    path = path[:-len(".git")] if path.endswith(".git") else path
    clone_dir = path.rsplit("/", 1)[-1] or "model"
    return (path if host in HUB_GIT_HOSTS and path.count("/") == 1 else None), clone_dir


def publish_to_git(folder, url: str, *, branch: str = "main", commit_message: str | None = None,
                   include_checkpoints: bool = False, allow_unfinished: bool = False) -> str:
    """Commit the publishable files of `folder` to `branch` of a git remote (large files via LFS); return the sha.

    The branch then holds exactly these files (and .gitattributes): files an earlier publish left there
    are deleted in the same commit; other branches are never touched. Only a finished run is published
    (see check_finished_run). A run's card is rendered for the remote: its snippet loads the Hub repo
    for a Hub remote, else the clone's folder."""
    check_finished_run(folder, allow_unfinished)
    files = select_files(folder, include_checkpoints)
    check_git_remote(url)
    repo_id, clone_dir = git_card_target(url)
    readme = _card(folder, repo_id=repo_id, revision=branch, local_ref=clone_dir, clone_url=url)
    # Never prompt for a password (it would hang a batch job); skip LFS downloads of files we overwrite anyway;
    # paths given to add/rm are file names, not patterns (a plot named "[1].png").
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1", "GIT_LITERAL_PATHSPECS": "1"}
    with tempfile.TemporaryDirectory(prefix="publish-git-") as work:
        if _git("ls-remote", "--heads", url, branch, env=env):
            _git("clone", "--quiet", "--branch", branch, "--single-branch", url, work, env=env)
        else:
            _git("init", "--quiet", "-b", branch, work, env=env)
            _git("remote", "add", "origin", url, cwd=work, env=env)
        _git("lfs", "install", "--local", cwd=work, env=env)
        for rel in files:
            (Path(work) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder) / rel, Path(work) / rel)
        if readme is not None:  # the card for this remote, in the work tree only
            (Path(work) / "README.md").write_bytes(readme.encode("utf-8"))
            files = sorted({*files, "README.md"})
        # Files of an earlier publish that this one does not include (a removed plot, old checkpoints) go.
        keep = {*files, ".gitattributes"}
        stale = [p for p in _git("ls-files", "-z", cwd=work, env=env).split("\0") if p and p not in keep]
        if stale:
            _git("rm", "--quiet", "--", *stale, cwd=work, env=env)
        _write_gitattributes(Path(work), files)
        if subprocess.run(["git", "config", "user.email"], cwd=work, env=env, capture_output=True).returncode:
            # No identity configured (CI, containers): commit as the tool rather than fail.
            _git("config", "user.name", "finetune-pipelines", cwd=work, env=env)
            _git("config", "user.email", "finetune-pipelines@localhost", cwd=work, env=env)
        _git("add", "--", ".gitattributes", *files, cwd=work, env=env)
        if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=work, env=env).returncode == 0:
            logger.info("nothing changed: %s %s is already up to date", url, branch)
            return _git("rev-parse", "HEAD", cwd=work, env=env)
        _git("commit", "--quiet", "-m", commit_message or "Publish model", cwd=work, env=env)
        _git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=work, env=env)
        return _git("rev-parse", "HEAD", cwd=work, env=env)

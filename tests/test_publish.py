"""Publishing a trained output folder, against a real local Hub-compatible HTTP server and a real git remote.

The suite runs with HF_HUB_OFFLINE=1. Publishing must still work (it is an explicit request to use the
network, see pipelines/publish.py); downloads here lift offline mode with monkeypatch on
huggingface_hub.constants and pass `endpoint=` explicitly, since both settings are read at import time.
"""

from __future__ import annotations

import filecmp
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub  # noqa: E402

from pipelines.errors import UserError  # noqa: E402
from pipelines.publish import publish_to_git, publish_to_hub, select_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "publish.py"
PUBLISHED = {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "eval_report.json", "loss.png", "run_config.json"}
WORDS = "the a movie film was is good great bad awful i liked hated it plot acting".split()
CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-classification
tags:
- text-classification
---
# tiny-bert-sentiment

A two-layer BERT fine-tuned for tests.
"""


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """A real training output folder: tiny BERT + tokenizer, card, report, plot, and training state."""
    import torch
    from PIL import Image
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out = tmp_path_factory.mktemp("output")
    vocab = out.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(CARD)
    (out / "eval_report.json").write_text(json.dumps({"accuracy": 0.5, "f1": 0.4}))
    (out / "run_config.json").write_text(json.dumps({"strategy": "full", "epochs": 1}))
    (out / "run_summary.json").write_text(json.dumps({"global_step": 1}))  # a finished run (not published itself)
    Image.new("RGB", (16, 8), (200, 30, 30)).save(out / "loss.png")
    state = out / "checkpoints" / "step-1"
    state.mkdir(parents=True)
    torch.save({"state": {}, "param_groups": []}, state / "optimizer.bin")
    (state / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.1.host").write_bytes(b"\0event")
    (out / ".tmp-save").mkdir()
    (out / ".tmp-save" / "model.safetensors").write_bytes(b"partial")
    return out


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture
def online(monkeypatch):
    """Let this test process download from the local hub (the suite runs with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _remote_files(hub: LocalHub, repo_id: str) -> set[str]:
    from huggingface_hub import HfApi, constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        return set(HfApi(endpoint=hub.url).list_repo_files(repo_id))
    finally:
        constants.HF_HUB_OFFLINE = saved


def _cli(*args: str, env_extra: dict | None = None, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), **(env_extra or {})})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_selection_keeps_training_state_local(output_dir):
    assert set(select_files(output_dir)) == PUBLISHED
    with_state = set(select_files(output_dir, include_checkpoints=True))
    assert with_state - PUBLISHED == {"checkpoints/step-1/optimizer.bin", "checkpoints/step-1/random_states_0.pkl",
                                      "runs/events.out.tfevents.1.host"}  # .tmp* never


def test_publish_then_download_roundtrip(output_dir, hub, online, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
    from transformers import AutoModelForSequenceClassification, pipeline

    # As a user with offline mode on and hf_xet installed: publishing must lift one and disable the other.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    commit = publish_to_hub(output_dir, "me/tiny-bert", endpoint=hub.url)
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET) == (True, False)  # restored
    assert commit.oid == hub.head("me/tiny-bert") and commit.startswith(hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    info = HfApi(endpoint=hub.url).model_info("me/tiny-bert")
    assert {s.rfilename for s in info.siblings} == PUBLISHED | {".gitattributes"}
    lfs = {f.path for f in HfApi(endpoint=hub.url).list_repo_tree("me/tiny-bert", recursive=True)
           if getattr(f, "lfs", None)}
    assert {"model.safetensors", "loss.png"} <= lfs
    local = Path(snapshot_download("me/tiny-bert", endpoint=hub.url, local_dir=tmp_path / "dl"))
    for name in PUBLISHED:
        assert filecmp.cmp(output_dir / name, local / name, shallow=False), name
    assert not (local / "checkpoints").exists() and not (local / "runs").exists()

    model = AutoModelForSequenceClassification.from_pretrained(local)
    assert model.config.num_labels == 2
    result = pipeline("text-classification", model=str(local))("the movie was good")
    assert result[0]["label"] in {"NEGATIVE", "POSITIVE"}
    card = ModelCard.load(local / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-classification"


def test_republish_makes_no_commit(output_dir, hub):
    first = publish_to_hub(output_dir, "me/tiny-bert", endpoint=hub.url)
    files = _remote_files(hub, "me/tiny-bert")
    commits = len(hub.repos[("model", "me/tiny-bert")].commits)
    seen = len(hub.requests)
    again = publish_to_hub(output_dir, "me/tiny-bert", endpoint=hub.url)
    assert again.oid == first.oid == hub.head("me/tiny-bert")
    assert len(hub.repos[("model", "me/tiny-bert")].commits) == commits
    assert _remote_files(hub, "me/tiny-bert") == files
    assert not [r for r in hub.requests[seen:] if r[0] == "PUT" or "/commit/" in r[1]]  # nothing uploaded


def test_publish_to_a_branch_leaves_main_alone(output_dir, hub):
    commit = publish_to_hub(output_dir, "me/tiny-bert", endpoint=hub.url, revision="candidate",
                            commit_message="Candidate model")
    repo = hub.repos[("model", "me/tiny-bert")]
    assert hub.head("me/tiny-bert", "candidate") == commit.oid != hub.head("me/tiny-bert")
    assert repo.commits[commit.oid]["title"] == "Candidate model"
    assert set(repo.commits[hub.head("me/tiny-bert")]["files"]) == {".gitattributes"}


@pytest.mark.parametrize("stage,status", [("commit", 500), ("lfs_upload", 507)])
def test_failed_upload_leaves_remote_unchanged(output_dir, hub, tmp_path, stage, status):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "out"
    shutil.copytree(output_dir, folder)
    before = publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url)
    files = _remote_files(hub, "me/tiny-bert")
    (folder / "README.md").write_text(CARD + "\nRetrained.\n")
    if stage == "lfs_upload":  # new weights: an LFS upload is needed
        weights = load_file(folder / "model.safetensors")
        weights = {k: v + 1 for k, v in weights.items()}
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    hub.fail_next(stage, status=status)
    with pytest.raises(UserError) as err:
        publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url)
    message = str(err.value)
    assert f"HTTP {status}" in message and hub.url in message and "me/tiny-bert" in message
    assert "\n" not in message
    assert hub.head("me/tiny-bert") == before.oid
    assert _remote_files(hub, "me/tiny-bert") == files

    after = publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url)  # the retry goes through
    assert after.oid != before.oid


@pytest.mark.parametrize("repo_id", ["a b/c", "../x", "a/b/c"])
def test_invalid_repo_id_fails_before_any_request(output_dir, hub, repo_id):
    with pytest.raises(UserError, match="invalid repo id"):
        publish_to_hub(output_dir, repo_id, endpoint=hub.url)
    assert hub.requests == []


def test_pickle_weights_are_refused(tmp_path, hub):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    (tmp_path / "run_summary.json").write_text("{}")
    with pytest.raises(UserError, match="pickle weights"):
        publish_to_hub(tmp_path, "me/pickled", endpoint=hub.url)
    assert hub.requests == []


def test_unreachable_endpoint_names_it(output_dir):
    url = _closed_port_url()
    with pytest.raises(UserError, match=f"could not reach {url}"):
        publish_to_hub(output_dir, "me/tiny-bert", endpoint=url)


def test_cli_errors_are_one_line(output_dir, hub, tmp_path):
    for args, expected in [((str(output_dir), "a b/c", "--hub-endpoint", hub.url), "invalid repo id"),
                           ((str(output_dir), "me/x", "--hub-endpoint", _closed_port_url()), "could not reach")]:
        done = _cli(*args, home=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], done.stderr
    assert hub.requests == []


def test_token_reaches_server_but_is_never_written(output_dir, hub, tmp_path):
    token = "hf_" + secrets.token_hex(16)
    done = _cli(str(output_dir), "me/tiny-bert", "--private", env_extra={"HF_TOKEN": token,
                                                                         "HF_ENDPOINT": hub.url}, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert hub.head("me/tiny-bert") in done.stdout
    assert f"Bearer {token}" in hub.authorizations
    assert hub.repos[("model", "me/tiny-bert")].private
    assert token not in done.stdout + done.stderr
    for root in (output_dir, tmp_path):
        for path in root.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def _git(*args: str, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_publish_to_git_with_lfs(output_dir, tmp_path, bare_git):
    # Hermetic git (bare_git): no user/system config, so the product must commit without a configured identity.
    url = bare_git
    bare = Path(url.removeprefix("file://"))

    sha = publish_to_git(output_dir, url)
    assert _git("rev-parse", "main", cwd=bare).strip() == sha

    clone = tmp_path / "clone"
    _git("clone", "--quiet", "--branch", "main", url, str(clone))
    _git("lfs", "install", "--local", cwd=clone)
    _git("lfs", "pull", cwd=clone)
    for name in PUBLISHED:
        assert filecmp.cmp(output_dir / name, clone / name, shallow=False), name
    assert not (clone / "checkpoints").exists()
    assert "model.safetensors" in _git("lfs", "ls-files", "--name-only", cwd=clone).split()
    blob = _git("cat-file", "-p", "HEAD:model.safetensors", cwd=clone)
    assert blob.startswith("version https://git-lfs.github.com/spec/v1")
    assert url in _git("config", "--get", "remote.origin.url", cwd=clone)

    again = _cli(str(output_dir), "--push-to-git", url, home=tmp_path / "hf")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == sha  # nothing changed: no new commit

    changed = tmp_path / "changed"
    shutil.copytree(output_dir, changed)
    (changed / "model.safetensors").write_bytes((changed / "model.safetensors").read_bytes()[::-1])
    (changed / "eval_report.json").write_text(json.dumps({"accuracy": 0.9}))
    second = publish_to_git(changed, url, commit_message="Retrained")
    clone2 = tmp_path / "clone2"
    _git("clone", "--quiet", "--branch", "main", url, str(clone2))
    _git("lfs", "install", "--local", cwd=clone2)
    _git("lfs", "pull", cwd=clone2)
    for name in PUBLISHED:
        assert filecmp.cmp(changed / name, clone2 / name, shallow=False), name
    assert _git("rev-list", "--count", "HEAD", cwd=clone2).strip() == "2"
    assert _git("rev-parse", "HEAD~1", cwd=clone2).strip() == sha != second

    with pytest.raises(UserError, match="credentials"):
        publish_to_git(output_dir, "https://user:hf_secret@example.com/me/model")


def test_local_hub_head_range_and_keepalive(hub):
    from huggingface_hub import HfApi, constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        HfApi(endpoint=hub.url).create_repo("me/raw")
    finally:
        constants.HF_HUB_OFFLINE = saved
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=10)
    conn.request("HEAD", "/me/raw/resolve/main/missing.txt")
    missing = conn.getresponse()
    assert missing.status == 404 and missing.read() == b""
    conn.request("GET", "/me/raw/resolve/main/.gitattributes", headers={"Range": "bytes=0-3"})
    part = conn.getresponse()  # same keep-alive connection: the HEAD reply left no stray body
    assert part.status == 206 and part.read() == b"*.7z"
    assert part.getheader("X-Repo-Commit") == hub.head("me/raw") and part.getheader("ETag")
    conn.request("GET", "/api/agent-harnesses")
    assert conn.getresponse().status == 404
    conn.close()


def test_failed_upload_to_a_new_branch_removes_the_branch(output_dir, hub, tmp_path):
    publish_to_hub(output_dir, "me/tiny-bert", endpoint=hub.url)
    main = hub.head("me/tiny-bert")
    folder = tmp_path / "out"
    shutil.copytree(output_dir, folder)
    (folder / "README.md").write_text(CARD + "\nRetrained.\n")
    hub.fail_next("commit", status=500)
    with pytest.raises(UserError) as err:
        publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url, revision="candidate")
    message = str(err.value)
    assert "HTTP 500" in message and "the new branch candidate was removed" in message and "\n" not in message
    assert set(hub.repos[("model", "me/tiny-bert")].refs) == {"main"} and hub.head("me/tiny-bert") == main

    # A branch that existed before stays, at its commit; and if the removal fails, the message says so.
    first = publish_to_hub(output_dir, "me/tiny-bert", endpoint=hub.url, revision="candidate")
    assert first.oid == main  # nothing to commit: the new branch starts at main, which has these files
    hub.fail_next("commit", status=500)
    with pytest.raises(UserError, match="HTTP 500") as err:
        publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url, revision="candidate")
    assert "branch" not in str(err.value) and hub.head("me/tiny-bert", "candidate") == first.oid
    hub.fail_next("commit", status=500)
    hub.fail_next("delete_branch", status=503)
    with pytest.raises(UserError, match="the new branch other could not be removed"):
        publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url, revision="other")


def test_tokenizer_and_processor_files_are_published(tmp_path):
    """Whisper's tokenizer files (normalizer.json with vocab.json and merges.txt) and its processor configs."""
    from tiny_models import WHISPER_TINY_EN
    from transformers import WhisperProcessor

    if not (WHISPER_TINY_EN / "tokenizer_config.json").is_file():
        pytest.skip("whisper-tiny.en not in ../shared")
    processor = WhisperProcessor.from_pretrained(WHISPER_TINY_EN)
    processor.tokenizer.english_spelling_normalizer = {"colour": "color"}
    processor.save_pretrained(tmp_path)
    processor.tokenizer.save_vocabulary(str(tmp_path))  # vocab.json, merges.txt, normalizer.json
    (tmp_path / "added_tokens.json").write_text("{}")
    (tmp_path / "special_tokens_map.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    written = {p.name for p in tmp_path.iterdir()}
    assert {"normalizer.json", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= written
    assert any(name in written for name in ("preprocessor_config.json", "processor_config.json"))
    assert set(select_files(tmp_path)) == written


def test_git_card_target_and_credentials():
    from pipelines.publish import check_git_remote, git_card_target

    assert git_card_target("https://huggingface.co/me/model") == ("me/model", "model")
    assert git_card_target("https://hf.co/me/model.git") == ("me/model", "model")
    assert git_card_target("git@hf.co:me/model") == ("me/model", "model")
    assert git_card_target("file:///srv/models/minilm.git") == (None, "minilm")
    assert git_card_target("ssh://git@example.com/team/minilm.git") == (None, "minilm")
    check_git_remote("ssh://git@example.com/team/minilm.git")  # an account name is not a credential
    for url in ("https://user:hf_secret@example.com/me/model", "https://hf_secret@huggingface.co/me/model"):
        with pytest.raises(UserError, match="contains credentials"):
            check_git_remote(url, "--push-to-git")


# ---------------------------------------------------------------- only finished runs; the remote holds exactly them
@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> dict:
    """Folders as the project writes them: a finished scripts/run.py run (tiny BERT, 2 steps, a checkpoint at each),
    what a run killed before its end leaves (run_config.json, metrics, checkpoints: no model, no run_summary.json),
    a checkpoint of each, and a report folder of scripts/evaluate_model.py on the finished model."""
    from conftest import DATA, read_jsonl, run_script, write_jsonl
    from tiny_models import make_tiny_model

    if not (DATA / "sst2" / "train.jsonl").is_file():
        pytest.skip(f"shared data not found at {DATA}")
    root = tmp_path_factory.mktemp("real_run")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=48)
    write_jsonl(root / "data" / "train.jsonl", rows[:32])
    write_jsonl(root / "data" / "validation.jsonl", rows[32:])
    base = make_tiny_model("bert", root / "base", task="sequence-classification", num_labels=2)
    common = ["--recipe", "sentiment", "--dataset", root / "data", "--max-length", 32, "--bootstrap-samples", 0]
    run = root / "run"
    done = run_script([*common, "--model", base, "--output-dir", run, "--max-steps", 2, "--eval-steps", 1,
                       "--batch-size", 8], env={"HF_HOME": str(root / "hf")})
    assert done.returncode == 0, done.stderr[-3000:]
    report = root / "eval"
    done = run_script([*common, "--model", run, "--split", "validation", "--output-dir", report],
                      script="scripts/evaluate_model.py", env={"HF_HOME": str(root / "hf")})
    assert done.returncode == 0, done.stderr[-3000:]
    killed = root / "killed"
    killed.mkdir()
    for name in ("run_config.json", "metrics.jsonl"):
        shutil.copyfile(run / name, killed / name)
    shutil.copytree(run / "checkpoints", killed / "checkpoints")
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    return {"run": run, "report": report, "killed": killed, "checkpoint": checkpoint,
            "killed_checkpoint": killed / "checkpoints" / checkpoint.name}


@pytest.fixture
def bare_git(tmp_path, monkeypatch) -> str:
    """A bare git repository as the remote (file:// URL), with hermetic git (no user or system config)."""
    if shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode:
        pytest.skip("git-lfs is not installed")
    (tmp_path / "gitconfig").write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    bare = tmp_path / "remote.git"
    _git("init", "--quiet", "--bare", str(bare))
    return f"file://{bare}"


def _git_state(url: str) -> dict:
    """Every ref of the bare remote and the files of each branch."""
    bare = url[len("file://"):]
    listing = _git("for-each-ref", "--format=%(refname) %(objectname)", cwd=bare)
    refs = dict(line.split() for line in listing.splitlines())
    return {ref: (sha, set(_git("ls-tree", "-r", "--name-only", sha, cwd=bare).split())) for ref, sha in refs.items()}


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("kind, expected", [
    ("killed", ["not a finished run, it has no run_summary.json and no model weights", "--resume",
                "--allow-unfinished"]),
    ("checkpoint", ["is a training checkpoint", "publish the run's output folder {run} instead"]),
    ("killed_checkpoint", ["is a training checkpoint",
                           "--output-dir {killed} --resume`, then publish the run's output folder {killed}"]),
    ("report", ["is an evaluation report folder", "scripts/evaluate_model.py", "not a model"]),
])
def test_only_a_finished_run_is_published(real_run, kind, expected, hub, bare_git, tmp_path):
    """A killed run's folder, a checkpoint and an evaluation report folder: one error line, exit 2, and both
    remotes exactly as they were (same commit, same files; no request at all to the Hub server)."""
    publish_to_hub(real_run["run"], "me/tiny-run", endpoint=hub.url)
    publish_to_git(real_run["run"], bare_git)
    head, files, seen = hub.head("me/tiny-run"), _remote_files(hub, "me/tiny-run"), len(hub.requests)
    git_before = _git_state(bare_git)
    expected = [text.format(**real_run) for text in expected]

    for target in (["me/tiny-run", "--hub-endpoint", hub.url], ["--push-to-git", bare_git]):
        error = _error_line(_cli(str(real_run[kind]), *target, home=tmp_path / "hf"))
        assert str(real_run[kind]) in error and all(text in error for text in expected), error
    assert hub.requests[seen:] == []
    assert hub.head("me/tiny-run") == head and _remote_files(hub, "me/tiny-run") == files
    assert _git_state(bare_git) == git_before

    if kind != "killed":  # forcing publishes a stopped run, never a checkpoint or a report
        seen = len(hub.requests)
        for publish, target in ((publish_to_hub, {"repo_id": "me/tiny-run", "endpoint": hub.url}),
                                (publish_to_git, {"url": bare_git})):
            with pytest.raises(UserError) as err:
                publish(real_run[kind], **target, allow_unfinished=True)
            assert all(text in str(err.value) for text in expected), err.value
        assert hub.requests[seen:] == [] and _git_state(bare_git) == git_before


def test_finished_marker_is_the_trainers():
    from pipelines import output_folder, publish  # the trainer's output folder writes the marker last

    assert publish.FINISHED_MARKER == output_folder.FINISHED_MARKER


def test_allow_unfinished_publishes_a_stopped_run_with_a_warning(real_run, hub, bare_git, tmp_path):
    """A run stopped just before its end (the model saved, no run_summary.json yet) is refused, and published
    with --allow-unfinished and a warning; a stopped run without a model is refused even so."""
    stopped = tmp_path / "stopped"
    shutil.copytree(real_run["run"], stopped)
    (stopped / "run_summary.json").unlink()
    for target in (["me/stopped", "--hub-endpoint", hub.url], ["--push-to-git", bare_git]):
        error = _error_line(_cli(str(stopped), *target, home=tmp_path / "hf"))
        assert "it has no run_summary.json (" in error and "--allow-unfinished" in error, error
    assert hub.head("me/stopped") is None and _git_state(bare_git) == {}

    for target in (["me/stopped", "--hub-endpoint", hub.url], ["--push-to-git", bare_git]):
        done = _cli(str(stopped), *target, "--allow-unfinished", home=tmp_path / "hf")
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"warning: publishing {stopped} although it is not a finished run (no run_summary.json)" in done.stderr
    expected = set(select_files(stopped)) | {".gitattributes"}
    assert "model.safetensors" in expected and _remote_files(hub, "me/stopped") == expected
    assert _git_state(bare_git)["refs/heads/main"][1] == expected

    error = _error_line(_cli(str(real_run["killed"]), "me/stopped", "--hub-endpoint", hub.url, "--allow-unfinished",
                             home=tmp_path / "hf"))
    assert "holds no model weights" in error, error


def test_hub_remote_holds_exactly_the_published_files(output_dir, hub, tmp_path):
    """A file removed from the folder (a plot), and training state of an earlier --include-checkpoints publish,
    are deleted from the branch published to, in the same commit; .gitattributes stays; other branches keep theirs."""
    folder = tmp_path / "out"
    shutil.copytree(output_dir, folder)
    publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url, include_checkpoints=True)
    full = _remote_files(hub, "me/tiny-bert")
    assert {"loss.png", "checkpoints/step-1/optimizer.bin", "runs/events.out.tfevents.1.host"} <= full
    publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url, revision="candidate", include_checkpoints=True)
    repo = hub.repos[("model", "me/tiny-bert")]
    candidate, main = hub.head("me/tiny-bert", "candidate"), hub.head("me/tiny-bert")

    (folder / "loss.png").unlink()
    commit = publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url)
    expected = PUBLISHED - {"loss.png"} | {".gitattributes"}
    assert _remote_files(hub, "me/tiny-bert") == expected
    assert repo.commits[commit.oid]["parent"] == main  # one commit: uploads (none here) and deletions together
    assert hub.head("me/tiny-bert", "candidate") == candidate and set(repo.commits[candidate]["files"]) == full

    again = publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url)  # nothing changed: no new commit
    assert again.oid == commit.oid == hub.head("me/tiny-bert")

    publish_to_hub(folder, "me/tiny-bert", endpoint=hub.url, revision="candidate")
    assert set(repo.commits[hub.head("me/tiny-bert", "candidate")]["files"]) == expected
    assert hub.head("me/tiny-bert") == commit.oid


def test_git_remote_holds_exactly_the_published_files(output_dir, bare_git, tmp_path):
    """The same on a git remote with LFS: the removed plot and the earlier training state are deleted from the
    branch in one commit, the other files (LFS ones included) come back intact, other branches keep theirs."""
    folder = tmp_path / "out"
    shutil.copytree(output_dir, folder)
    first = publish_to_git(folder, bare_git, include_checkpoints=True)
    publish_to_git(folder, bare_git, branch="candidate", include_checkpoints=True)
    full = _git_state(bare_git)["refs/heads/main"][1]
    assert {"loss.png", "checkpoints/step-1/optimizer.bin", "runs/events.out.tfevents.1.host"} <= full

    (folder / "loss.png").unlink()
    second = publish_to_git(folder, bare_git)
    state = _git_state(bare_git)
    expected = PUBLISHED - {"loss.png"} | {".gitattributes"}
    assert state["refs/heads/main"] == (second, expected)
    assert state["refs/heads/candidate"][1] == full
    assert _git("rev-parse", f"{second}~1", cwd=bare_git[len("file://"):]).strip() == first

    clone = tmp_path / "clone"
    _git("clone", "--quiet", "--branch", "main", bare_git, str(clone))
    _git("lfs", "install", "--local", cwd=clone)
    _git("lfs", "pull", cwd=clone)
    for name in PUBLISHED - {"loss.png"}:
        assert filecmp.cmp(folder / name, clone / name, shallow=False), name
    assert not (clone / "loss.png").exists() and not (clone / "checkpoints").exists()

    assert publish_to_git(folder, bare_git) == second  # nothing changed: no new commit
    assert _git_state(bare_git) == state

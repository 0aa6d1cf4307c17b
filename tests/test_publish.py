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


def test_publish_to_git_with_lfs(output_dir, tmp_path, monkeypatch):
    if shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode:
        pytest.skip("git-lfs is not installed")
    # Hermetic git: no user/system config (the product must commit without a configured identity).
    (tmp_path / "gitconfig").write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    bare = tmp_path / "remote.git"
    _git("init", "--quiet", "--bare", str(bare))
    url = f"file://{bare}"

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

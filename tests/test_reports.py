"""Evaluation reports, model cards and publishing, end to end through scripts/run.py (offline).

A tiny BERT trained on a slice of real SST-2 rows: the report's numbers must equal scikit-learn on the
saved model's own predictions, the interval must be seeded and contain the estimate, the card must parse
with huggingface_hub and its how-to snippet must run, scripts/evaluate_model.py must reproduce the run's final
evaluation (full model and LoRA adapter, from a folder or the Hub), a planted HF_TOKEN must appear in no
output file, and --push-to-hub / --push-to-git / scripts/publish.py must deliver the model with a card
that names where it was published, to a local Hub-compatible server and a bare git repository.
"""

from __future__ import annotations

import filecmp
import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, read_jsonl, run_here, run_script, write_jsonl
from hub_server import LocalHub
from tiny_models import make_tiny_model

TOKEN = "hf_" + secrets.token_hex(16)
PNG = b"\x89PNG\r\n\x1a\n"
REPO_ID = "me/tiny-sentiment-lora"
COMMON = ["--recipe", "sentiment", "--max-length", 64, "--logging-steps", 5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (DATA / "sst2" / "train.jsonl").is_file():
        pytest.skip(f"shared data not found at {DATA}")
    root = tmp_path_factory.mktemp("reports")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=2000)
    write_jsonl(root / "data" / "train.jsonl", rows[:1600])
    write_jsonl(root / "data" / "validation.jsonl", rows[1700:2000])
    model = make_tiny_model("bert", root / "base", task="sequence-classification", num_labels=2)
    return root, Path(model)


def _env(root: Path) -> dict:
    # A planted token (it must never be written) and a private HF_HOME (no saved login of the machine).
    return {"HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf-home")}


@pytest.fixture(scope="module")
def full_run(setup):
    root, base = setup
    out = root / "full"
    done = run_script([*COMMON, "--model", base, "--dataset", root / "data", "--output-dir", out,
                       "--num-epochs", 2, "--batch-size", 32, "--learning-rate", 3e-3], env=_env(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hub():
    with LocalHub() as server:
        yield server


@pytest.fixture(scope="module")
def lora_run(setup, hub):
    root, base = setup
    out = root / "lora"
    done = run_script([*COMMON, "--model", base, "--dataset", root / "data", "--output-dir", out,
                       "--max-train-samples", 320, "--max-steps", 10, "--batch-size", 32, "--learning-rate", 5e-3,
                       "--tuning", "lora", "--save-checkpoints", "false", "--bootstrap-samples", 200,
                       "--push-to-hub", REPO_ID, "--hub-endpoint", hub.url, "--hub-private"], env=_env(root))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published to" in done.stdout
    return out


def _predict(out: Path, texts: list[str], *, model=None):
    """Predicted ids and per-example cross-entropy of the saved model (as the sentiment recipe feeds it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = (model or AutoModelForSequenceClassification.from_pretrained(out)).eval()
    logits = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            batch = tokenizer(texts[i:i + 32], truncation=True, max_length=64, padding=True, return_tensors="pt")
            logits.append(model(**batch).logits.float())
    logits = torch.cat(logits)
    return logits.argmax(-1).numpy(), logits


def _snippet(card_text: str) -> str:
    match = re.search(r"## How to use\s+```python\n(.*?)```", card_text, re.S)
    assert match, "no python snippet under 'How to use'"
    return match.group(1)


def _run_snippet(code: str, cwd: Path, hub: LocalHub | None = None) -> subprocess.CompletedProcess:
    """Run a card's snippet as a user would, offline; with `hub`, against that server (its only network)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if hub is not None:
        env.update({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def _online_env(root: Path, hub: LocalHub) -> dict:
    """A subprocess that may use the local hub (and nothing else: it is the endpoint)."""
    return {**_env(root), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}


@pytest.fixture
def online(monkeypatch):
    """Let this test process download from the local hub (the suite runs with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _git(*args, cwd=None) -> str:
    return subprocess.run(["git", *map(str, args)], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def hermetic_git(tmp_path, monkeypatch):
    """git with no user or system config (publishing must commit without a configured identity)."""
    if shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode:
        pytest.skip("git-lfs is not installed")
    (tmp_path / "gitconfig").write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def _published_files(out: Path) -> set[str]:
    from pipelines.publish import select_files

    return set(select_files(out))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


# ------------------------------------------------------------------------------------------------ reports
def test_report_numbers_equal_sklearn_on_the_saved_model(full_run, setup):
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    from pipelines.recipe import classification_statistic
    from pipelines.bootstrap import bootstrap_ci

    root, _ = setup
    report = json.loads((full_run / "eval_report.json").read_text())
    summary = json.loads((full_run / "run_summary.json").read_text())
    rows = read_jsonl(root / "data" / "validation.jsonl")
    assert report["split"] == "validation" and report["samples"] == len(rows) == 300
    assert report["model"] == str(setup[1]) and report["dataset"]["name"] == str(root / "data")
    assert report["config_hash"] == summary["config_hash"] and report["normalization"] is None
    for name in ("accuracy", "f1", "loss"):
        assert report["metrics"][name] == summary["results"]["validation"][name]

    references = np.array([r["label"] for r in rows])
    predictions, logits = _predict(full_run, [r["text"] for r in rows])
    assert len(set(predictions)) == 2, "the tiny model should have learned something (both classes predicted)"
    assert report["metrics"]["accuracy"] == float(accuracy_score(references, predictions))
    assert report["metrics"]["f1"] == float(f1_score(references, predictions, average="macro"))

    interval = report["confidence_interval"]
    assert interval["metric"] == "accuracy" and interval["resamples"] == 1000 and interval["seed"] == 42
    assert interval["low"] <= report["metrics"]["accuracy"] <= interval["high"]
    assert 0 < interval["high"] - interval["low"] < 0.25
    statistic = classification_statistic({"predictions": predictions, "references": references}, "accuracy")
    assert bootstrap_ci(statistic, len(rows), 1000, 42) == (interval["low"], interval["high"])  # seeded: same CI
    assert bootstrap_ci(statistic, len(rows), 1000, 43) != (interval["low"], interval["high"])

    losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(references), reduction="none").numpy()
    worst = report["worst_examples"]
    assert report["worst_examples_by"] == "per-example loss" and len(worst) == 10
    assert [w["index"] for w in worst] == [int(i) for i in np.argsort(-losses, kind="stable")[:10]]
    for w in worst:
        assert w["input"] == rows[w["index"]]["text"]
        assert w["reference"] == ["negative", "positive"][rows[w["index"]]["label"]]
        assert w["prediction"] == ["negative", "positive"][predictions[w["index"]]]
        assert w["error"] == pytest.approx(float(losses[w["index"]]), abs=1e-4)

    assert set(report["plots"]) == {"learning_curves", "confusion_matrix"}
    for file in report["plots"].values():
        assert _is_png(full_run / file), file
    markdown = (full_run / "eval_report.md").read_text()
    assert "| accuracy (main) |" in markdown and f"[{interval['low']:.4f}, {interval['high']:.4f}]" in markdown
    assert "## Worst examples" in markdown and worst[0]["input"][:40] in markdown
    assert "![confusion matrix](confusion_matrix.png)" in markdown


def test_classification_fast_path_equals_the_metric_module():
    from pipelines.metrics import compute
    from pipelines.recipe import classification_statistic
    from pipelines.bootstrap import bootstrap_ci

    rng = np.random.default_rng(0)
    references = rng.integers(0, 3, 1500)
    predictions = np.where(rng.random(1500) < 0.7, references, rng.integers(0, 3, 1500))
    gathered = {"predictions": list(predictions), "references": list(references)}
    for metric in ("accuracy", "f1"):
        statistic = classification_statistic(gathered, metric)
        for indices in (np.arange(1500), rng.integers(0, 1500, 1500), rng.integers(0, 1500, 200)):
            expected = compute("classification", predictions=predictions[indices].tolist(),
                               references=references[indices].tolist())[metric]
            assert statistic(indices) == expected
    low, high = bootstrap_ci(classification_statistic(gathered, "accuracy"), 1500, 1000, 42)
    assert low < float(np.mean(predictions == references)) < high


# ------------------------------------------------------------------------------------------------ cards
def test_card_header_parses_and_snippet_runs(full_run, setup, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    report = json.loads((full_run / "eval_report.json").read_text())
    text = (full_run / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert card.data.license is None and card.data.base_model is None  # a local base model: nothing invented
    assert set(card.data.metrics) == {"accuracy", "f1"}
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "full"
    assert {r.metric_type: r.metric_value for r in results} == {k: report["metrics"][k] for k in ("accuracy", "f1")}
    assert {(r.task_type, r.dataset_split) for r in results} == {("text-classification", "validation")}
    body = card.text
    summary = json.loads((full_run / "run_summary.json").read_text())
    assert f"{summary['trainable_params']:,} of {summary['total_params']:,}" in body
    assert "1,600 training examples" in body and "| learning rate | 0.003 |" in body
    assert f"[{report['confidence_interval']['low']:.4f}, {report['confidence_interval']['high']:.4f}]" in body
    assert "transformers 5." in body and "## Limitations" in body

    done = _run_snippet(_snippet(text), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\[\{'label': '(negative|positive)', 'score': [0-9.]+\}\]", done.stdout), done.stdout


def test_lora_card_snippet_and_push_to_hub(lora_run, hub, online, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    text = (lora_run / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    snippet = _snippet(text)
    assert f'"{REPO_ID}"' in snippet and 'subfolder="model_config"' in snippet  # the repository it is published to
    done = _run_snippet(snippet.replace(f'"{REPO_ID}"', json.dumps(str(lora_run))), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"'label': '(negative|positive)'", done.stdout), done.stdout  # the run's labels, not LABEL_0

    repo = hub.repos[("model", REPO_ID)]
    assert repo.private and f"Bearer {TOKEN}" in hub.authorizations
    files = repo.commits[hub.head(REPO_ID)]["files"]
    report = json.loads((lora_run / "eval_report.json").read_text())
    assert {"README.md", "eval_report.json", "eval_report.md", "adapter_model.safetensors", "adapter_config.json",
            *report["plots"].values()} <= set(files)
    assert not any(f.startswith("checkpoints/") or f == "run_summary.json" for f in files)
    for name in ("README.md", "eval_report.json"):
        assert hub._read(files[name]) == (lora_run / name).read_bytes()

    # A user's round trip: download, byte-identical to the run's files, loads with peft and pipeline().
    local = Path(snapshot_download(REPO_ID, endpoint=hub.url, token=TOKEN, local_dir=tmp_path / "dl"))
    published = _published_files(lora_run)
    assert {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()
            and ".cache" not in p.parts} == published | {".gitattributes"}
    for name in published:
        assert filecmp.cmp(lora_run / name, local / name, shallow=False), name
    adapter = json.loads((local / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"], num_labels=2)
    model = PeftModel.from_pretrained(base, local).eval()
    texts = ["a great movie", "a dull, awful film"]
    assert (_predict(lora_run, texts, model=model)[0] == _predict(lora_run, texts, model=PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"], num_labels=2),
        lora_run).eval())[0]).all()
    config = AutoConfig.from_pretrained(local, subfolder="model_config")
    result = pipeline("text-classification", tokenizer=str(local), model=AutoModelForSequenceClassification.from_pretrained(
        local, config=config, ignore_mismatched_sizes=True))(texts[0])
    assert result[0]["label"] in {"negative", "positive"}, result

    downloaded = ModelCard.load(local / "README.md")
    report = json.loads((lora_run / "eval_report.json").read_text())
    assert downloaded.data.library_name == "peft" and downloaded.data.pipeline_tag == "text-classification"
    name, results = model_index_to_eval_results(downloaded.data.to_dict()["model-index"])
    assert name == REPO_ID.split("/")[-1]
    assert {r.metric_type: r.metric_value for r in results} == {k: report["metrics"][k] for k in ("accuracy", "f1")}
    assert {(r.task_type, r.dataset_split) for r in results} == {("text-classification", "validation")}


def test_publishing_later_renders_the_card_for_the_repo(full_run, setup, hub, online, tmp_path):
    """scripts/publish.py after a run without --push-to-hub: the published card names the repo, not the
    local folder; the run's folder is left as it was; re-publishing makes no commit."""
    from huggingface_hub import ModelCard, snapshot_download

    root, _ = setup
    repo_id = "me/full-sst2"
    before = {p: p.read_bytes() for p in full_run.rglob("*") if p.is_file()}
    assert json.dumps(str(full_run)) in _snippet((full_run / "README.md").read_text())  # the run's own card
    done = run_script([full_run, repo_id, "--hub-endpoint", hub.url], script="scripts/publish.py", env=_env(root))
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p: p.read_bytes() for p in full_run.rglob("*") if p.is_file()} == before  # nothing written there

    local = Path(snapshot_download(repo_id, endpoint=hub.url, local_dir=tmp_path / "dl"))
    for name in _published_files(full_run) - {"README.md"}:
        assert filecmp.cmp(full_run / name, local / name, shallow=False), name
    text = (local / "README.md").read_text()
    assert str(full_run) not in text and str(root) not in text
    snippet = _snippet(text)
    assert f'model="{repo_id}"' in snippet
    card = ModelCard(text)
    assert card.data.model_name == "full-sst2" and text.count("\n# full-sst2\n") == 1
    # The rest of the card is the run's: same results, hyperparameters, versions.
    assert card.data.to_dict()["model-index"][0]["results"] == \
        ModelCard((full_run / "README.md").read_text()).data.to_dict()["model-index"][0]["results"]
    assert text.split("## Training procedure")[1].split("## How to use")[0] == \
        (full_run / "README.md").read_text().split("## Training procedure")[1].split("## How to use")[0]

    ran = _run_snippet(snippet, tmp_path, hub=hub)  # as a user: the model comes from the server
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert re.search(r"'label': '(negative|positive)'", ran.stdout), ran.stdout

    commits = len(hub.repos[("model", repo_id)].commits)
    again = run_script([full_run, repo_id, "--hub-endpoint", hub.url], script="scripts/publish.py", env=_env(root))
    assert again.returncode == 0 and len(hub.repos[("model", repo_id)].commits) == commits, again.stderr[-2000:]


def test_git_route_card_names_the_clone(full_run, hermetic_git, tmp_path):
    from pipelines.publish import publish_to_git

    bare = tmp_path / "minilm-sst2.git"
    _git("init", "--quiet", "--bare", bare)
    before = (full_run / "README.md").read_bytes()
    sha = publish_to_git(full_run, f"file://{bare}")
    assert (full_run / "README.md").read_bytes() == before
    clone = tmp_path / "minilm-sst2"  # where `git clone URL` puts it, as the card says
    _git("clone", "--quiet", "--branch", "main", f"file://{bare}", clone, cwd=tmp_path)
    _git("lfs", "install", "--local", cwd=clone)
    _git("lfs", "pull", cwd=clone)
    assert _git("rev-parse", "HEAD", cwd=clone).strip() == sha
    snippet = _snippet((clone / "README.md").read_text())
    assert f"git clone --branch main file://{bare}" in snippet and 'model="minilm-sst2"' in snippet and str(full_run) not in snippet
    ran = _run_snippet(snippet, tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert re.search(r"'label': '(negative|positive)'", ran.stdout), ran.stdout


def test_run_publishes_to_a_branch_with_a_message_on_the_hub_and_git(setup, hub, hermetic_git, tmp_path):
    root, base = setup
    repo_id, bare = "me/tiny-branch", tmp_path / "remote.git"
    _git("init", "--quiet", "--bare", bare)
    out = tmp_path / "out"
    done = run_script([*COMMON, "--model", base, "--dataset", root / "data", "--output-dir", out,
                       "--max-train-samples", 64, "--max-steps", 2, "--batch-size", 32, "--save-checkpoints", "false",
                       "--bootstrap-samples", 0, "--push-to-hub", repo_id, "--hub-endpoint", hub.url,
                       "--hub-revision", "candidate", "--hub-commit-message", "Tiny run",
                       "--push-to-git", f"file://{bare}"], env=_env(root))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published to" in done.stdout and "pushed to" in done.stdout

    repo = hub.repos[("model", repo_id)]
    head = hub.head(repo_id, "candidate")
    assert repo.commits[head]["title"] == "Tiny run"
    assert set(repo.commits[hub.head(repo_id)]["files"]) == {".gitattributes"}  # main: as created
    hub_card = hub._read(repo.commits[head]["files"]["README.md"]).decode()
    assert hub_card == (out / "README.md").read_text()  # the run's card already names the repo and branch
    assert f'model="{repo_id}", revision="candidate"' in _snippet(hub_card)

    assert _git("branch", "--format=%(refname:short)", cwd=bare).split() == ["candidate"]
    assert _git("log", "-1", "--format=%s", "candidate", cwd=bare).strip() == "Tiny run"
    git_card = _git("show", "candidate:README.md", cwd=bare)
    assert f"git clone --branch candidate file://{bare}" in git_card and 'model="remote"' in git_card

    saved = json.loads((out / "run_config.json").read_text())["config"]
    assert (saved["hub_revision"], saved["hub_commit_message"], saved["push_to_git"]) == \
        ("candidate", "Tiny run", f"file://{bare}")
    assert saved["revision"] is None  # the base model's revision: another option


# ------------------------------------------------------------------------------------------------ evaluate_model.py
@pytest.mark.parametrize("run", ["full_run", "lora_run"])
def test_evaluate_script_reproduces_the_final_evaluation(run, request, setup, tmp_path):
    root, _ = setup
    out = request.getfixturevalue(run)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    report_dir = tmp_path / "eval"
    done = run_script([*COMMON, "--model", out, "--dataset", root / "data", "--split", "validation",
                       "--output-dir", report_dir, "--eval-batch-size", 64], script="scripts/evaluate_model.py",
                      env=_env(root))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((report_dir / "eval_report.json").read_text())
    trained = json.loads((out / "eval_results.json").read_text())["validation"]
    assert report["samples"] == trained["samples"]
    for name in ("accuracy", "f1"):
        assert report["metrics"][name] == trained[name]
    assert report["metrics"]["loss"] == pytest.approx(trained["loss"], abs=1e-5)
    assert report["model"] == str(out) and _is_png(report_dir / "confusion_matrix.png")
    assert "learning_curves" not in report["plots"]  # no training log
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the model folder is untouched


def test_evaluate_script_loads_a_lora_adapter_from_the_hub(lora_run, setup, hub, tmp_path):
    root, _ = setup
    report_dir = tmp_path / "eval"
    done = run_script([*COMMON, "--model", REPO_ID, "--dataset", root / "data", "--split", "validation",
                       "--output-dir", report_dir, "--eval-batch-size", 64], script="scripts/evaluate_model.py",
                      env={**_online_env(root, hub), "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((report_dir / "eval_report.json").read_text())
    trained = json.loads((lora_run / "eval_results.json").read_text())["validation"]
    assert report["model"] == REPO_ID and report["samples"] == trained["samples"]
    for name in ("accuracy", "f1"):
        assert report["metrics"][name] == trained[name]


def test_evaluate_script_hub_unreachable_and_pickle_adapters(lora_run, setup, tmp_path):
    import torch
    from safetensors.torch import load_file

    root, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    args = [*COMMON, "--dataset", root / "data", "--eval-batch-size", 64]
    done = run_script([*args, "--model", "me/somewhere", "--output-dir", tmp_path / "e1"],
                      script="scripts/evaluate_model.py",
                      env={**_env(root), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"could not reach the Hugging Face Hub at {closed}" in done.stderr and "adapter_config.json" in done.stderr

    pickled = tmp_path / "pickled"
    shutil.copytree(lora_run, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    done = run_here([*args, "--model", pickled, "--output-dir", tmp_path / "e2"], script="scripts/evaluate_model.py")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "adapter_model.bin" in errors[0] and "--allow-pickle" in errors[0], done.stderr
    done = run_here([*args, "--model", pickled, "--output-dir", tmp_path / "e3", "--allow-pickle"],
                      script="scripts/evaluate_model.py")
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((lora_run / "eval_results.json").read_text())["validation"]
    assert json.loads((tmp_path / "e3" / "eval_report.json").read_text())["metrics"]["accuracy"] == trained["accuracy"]


def test_evaluate_script_errors_are_one_line(full_run, setup, tmp_path):
    root, _ = setup
    for args, expected in [(["--output-dir", full_run], "is the model folder"),
                           (["--output-dir", tmp_path / "x", "--split", "test"], "no test split"),
                           ([], "--output-dir is required")]:
        done = run_here([*COMMON, "--model", full_run, "--dataset", root / "data", *args],
                          script="scripts/evaluate_model.py")
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and expected in done.stderr


# ------------------------------------------------------------------------------------------------ safety
def test_planted_token_is_in_no_output_file(full_run, lora_run):
    for folder in (full_run, lora_run):
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_config_snapshot_drops_secret_keys_only(full_run, setup):
    import dataclasses

    from pipelines.config import RunConfig, config_hash, snapshot

    saved = json.loads((full_run / "run_config.json").read_text())["config"]
    assert saved["max_new_tokens"] == RunConfig.max_new_tokens and "num_beams" in saved  # "token" inside a name
    cfg = RunConfig(output_dir="x", extra={"hf_token": TOKEN, "Password": "p", "max_tokens": 5})
    data = snapshot(cfg)["config"]
    assert data["extra"] == {"max_tokens": 5} and TOKEN not in json.dumps(data)
    assert config_hash(dataclasses.replace(cfg, max_new_tokens=32)) != config_hash(cfg)


def test_bad_repo_id_or_bootstrap_option_fails_before_training(setup, tmp_path):
    root, base = setup
    for args, expected in [(["--push-to-hub", "a b/c"], "invalid repo id"),
                           (["--bootstrap-samples", -1], "--bootstrap-samples must not be negative"),
                           (["--hub-revision", "a..b"], "--hub-revision must be a branch name"),
                           (["--push-to-git", "https://me:hf_x@example.com/m.git"], "--push-to-git contains credentials")]:
        out = tmp_path / "never"
        done = run_here([*COMMON, "--model", base, "--dataset", root / "data", "--output-dir", out, *args])
        assert done.returncode == 2 and expected in done.stderr, done.stderr[-2000:]
        assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ other tasks' plots
def test_entity_f1_and_wer_by_length_plots(tmp_path):
    import jiwer

    from pipelines.report import plot_entity_f1, plot_wer_by_length

    metrics = {"overall_f1": 0.71, "overall_precision": 0.7, "PER_f1": 0.9, "LOC_f1": 0.75, "ORG_f1": 0.5,
               "MISC_f1": 0.4, "PER_number": 10.0}
    assert plot_entity_f1(metrics, tmp_path / "entity_f1.png") and _is_png(tmp_path / "entity_f1.png")
    assert not plot_entity_f1({"accuracy": 0.5, "f1": 0.4}, tmp_path / "none.png")

    rows = [{"reference": "the cat sat", "prediction": "the cat sat"},
            {"reference": "a dog", "prediction": "a frog"},
            {"reference": " ".join(["word"] * 12), "prediction": " ".join(["word"] * 10)},
            {"reference": " ".join(["long"] * 50), "prediction": " ".join(["long"] * 45 + ["x"] * 5)},
            {"reference": "", "prediction": "ignored"}]
    table = plot_wer_by_length(rows, tmp_path / "wer.png")
    assert _is_png(tmp_path / "wer.png")
    assert [(t["bucket"], t["utterances"]) for t in table] == [("1-5", 2), ("11-20", 1), ("41+", 1)]
    assert table[0]["wer"] == jiwer.wer(["the cat sat", "a dog"], ["the cat sat", "a frog"])
    assert table[1]["wer"] == pytest.approx(2 / 12) and table[2]["wer"] == pytest.approx(5 / 50)

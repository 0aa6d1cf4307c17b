"""Security defaults: no pickle, no remote code, no token on disk, no path out of the output folder.

- Weights load from safetensors; a model folder with only pickle weights (pytorch_model.bin) is
  refused with a message naming --allow-pickle, and trains with it (saving safetensors).
- trust_remote_code is off unless --trust-remote-code: a model folder whose config maps to its own
  Python code (auto_map) is refused and the code never runs (it would write a marker file when
  imported); with the flag it runs, which shows the flag really reaches from_pretrained.
- A token planted in the environment (HF_TOKEN) is used to publish to a local Hub-compatible server,
  and appears in no file of the output folder (configs, logs, card, reports, tensorboard events), in
  no console output, and in no file the server stored.
- Names from configs do not lead out of the output folder: repo ids are validated (`../../x` is not
  one), and publishing refuses a file that is a link to somewhere outside the folder.
"""

import json
import secrets
import shutil
import sys
from pathlib import Path

import pytest
from conftest import DATA, read_jsonl, run_script, write_jsonl

from pipelines import cli
from pipelines.config import RunConfig, parse_args
from pipelines.errors import UserError


def error_lines(stderr: str) -> list:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("security")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=40)
    return {
        "root": root,
        "bert": make_tiny_model("bert", root / "bert", task="sequence-classification", num_labels=2),
        "train": write_jsonl(root / "train.jsonl", rows[:24]),
        "validation": write_jsonl(root / "validation.jsonl", rows[24:40]),
    }


def short_run(data, model, out, *extra):
    return [str(a) for a in ["--model", model, "--train-file", data["train"], "--validation-file", data["validation"],
                             "--output-dir", out, "--batch-size", "8", "--max-steps", "2", "--eval-steps", "1",
                             "--bootstrap-samples", "0", *extra]]


# ------------------------------------------------------------------------------------------ loading


class Recorder:
    """Stands in for an Auto class: records what from_pretrained was asked."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        cls.calls.append(kwargs)
        return object()


def test_loading_defaults_are_safetensors_only_and_no_remote_code(data):
    from pipelines.models import load_pretrained, load_processor

    assert RunConfig().trust_remote_code is False and RunConfig().allow_pickle is False
    Recorder.calls.clear()
    load_pretrained(Recorder, str(data["bert"]), RunConfig())
    load_processor(Recorder, str(data["bert"]), RunConfig())
    model_kwargs, processor_kwargs = Recorder.calls
    assert model_kwargs["trust_remote_code"] is False and model_kwargs["use_safetensors"] is True
    assert processor_kwargs["trust_remote_code"] is False
    Recorder.calls.clear()
    load_pretrained(Recorder, str(data["bert"]), RunConfig(trust_remote_code=True, allow_pickle=True))
    (kwargs,) = Recorder.calls
    assert kwargs["trust_remote_code"] is True and "use_safetensors" not in kwargs  # the user's choice, explicitly


@pytest.fixture(scope="module")
def pickle_model(data):
    """The tiny BERT with its weights as a pickle (pytorch_model.bin) and no safetensors file."""
    import torch
    from safetensors.torch import load_file

    folder = data["root"] / "pickle_model"
    shutil.copytree(data["bert"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_unless_allowed(data, pickle_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(short_run(data, pickle_model, out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "pickle" in line and "--allow-pickle" in line
    assert not out.exists()  # refused before anything was written

    assert cli.main(short_run(data, pickle_model, out, "--allow-pickle")) == 0, capsys.readouterr().err[-2000:]
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # what it saves is safetensors


@pytest.fixture(scope="module")
def remote_code_model(data):
    """A model folder whose config names its own classes (auto_map): importing them writes a marker file."""
    folder = data["root"] / "remote_code_model"
    shutil.copytree(data["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-bert", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForSequenceClassification": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "configuration_custom.py").write_text(
        "import os\n"
        "from pathlib import Path\n\n"
        "Path(os.environ['REMOTE_CODE_MARKER']).write_text('the model folder ran its own code')\n\n"
        "from transformers import BertConfig\n\n\n"
        "class CustomConfig(BertConfig):\n"
        "    model_type = 'custom-bert'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import BertForSequenceClassification\n\n"
        "from .configuration_custom import CustomConfig\n\n\n"
        "class CustomModel(BertForSequenceClassification):\n"
        "    config_class = CustomConfig\n")
    return folder


def test_remote_code_never_runs_without_trust_remote_code(data, remote_code_model, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(marker))
    out = tmp_path / "out"
    assert cli.main(short_run(data, remote_code_model, out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--trust-remote-code" in line and "own Python code" in line
    assert not marker.exists(), "the model folder's code ran although --trust-remote-code was not given"
    assert not out.exists()

    # With the flag the code runs: the option reaches from_pretrained. (In a fresh process, with its own
    # module cache, so this test leaves neither the import nor the copied code behind.)
    done = run_script(short_run(data, remote_code_model, out, "--trust-remote-code"),
                      env={"REMOTE_CODE_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.read_text() == "the model folder ran its own code"


# ------------------------------------------------------------------------------------------ tokens


def test_a_planted_token_reaches_no_file_log_card_report_or_config(data, tmp_path):
    from hub_server import LocalHub

    token = "hf_planted" + secrets.token_hex(16)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"  # a config file as a user writes it; its snapshot lands in the output folder
    config.write_text("recipe: sentiment\nhub_private: true\n")
    with LocalHub() as hub:
        done = run_script(["--config", config, *short_run(data, data["bert"], out, "--push-to-hub", "tester/tiny-sentiment",
                                                          "--hub-endpoint", hub.url)],
                          env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
        assert done.returncode == 0, done.stderr[-3000:]
        assert hub.head("tester/tiny-sentiment"), "the run published to the local Hub"
        assert f"Bearer {token}" in hub.authorizations, "the token was there to leak: the upload used it"
        stored = [p for p in Path(hub.root).rglob("*") if p.is_file()]
        assert stored and not [p for p in stored if token.encode() in p.read_bytes()]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {"run_config.json", "run_summary.json", "metrics.jsonl", "README.md", "eval_report.json"} <= {p.name for p in written}
    leaked = [str(p.relative_to(out)) for p in written if token.encode() in p.read_bytes()]
    assert not leaked, f"the token was written to {leaked}"
    assert token not in done.stdout and token not in done.stderr
    assert token[:12] not in json.dumps(json.loads((out / "run_config.json").read_text()))


# ------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("repo_id", ["../../etc", "tester/../../etc", "/etc/passwd", "tester/tiny/../../x"])
def test_repo_ids_cannot_name_paths(repo_id, data, tmp_path):
    from recipes import RECIPES

    from pipelines.publish import publish_to_hub

    with pytest.raises(UserError, match="invalid repo id"):
        parse_args(["--push-to-hub", repo_id], RECIPES)
    with pytest.raises(UserError, match="invalid repo id"):
        publish_to_hub(data["bert"], repo_id, endpoint="http://127.0.0.1:9")


def test_publishing_refuses_a_link_out_of_the_output_folder(data, tmp_path):
    from pipelines.publish import select_files

    out = tmp_path / "out"
    shutil.copytree(data["bert"], out)
    secret = tmp_path / "secret_token"
    secret.write_text("hf_not_for_the_hub")
    (out / "merged").mkdir()
    (out / "merged" / "config.json").symlink_to(out / "config.json")  # inside the folder: fine
    assert "merged/config.json" in select_files(out)
    (out / "special_tokens_map.json").symlink_to(secret)  # a name publishing selects, leading outside
    with pytest.raises(UserError, match="refusing to publish special_tokens_map.json: it leads to .*outside"):
        select_files(out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

"""--report-to: one tiny run (tiny BERT, real SST-2 rows) reports to TensorBoard, MLflow, W&B and Trackio at once, and
each tracker's own reader gives back what metrics.jsonl and the output folder hold: every training loss and evaluation
at its step, the run's options (without the planted HF_TOKEN the run published with), the final metrics, and the
reports and plots where the tracker keeps files. `--report-to none` writes no TensorBoard folder; an unknown name and
a missing library are one-line errors before any work.

Nothing leaves the machine: MLflow writes a local file store, W&B runs offline, Trackio writes its local database,
every store inside the test's folder, telemetry off; the run publishes to a local Hub-compatible server. The runs call
pipelines.cli.main in this process (what scripts/run.py runs).
"""

import json
import secrets
import struct
import sys

import pytest
from conftest import DATA, read_jsonl, write_jsonl
from test_bad_inputs import follow_capture

from pipelines import cli
from pipelines.config import parse_args
from pipelines.errors import UserError

COMMON = ["--recipe", "sentiment", "--group-by-length", "false", "--bootstrap-samples", "0", "--batch-size", "8",
          "--seed", "3"]
TOKEN = "hf_planted" + secrets.token_hex(16)
LINES = ("train_loss", "eval_accuracy")  # a training line's and an evaluation's value, as metrics.jsonl has them


def offline_tracker_env(root) -> dict:
    """Every tracker's store in `root`, no network, no telemetry, no console capture."""
    return {
        # MLflow's file store: its SQLite default spends seconds creating tables
        "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
        "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true", "WANDB_PROJECT": "project-from-env",  # a user's variable: it must win
        "TRACKIO_DIR": str(root / "trackio"), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("trackers")
    rows = read_jsonl(DATA / "sst2" / "train.jsonl", limit=56)
    (root / "wandb").mkdir()
    with pytest.MonkeyPatch.context() as env:
        for name, value in offline_tracker_env(root).items():
            env.setenv(name, value)
        yield {
            "root": root,
            "model": make_tiny_model("bert", root / "model", task="sequence-classification", num_labels=2),
            "train": write_jsonl(root / "train.jsonl", rows[:24]),
            "validation": write_jsonl(root / "validation.jsonl", rows[24:40]),
            "test": write_jsonl(root / "test.jsonl", rows[40:56]),
        }


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts from no Accelerate state, as a new process would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(world, capsys, name, *extra):
    out = world["root"] / name
    follow_capture()
    code = cli.main([str(a) for a in [*COMMON, "--model", world["model"], "--train-file", world["train"],
                                      "--validation-file", world["validation"], "--output-dir", out, *extra]])
    captured = capsys.readouterr()
    return code, captured.err, out


@pytest.fixture(scope="module")
def reported(world):
    """The run that reports to all four trackers and publishes (with the planted token) to a local Hub."""
    from hub_server import LocalHub

    if "trackio" in sys.modules:  # it reads TRACKIO_DIR once, when imported: it would write elsewhere
        pytest.skip("trackio was imported before this module set TRACKIO_DIR")
    out = world["root"] / "all-trackers"
    follow_capture()
    with LocalHub() as hub:
        code = cli.main([str(a) for a in [
            *COMMON, "--model", world["model"], "--train-file", world["train"],
            "--validation-file", world["validation"], "--test-file", world["test"], "--output-dir", out,
            "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "1", "--report-to", "tensorboard,mlflow,wandb,trackio",
            "--push-to-hub", "tester/tiny-trackers", "--hub-endpoint", hub.url]])
        assert code == 0
        assert f"Bearer {TOKEN}" in hub.authorizations, "the token was there to leak: the upload used it"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "eval_results.json").read_text())
    return {
        "out": out,
        **{name: {r["step"]: r[name] for r in lines if name in r} for name in LINES},
        "final": {f"{split}/{k}": v for split, metrics in results.items() for k, v in metrics.items()
                  if isinstance(v, float)},
        "steps": json.loads((out / "run_summary.json").read_text())["global_step"],
        "config": json.loads((out / "run_config.json").read_text())["config"],  # the options, as the run saved them
    }


def same(logged: dict, expected: dict) -> bool:
    """{step: value} alike (TensorBoard keeps float32)."""
    return logged.keys() == expected.keys() and all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items())


def assert_every_line(logged: dict, reported: dict) -> None:
    """`logged`: name -> {step: value} as a tracker gives it back; every line of metrics.jsonl is there."""
    for name in LINES:
        assert same(logged[name], reported[name]), name


def assert_options(stored: dict, reported: dict, as_text: bool = False) -> None:
    """A tracker's stored config holds the run's options (MLflow keeps them as text)."""
    for name in ("push_to_hub", "learning_rate", "max_steps", "recipe"):
        value = reported["config"][name]
        assert stored[name] == (str(value) if as_text else value), name


def assert_final(at_last_step: dict, reported: dict) -> None:
    """The final metrics of every split (eval_results.json) at the run's last step."""
    assert reported["final"]
    for name, value in reported["final"].items():
        assert at_last_step[name] == pytest.approx(value), name


def test_tensorboard_gets_the_options_every_line_and_the_final_metrics(reported):
    from google.protobuf.json_format import MessageToDict
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    scalars, options = {}, {}
    for events in (reported["out"] / "tensorboard").rglob("events.out.tfevents.*"):
        board = EventAccumulator(str(events))
        board.Reload()
        for tag in board.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in board.Scalars(tag)})
        try:  # add_hparams writes the options into an events file of their own
            start = board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        except KeyError:
            continue
        hparams = HParamsPluginData.FromString(start).session_start_info.hparams
        options.update({name: MessageToDict(value) for name, value in hparams.items()})  # a protobuf Value: as Python
    assert_options(options, reported)
    assert_every_line(scalars, reported)
    assert all(list(scalars[name]) == [reported["steps"]] for name in reported["final"])
    assert_final({name: scalars[name][reported["steps"]] for name in reported["final"]}, reported)


def test_mlflow_gets_the_options_metrics_report_and_plots(reported, world):
    from mlflow import MlflowClient

    client = MlflowClient()  # MLFLOW_TRACKING_URI: the test's file store
    experiment = client.get_experiment_by_name("sentiment")  # the recipe names the experiment
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == reported["out"].name  # the output folder names the run
    history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
               for name in (*LINES, *reported["final"])}
    assert_every_line(history, reported)
    assert all(list(history[name]) == [reported["steps"]] for name in reported["final"])
    assert_final({name: history[name][reported["steps"]] for name in reported["final"]}, reported)
    assert_options(run.data.params, reported, as_text=True)
    stored = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_report.md", "eval_report.json", "eval_results.json", "run_summary.json", "README.md"} <= stored
    assert {p.name for p in reported["out"].glob("*.png")} <= stored and any(s.endswith(".png") for s in stored)


def wandb_records(path):
    """The records of a W&B run file (.wandb): a LevelDB-style log of 32 KiB blocks, each record one or more chunks
    with a 7-byte header (checksum, length, type: 1 full, 2 first, 3 middle, 4 last), after a 7-byte file header
    (":W&B", magic, version), each decoded with wandb's own protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_gets_the_options_metrics_report_and_plots(reported, world):
    (run_dir,) = (world["root"] / "wandb" / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    rows, config, run = {}, {}, None
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(row["_step"], {}).update(row)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":
            run = record.run
    assert run.project == "project-from-env" and run.display_name == reported["out"].name  # WANDB_PROJECT won
    assert_options(config, reported)
    assert_every_line({name: {step: row[name] for step, row in rows.items() if name in row} for name in LINES}, reported)
    last = rows[reported["steps"]]
    assert_final(last, reported)
    plots = sorted(p.stem for p in reported["out"].glob("*.png"))
    assert plots and all(last[f"plots/{stem}/_type"] == "image-file" for stem in plots)
    saved = {p.name for p in (run_dir / "files").iterdir()}
    assert {"eval_report.md", "eval_report.json", "run_summary.json"} <= saved
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == len(plots)


def test_trackio_gets_the_options_metrics_report_and_plots(reported):
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    (run,) = trackio.Api().runs("sentiment")
    assert run.name == reported["out"].name
    assert_options(run.config, reported)
    logs = SQLiteStorage.get_logs("sentiment", reported["out"].name)
    assert_every_line({name: {row["step"]: row[name] for row in logs if name in row} for name in LINES}, reported)
    last = {k: v for row in logs if row["step"] == reported["steps"] for k, v in row.items()}
    assert_final(last, reported)
    assert all(last[f"plots/{p.stem}"]["_type"] == "trackio.image" for p in reported["out"].glob("*.png"))
    (artifact,) = SQLiteStorage.get_artifacts("sentiment")
    files = sorted(p for p in reported["out"].iterdir() if p.suffix == ".png" or p.name in (
        "eval_report.md", "eval_report.json", "eval_results.json", "run_summary.json", "run_config.json", "README.md"))
    assert artifact["type"] == "report" and artifact["size_bytes"] == sum(p.stat().st_size for p in files)


def test_no_tracker_stores_the_planted_token(reported, world):
    root = world["root"]
    stores = [root / "mlruns", root / "wandb", root / "trackio", reported["out"] / "tensorboard"]
    stores += [folder for folder in (root / "wandb-cache", root / "wandb-data") if folder.exists()]
    files = [p for store in stores for p in store.rglob("*") if p.is_file()]
    assert all(any(p.is_relative_to(store) for p in files) for store in stores)
    assert not [str(p.relative_to(root)) for p in files if TOKEN.encode() in p.read_bytes()]


def test_report_to_none_writes_no_tensorboard_folder(world, capsys):
    code, err, out = run(world, capsys, "no-trackers", "--report-to", "none", "--max-steps", "1",
                         "--save-checkpoints", "false")
    assert code == 0, err
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()


def test_names_come_as_a_list_or_a_string_and_none_stands_alone(world, tmp_path):
    from recipes import RECIPES

    from pipelines.trackers import chosen

    config = tmp_path / "run.yaml"
    config.write_text("report_to: [mlflow, wandb]\n")
    assert parse_args(["--config", str(config)], RECIPES).report_to == ["mlflow", "wandb"]
    config.write_text("report_to: none\n")
    assert chosen(parse_args(["--config", str(config)], RECIPES).report_to) == []
    assert chosen(parse_args(["--report-to", "TensorBoard, trackio"], RECIPES).report_to) == ["tensorboard", "trackio"]
    assert chosen(parse_args([], RECIPES).report_to) == ["tensorboard"]  # the default, as before --report-to
    with pytest.raises(UserError, match="give it alone"):
        parse_args(["--report-to", "none,wandb"], RECIPES)


def test_an_unknown_name_is_one_line_before_any_work(world, capsys):
    code, err, out = run(world, capsys, "unknown", "--report-to", "tensorboard,wandbb")
    assert code == 2 and not out.exists()
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: --report-to: unknown tracker 'wandbb'") and "Did you mean 'wandb'?" in line
    assert "tensorboard, mlflow, wandb, trackio" in line


@pytest.mark.parametrize("name,module", [("mlflow", "mlflow"), ("wandb", "wandb"), ("trackio", "trackio")])
def test_a_missing_library_says_how_to_install_it(world, capsys, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` (and importlib's find_spec) see when it is absent
    code, err, out = run(world, capsys, f"missing-{name}", "--report-to", f"tensorboard,{name}")
    assert code == 2 and not out.exists()
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line == f"error: --report-to {name}: the {module} package is not installed: pip install -e .[trackers] " \
                   f"(or pip install {'mlflow-skinny' if name == 'mlflow' else name})"


def test_a_tracker_that_fails_at_the_end_is_a_warning(world, tmp_path, capsys):
    """MLflow refuses a metric name with '&' (a multilabel label could bring one): the run's end warns, and the
    report still goes to the run."""
    from accelerate import Accelerator
    from accelerate.tracking import MLflowTracker
    from mlflow import MlflowClient

    from pipelines import trackers

    acc = Accelerator(cpu=True, log_with=[MLflowTracker("end-failure", run_name="run")])
    trackers.start(acc, {"seed": 1})
    run_id = acc.get_tracker("mlflow", unwrap=True).info.run_id
    (tmp_path / "eval_report.md").write_text("# report\n")
    trackers.log_final(acc, {"test": {"accuracy": 0.5, "f1_r&d": 0.25}}, step=3)
    trackers.log_reports(acc, tmp_path, step=3)
    acc.end_training()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert line.startswith("warning: --report-to mlflow: the final metrics were not logged: MlflowException: ")
    assert [a.path for a in MlflowClient().list_artifacts(run_id)] == ["eval_report.md"]


def test_a_tracker_that_cannot_start_is_one_line(world, monkeypatch):
    from accelerate import Accelerator
    from accelerate.tracking import MLflowTracker

    from pipelines import trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    acc = Accelerator(cpu=True, log_with=[MLflowTracker("no-start", run_name="run")])
    with pytest.raises(UserError, match=r"^--report-to: mlflow could not start a run: \w+: .*nosuchscheme") as error:
        trackers.start(acc, {"seed": 1})
    assert "\n" not in str(error.value)

"""Every Accelerate config in recipes/accelerate/ loads with Accelerate's own classes and holds what the
trainer relies on; the command that heads each file is accepted by `accelerate launch` and run.py.

No GPU needed: the files are read by `load_config_from_file`, the header command goes through
`accelerate launch`'s own parser and validation, and the environment its launcher would hand the
training processes is turned back into Accelerate's FSDP and DeepSpeed plugins, exactly as a
training process does it. The SLURM script runs with stand-ins for srun, scontrol and accelerate.
"""

import os
import shlex
import stat
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO

CONFIGS = REPO / "recipes" / "accelerate"
EXPECTED = {  # file -> (distributed_type, num_machines)
    "single_gpu.yaml": ("NO", 1),
    "multi_gpu_ddp.yaml": ("MULTI_GPU", 1),
    "fsdp.yaml": ("FSDP", 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1),
    "two_machines.yaml": ("MULTI_GPU", 2),
}


def header_commands(path: Path) -> list[list[str]]:
    """The `accelerate launch ...` commands in the file's leading comment block, as argv lists."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if text.startswith("accelerate launch "):
            commands.append(shlex.split(text))
    return commands


def launch_args(argv: list[str]):
    """`accelerate launch` argv -> the namespace its launcher works from, after its own validation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(argv[2:])
    args, defaults, mp_from_config = _validate_launch_command(args)
    return args, defaults, mp_from_config


def launcher_env(args, defaults, mp_from_config) -> dict:
    """The environment `accelerate launch` would give the training processes (nothing is started)."""
    from accelerate.utils import launch as launch_utils

    with mock.patch.object(launch_utils, "is_port_in_use", return_value=False):
        if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before deepspeed_launcher
            fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            return launch_utils.prepare_deepspeed_cmd_env(args)[1]
        if args.use_fsdp or args.multi_gpu:
            return launch_utils.prepare_multi_gpu_env(args)
        return launch_utils.prepare_simple_launcher_cmd_env(args)[1]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tiny_models import make_tiny_model
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("models")
    bert = make_tiny_model("bert", root / "bert", task="sequence-classification", num_labels=2)
    t5 = make_tiny_model("t5", root / "t5", task="seq2seq")
    return {"bert": AutoModelForSequenceClassification.from_pretrained(bert),
            "t5": AutoModelForSeq2SeqLM.from_pretrained(t5)}


def test_the_folder_holds_exactly_the_documented_files():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    assert (CONFIGS / "slurm_example.sbatch").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate_and_has_what_the_trainer_relies_on(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType

    path = CONFIGS / name
    config = load_config_from_file(str(path))  # Accelerate's own loader: unknown keys are an error there
    assert isinstance(config, ClusterConfig)
    distributed_type, machines = EXPECTED[name]
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert config.distributed_type == DistributedType(distributed_type)
    assert config.num_machines == machines
    assert config.use_cpu is False
    # The trainer passes run.py's --mixed-precision to Accelerator, which overrides the file: keep 'no'
    # here so the file never claims a precision the run does not use.
    assert config.mixed_precision == "no"
    if distributed_type == "NO":
        assert config.num_processes == 1
    else:
        assert config.num_processes >= 2 and config.num_processes % machines == 0
    if distributed_type == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2  # original parameters kept: LoRA and frozen layers shard fine
        assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's FULL_SHARD
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # taken from the model's _no_split_modules
        assert fsdp["fsdp_state_dict_type"] in ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
    else:
        assert config.fsdp_config == {}
    if distributed_type == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["zero_stage"] == (3 if "zero3" in name else 2)
        if ds["zero_stage"] == 3:
            # accelerator.get_state_dict (the trainer's final save) raises under ZeRO-3 without it.
            assert ds["zero3_save_16bit_model"] is True
        # The trainer reads parameter shapes before prepare(); zero.Init would leave them empty.
        assert ds["zero3_init_flag"] is False
        # Accumulation and clipping come from run.py's flags, not from this file.
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
        assert "deepspeed_config_file" not in ds  # an optimizer section there would replace the trainer's
    else:
        assert config.deepspeed_config == {}
    if machines > 1:
        assert config.main_process_ip and config.main_process_port
        assert config.machine_rank == 0 and config.rdzv_backend == "static" and config.same_network


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_command_is_accepted_by_accelerate_launch_and_run_py(name, monkeypatch):
    from pipelines.config import parse_args
    from recipes import RECIPES

    monkeypatch.chdir(REPO)  # the commands are run from the repository root
    commands = header_commands(CONFIGS / name)
    assert commands, f"{name} must open with the command that uses it"
    assert len(commands) == (2 if name == "two_machines.yaml" else 1)
    for argv in commands:
        args, defaults, _ = launch_args(argv)
        assert args.config_file == f"recipes/accelerate/{name}"
        assert args.training_script == "scripts/run.py"
        cfg = parse_args(args.training_script_args, RECIPES)  # the run.py half is valid too
        assert cfg.mixed_precision == "bf16"
        assert args.num_processes == {"single_gpu.yaml": 1, "two_machines.yaml": 16}.get(name, 8)
        assert args.use_fsdp == (name == "fsdp.yaml")
        assert args.use_deepspeed == name.startswith("deepspeed")
        assert args.multi_gpu == (name in ("multi_gpu_ddp.yaml", "two_machines.yaml"))


def test_two_machines_commands_differ_only_in_machine_rank():
    first, second = header_commands(CONFIGS / "two_machines.yaml")
    for rank, argv in enumerate((first, second)):
        args, defaults, mp = launch_args(argv)
        assert args.machine_rank == rank and args.num_machines == 2
        launcher_env(args, defaults, mp)  # what torchrun gets: 2 nodes, this node's rank, rank 0's address
        assert args.nnodes == "2" and args.node_rank == rank
        assert args.nproc_per_node == str(defaults.num_processes // 2)
        # torchrun's static rendezvous takes rank 0's address either way (same_network only picks the flag).
        address = f"{args.master_addr}:{args.master_port}" if hasattr(args, "master_addr") else args.rdzv_endpoint
        assert address == f"{defaults.main_process_ip}:{defaults.main_process_port}" == "10.0.0.1:29500"
    strip_rank = [a for a in first if a not in ("0", "1")]
    assert strip_rank == [a for a in second if a not in ("0", "1")]


def test_fsdp_wraps_the_layer_class_each_model_names(tiny_models):
    """The launcher's environment, turned into Accelerate's FSDP plugin as a training process does,
    wraps each model's own transformer layer class: the file needs no per-model class name."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, defaults, mp = launch_args(header_commands(CONFIGS / "fsdp.yaml")[0])
    env = launcher_env(args, defaults, mp)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    with mock.patch.dict(os.environ, env, clear=True):
        for family, layer in (("bert", "BertLayer"), ("t5", "T5Block")):
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert plugin.state_dict_type.name == defaults.fsdp_config["fsdp_state_dict_type"]
            plugin.set_auto_wrap_policy(tiny_models[family])
            wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
            assert layer in wrapped, (family, wrapped)
            assert wrapped == set(tiny_models[family]._no_split_modules)


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_plugin_leaves_clipping_and_accumulation_to_the_trainer(name):
    """The DeepSpeed config Accelerate builds from the launcher's environment (deepspeed itself is not
    needed to build it): the ZeRO stage, 16-bit gathering for the final save under ZeRO-3, and "auto"
    where the trainer fills in --gradient-accumulation-steps and --max-grad-norm."""
    from accelerate.utils import DeepSpeedPlugin

    args, defaults, mp = launch_args(header_commands(CONFIGS / name)[0])
    env = launcher_env(args, defaults, mp)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    stage = 3 if "zero3" in name else 2
    assert ds["zero_optimization"]["stage"] == stage == plugin.zero_stage
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds
    assert plugin.zero3_init_flag is False


def test_slurm_example_launches_one_accelerate_per_node_with_rank_and_address(tmp_path):
    """Run the sbatch script with stand-in srun/scontrol/accelerate: srun starts the task once per
    node with that node's SLURM_NODEID, and each records the `accelerate launch` it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.txt"
    stubs = {
        "scontrol": '[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu-[07-08]" ] && printf "gpu-07\\ngpu-08\\n"',
        # Drop srun's own options, then run the task once per node, as SLURM would.
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit $?; done',
        "accelerate": f'printf "%s\\n" "$(printf "%q " "$@")" >> {shlex.quote(str(record))}',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[07-08]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "1"}
    env.pop("SLURM_NODEID", None)
    script = CONFIGS / "slurm_example.sbatch"
    done = subprocess.run(["bash", str(script), "--config", "recipes/configs/demo.yaml", "--output-dir", "out dir"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [shlex.split(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2
    for rank, argv in enumerate(calls):
        args, defaults, mp = launch_args(["accelerate", *argv])
        assert args.machine_rank == rank
        assert args.main_process_ip == "gpu-07" and args.num_machines == 2 and args.num_processes == 16
        assert args.training_script == "scripts/run.py"
        assert args.training_script_args == ["--config", "recipes/configs/demo.yaml", "--output-dir", "out dir"]
        launcher_env(args, defaults, mp)
        assert args.node_rank == rank and args.master_addr == "gpu-07" and args.nproc_per_node == "8"
    header = script.read_text().splitlines()[1]
    assert header.startswith("# sbatch recipes/accelerate/slurm_example.sbatch")

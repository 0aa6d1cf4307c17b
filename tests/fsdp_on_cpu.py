"""Run a script under FSDP on the CPU, for tests: `accelerate launch --config_file recipes/accelerate/fsdp.yaml
--num_processes 2 tests/fsdp_on_cpu.py scripts/run.py ...`.

Accelerate (1.15, 1.16) starts FSDP only when the processes use an accelerator device: an Accelerator made with
cpu=True (what the trainer makes without CUDA) becomes MULTI_CPU, i.e. plain DDP, and the trainer refuses to train
an FSDP config that way (pipelines/distributed.py, check_engine_started). torch's FSDP2 itself shards CPU tensors
over gloo. This shim lifts exactly that one decision: when Accelerate was handed an FSDP plugin and chose
MULTI_CPU, the state says FSDP. Everything else is the real code: Accelerate's FSDP2 preparation, its sharded
checkpoints and full-state-dict gathering, and the trainer.
"""

import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = sys.argv[1:]  # the script and its arguments, as if launched directly
    runpy.run_path(sys.argv[0], run_name="__main__")

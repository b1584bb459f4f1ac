"""align: RLHF and preference alignment with humans in the loop. The library the recipes share."""

import os

__version__ = "0.1.0"

# Where a launcher puts this process's rank and the number of processes, in accelerate's order (its multi-CPU
# state reads them so: accelerate.utils.environment.get_cpu_distributed_information): torchrun's and DeepSpeed's
# RANK, then MPI's (Intel MPI and MPICH, Open MPI, MVAPICH), which `accelerate launch --cpu --mpirun_hostfile`
# gives instead; accelerate copies the rank into RANK only once its state exists. Read here rather than asked of
# accelerate: the CLI sets up its log before torch is imported, and asking would open the process group.
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _launcher_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value and int(value) >= 0:
            return int(value)
    return default


def process_rank() -> int:
    """This process's rank under `accelerate launch` (torchrun, DeepSpeed or mpirun); 0 for a plain process."""
    return _launcher_int(RANK_VARS, 0)


def process_count() -> int:
    """How many processes the launcher started (1 for a plain process)."""
    return _launcher_int(WORLD_SIZE_VARS, 1)


class StageError(RuntimeError):
    """A stage refusing to go on, with a message that says why and what to do about it."""


def refuse_several_processes(stage: str, why: str) -> None:
    """Stop `align <stage>` under `accelerate launch` (several processes) with `why` it runs as one: a stage that
    neither splits its work nor writes from one rank alone would do it all once per process, into one folder."""
    if process_count() > 1:
        raise StageError(f"align {stage} runs as one process ({why}): run it without accelerate launch")


_said: set[tuple] = set()


def said_once(say, message: str, *args) -> None:
    """`say(message, *args)` (a logger's warning) the first time this process has it to say: a warning that the
    preflight checks and then the stage itself come to (both read the prompts file) is printed once."""
    if (message, args) not in _said:
        _said.add((message, args))
        say(message, *args)

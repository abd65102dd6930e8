"""Data-parallel training under torchrun: one process per GPU (nccl), or per CPU process (gloo).

    torchrun --standalone --nproc_per_node 2 train.py --epochs 3 --amp

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them (`python train.py`, a notebook cell)
every function here is a no-op for a world of one process. Rank 0 evaluates, writes the files and
prints; every rank trains on its share of each global batch, and DistributedDataParallel averages
the gradients.

Collectives (every process must make the same call at the same point, or all wait forever):
rank_zero_first, wrap, the backward of a synced micro-batch, and every function named all_* or
broadcast_*. train.run() makes each of them itself, where a reader sees it.
"""
import os
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from basics import UserError
from common import pick_device

_flags_group = None  # gloo: all_max (the per-step stop flag) runs on the CPU
_setup_group = None  # gloo, with a timeout that fits rank 0's downloads: rank_zero_first's barrier
SETUP_TIMEOUT_MINUTES = 60  # bert-large (1.3 GB) at 1 MB/s takes 22; NCCL's own timeout is 10


def init(device_flag):
    """-> (rank, world_size, device). Under torchrun: joins the process group, one GPU per
    LOCAL_RANK (nccl), or the CPU (gloo) with --device cpu or on a machine without GPUs."""
    global _flags_group, _setup_group
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_flag)
    if device_flag not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device_flag}: under torchrun each process takes the GPU of "
                        f"its LOCAL_RANK; pass --device cuda (or cpu)")
    use_cuda = device_flag != "cpu" and torch.cuda.is_available()
    if device_flag == "cuda" and not use_cuda:
        raise UserError("--device cuda: no CUDA GPU is available")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    _flags_group = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    _setup_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=setup_timeout()))
    return dist.get_rank(), dist.get_world_size(), device


def setup_timeout():
    """Minutes the other processes wait for rank 0's set-up: AGNEWS_SETUP_TIMEOUT_MINUTES, or 60."""
    text = os.environ.get("AGNEWS_SETUP_TIMEOUT_MINUTES", str(SETUP_TIMEOUT_MINUTES))
    try:
        minutes = float(text)
    except ValueError:
        minutes = 0
    if not minutes > 0:
        raise UserError(f"AGNEWS_SETUP_TIMEOUT_MINUTES={text}: not a number of minutes > 0")
    return minutes


def finish():
    """Leaves the process group and lets go of this module's groups, so that their gloo threads
    end here. Ended by the interpreter's exit instead, they now and then abort the process
    ("terminate called without an active exception", SIGABRT; seen on rank 1, which ends while
    rank 0 still tests)."""
    global _flags_group, _setup_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _flags_group = _setup_group = None


def wrap(model, device):
    """Collective. DistributedDataParallel around the model under torchrun (it starts every rank
    from rank 0's weights), else the model itself."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sync_unless(train_model, last_micro_batch):
    """DDP all-reduces the gradients in backward: on the step's last micro-batch only."""
    if isinstance(train_model, DistributedDataParallel) and not last_micro_batch:
        return train_model.no_sync()
    return nullcontext()


@contextmanager
def rank_zero_first():
    """Collective (a barrier). Rank 0 runs the block first (a download, a tokenizer cache) and
    the others then find it done. They wait on gloo, for setup_timeout() minutes (a download on a
    slow link takes longer than NCCL's 10), then stop with one line that says so."""
    if dist.is_initialized() and dist.get_rank() != 0:
        try:
            dist.barrier(group=_setup_group)
        except RuntimeError as err:  # gloo's "Timed out waiting ...", or rank 0 is gone
            if "timed out" not in str(err).lower():
                raise UserError(f"rank {dist.get_rank()}: rank 0 ended during the set-up (its "
                                f"error says why)") from None
            raise UserError(f"rank {dist.get_rank()} waited {setup_timeout():g} minutes for rank "
                            f"0 to read the data and load --model; if it is downloading them, "
                            f"set AGNEWS_SETUP_TIMEOUT_MINUTES to wait longer (the default is "
                            f"{SETUP_TIMEOUT_MINUTES})") from None
    yield
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier(group=_setup_group)


@contextmanager
def print_on_rank_zero():
    """The other ranks' output (prints, warnings) goes nowhere: one log, not one per process. An
    error that ends a process is still shown: it is printed after this block."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        yield
        return
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), redirect_stderr(devnull):
        yield


def broadcast_from_rank0(value):
    """Collective. Rank 0's value (any picklable object) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value):
    """Collective. [every rank's value], in rank order."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_sum(tensor):
    """Collective. The tensor summed over the ranks (in place)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_max(number):
    """Collective. The largest of the ranks' integers, on the CPU (gloo), never a GPU sync."""
    if not dist.is_initialized():
        return number
    flag = torch.tensor([number])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_flags_group)
    return int(flag)

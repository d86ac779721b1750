"""How many torch CPU threads each thread of a run uses.

On CPU a run does tensor work in several threads at once: the caption and the filter stage (each in its own
thread, see capfilt.background) and the decode workers (preprocessing). Left alone, each of them starts
torch's intra-op pool at its default size, one thread per core: a bootstrap run on 2 cores then has 6 threads
on 2 cores, which wait for one another at every parallel op. So the model stages split the cores between
them, and the decode workers, which already work on one image each side by side, use one thread each.

torch's intra-op thread count belongs to the calling thread (with OpenMP, torch's CPU backend: each thread has
its own count, and a thread that has not run a parallel op yet starts with the last count set anywhere), so
each thread sets its own with `use_threads`.
"""

from __future__ import annotations

import torch


def model_stage_threads(requested: int | None, model_stages: int, device: str) -> int | None:
    """Torch threads for each model stage: `requested`, else on CPU the threads torch gives the calling thread
    (a core each, or OMP_NUM_THREADS) split evenly between the model stages; on a GPU, where the host threads
    only launch kernels, None (torch's default)."""
    if requested is not None:
        return requested
    if torch.device(device).type != "cpu":
        return None
    return max(1, torch.get_num_threads() // max(1, model_stages))


def decode_worker_threads(device: str) -> int | None:
    """Torch threads for each decode worker: one on CPU, where the cores are the model stages'; else None."""
    return 1 if torch.device(device).type == "cpu" else None


def use_threads(count: int | None) -> None:
    """Set the calling thread's torch intra-op thread count; None leaves it as it is."""
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)

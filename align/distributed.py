"""A training loop of our own under `accelerate launch`: this process's share and the sync between processes.

TRL's trainers (sft, reward, dpo, grpo/rloo) are distributed by transformers' Trainer. Align's own
PPO loop (align/recipes/ppo.py) is not a Trainer, so it splits its work and averages its gradients with
`Ranks`; a plain single process is rank 0 of 1 and every method is then a no-op.
"""

from __future__ import annotations

import torch

from align import StageError, process_count, process_rank


class Ranks:
    """This process's share of the PPO loop under `accelerate launch`; one process is rank 0 of 1.

    The loop is written here, not by a trainer, so it does its own data split and gradient sync:
    each rank samples rollout_prompts / world prompts, and the LoRA and value-head gradients are
    averaged with one all-reduce (gloo on CPU, NCCL on GPU) before every optimizer step.
    """

    def __init__(self) -> None:
        self.world = process_count()
        self.rank = process_rank()
        self.device = torch.device("cpu")
        if self.world > 1:
            import datetime

            from accelerate import PartialState
            from transformers import TrainingArguments

            # the process group, from the launcher's environment, with the Trainer stages' timeout: opened first
            # here, NCCL's 10-minute default held for the whole stage, and rank 0 merging a large SFT adapter
            # for the reward model (merged_once) outlasted it while the others waited at the barrier
            self.device = PartialState(timeout=datetime.timedelta(seconds=TrainingArguments.ddp_timeout)).device

    def share(self, items: list) -> list:
        return items[self.rank::self.world]

    # torch.distributed directly, not accelerate.utils.reduce/gather: under the CPU launch config
    # (MULTI_GPU without CUDA) PartialState opens the process group but reports DistributedType.NO,
    # and accelerate's helpers then return this rank's values unreduced.
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.world == 1 else self.total(values) / self.world

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over every rank (each rank gets the sum)."""
        if self.world == 1:
            return values
        where = values.device
        values = values.detach().to(self.device, copy=True)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(values)
        return values.to(where)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set in any process, the same answer in every one. A check that stops the run asks
        it: when one process stopped alone, the others failed in their next collective with torch.distributed's
        traceback (gloo; NCCL, not run here, may wait there instead) before the launcher killed them."""
        if self.world == 1:
            return flag
        return self.total(torch.tensor([float(flag)])).item() > 0

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` (same shape on each), concatenated in rank order."""
        if self.world == 1:
            return values
        where, values = values.device, values.detach().to(self.device).contiguous()
        parts = [torch.empty_like(values) for _ in range(self.world)]
        torch.distributed.all_gather(parts, values)
        return torch.cat(parts).to(where)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.mean(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p).to(p.dtype)

    def check_in_sync(self, params: list[torch.Tensor]) -> None:
        """Stop if the ranks' weights differ: the saved adapter (rank 0's) would not be what all trained."""
        if self.world == 1:
            return
        flat = torch.cat([p.detach().float().reshape(-1) for p in params]).to(self.device)
        spread = flat.clone()
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        lowest = flat.clone()
        torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
        gap = (spread - lowest).abs().max().item()
        if gap > 0:
            raise StageError(f"the {self.world} processes ended with different weights (max difference {gap:.3g}); "
                             "the gradient average did not keep them in sync")

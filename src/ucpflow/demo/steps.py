"""What every demo trainer does on its ranks after the model is built: an optimizer step that reports the
loss averaged over all ranks, and the losses written for the process that launched the run."""

import json
from pathlib import Path


def optimizer_step(engine, loss) -> float:
    """Backward and step on this rank's `loss`; returns the loss averaged over all ranks."""
    import torch.distributed as dist

    engine.backward(loss)
    engine.step()
    mean_loss = loss.detach().float().clone()
    dist.all_reduce(mean_loss)
    return mean_loss.item() / dist.get_world_size()


def write_losses(losses_out: Path | None, losses: list[float]) -> None:
    """Rank 0 writes the losses as JSON to `losses_out` (nothing when it is None)."""
    import torch.distributed as dist

    if losses_out is not None and dist.get_rank() == 0:
        losses_out.parent.mkdir(parents=True, exist_ok=True)
        losses_out.write_text(json.dumps(losses) + "\n")

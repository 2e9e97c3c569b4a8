"""Training: the loop and the components it drives, each with one job.

* :mod:`.trainer`       the loop: data -> model -> forward/backward schedule -> optimizer -> metrics/checkpoints
* :mod:`.parallel`      torch.distributed + megatron parallel state, seeds (torchrun / SLURM / one process)
* :mod:`.optimizer`     megatron DDP, optimizer (adamw | muon | symmetric), LR schedule
* :mod:`.symmetric`     symmetry-compatible update rules on megatron's Muon (docs/optimizers.md)
* :mod:`.param_groups`  parameter classes and their per-class rule / lr / weight decay
* :mod:`.checkpoint`    dist_checkpointing save/load (atomic rename + ``latest``), resume decisions, one-process loads
* :mod:`.metrics`       console line, metrics.jsonl, TensorBoard, wandb; what one log step reports
* :mod:`.instruments`   router hooks: load, MaxVio, dead experts, coupling score, routing trace
* :mod:`.finite`        non-finite checks in O(1) memory (answers left on the device), the NaN policy
* :mod:`.orphans`       helper processes (the checkpoint writer's) die with their rank

Imports point down to :mod:`moe_erc.model`, :mod:`moe_erc.data`, the config and compat, never up to
:mod:`moe_erc.commands`.
"""

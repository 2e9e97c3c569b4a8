"""The ``moe-erc`` subcommands other than ``train`` and ``preprocess``: one module each, a layer above training.

* :mod:`.plan`       ``moe-erc plan``: parameters, memory per rank, FLOPs and ERC share of a config (meta device)
* :mod:`.report`     ``moe-erc report``: figures and report.md from run directories
* :mod:`.analyze`    ``moe-erc analyze``: post-hoc ERC loss, eps, norms, ``M`` heat-maps of a checkpoint
* :mod:`.study`      ``moe-erc study``: every method x seeds, post-hoc analysis, claims and figures
* :mod:`.export`     ``moe-erc export``: a checkpoint as a transformers model directory
* :mod:`.hf_import`  ``moe-erc import``: a transformers checkpoint (or an upcycled dense one) as a moe-erc checkpoint
* :mod:`.evaluate`   ``moe-erc eval``: lm-evaluation-harness tasks on a checkpoint
* :mod:`.budget`     kernel launches and host syncs of one step, counted on CPU (``benchmarks/step_budget.py``)

``train`` is :mod:`moe_erc.training.trainer` (the torchrun entry point is :mod:`moe_erc.train`); ``preprocess``
is :mod:`moe_erc.data.preprocess`, beside the data it writes.
"""

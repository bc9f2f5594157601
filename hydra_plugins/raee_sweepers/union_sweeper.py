"""``hydra/sweeper=union``: one multirun made of several sweeps, each a product like Hydra's basic sweeper.

Hydra's basic sweeper runs the product of every swept key, which cannot say "entropy with these
thresholds, patience with those values, and the full model once". This one takes a list of such
products and runs their union (duplicates once), e.g. in an experiment config::

    defaults:
      - override /hydra/sweeper: union
    hydra:
      sweeper:
        params: {data: bbcnews,rotten_tomatoes}      # shared: a product with every sweep below
        sweeps:
          - {exit: full,oracle}
          - {exit: entropy, exit.threshold: 0.1,0.3,0.6}
          - {exit: patience, exit.patience: 1,2,3}

Overrides on the command line apply to every job and win over the config's (``python -m raee.run -m
+experiment=pareto data=imdb``). Everything else (job directories, launcher, batching) is the basic sweeper's.
"""

# no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


@dataclass
class UnionSweeperConf:
    _target_: str = "hydra_plugins.raee_sweepers.union_sweeper.UnionSweeper"
    max_batch_size: Any = None
    params: Any = None  # {key: values} shared by every sweep
    sweeps: Any = field(default_factory=list)  # [{key: values}, ...]: the union of their products


ConfigStore.instance().store(group="hydra/sweeper", name="union", node=UnionSweeperConf, provider="raee")


class UnionSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 sweeps: Optional[List[Dict[str, str]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.sweeps = [dict(s) for s in (sweeps or [])] or [{}]
        self._arguments: List[str] = []

    def sweep(self, arguments: List[str]) -> Any:
        self._arguments = list(arguments)
        return super().sweep(arguments)

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """Hydra's basic sweeper calls this with the shared params and the command line; the union of each
        sweep's product (shared params, then the sweep's, then the command line: later keys win) replaces it."""
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        shared = [f"{k}={v}" for k, v in (self.params or {}).items()]
        jobs: List[List[str]] = []
        seen = set()
        for entry in self.sweeps:
            items = [*shared, *(f"{k}={v}" for k, v in entry.items()), *self._arguments]
            (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(items), None)
            for job in batch:
                if tuple(job) not in seen:
                    seen.add(tuple(job))
                    jobs.append(job)
        if max_batch_size is None:
            return [jobs]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

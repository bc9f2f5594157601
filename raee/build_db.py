"""Build the RAEE exit database: ``python -m raee.build_db`` (same config groups as raee.run).

Runs the backbone with its head once over the training split (or ``db.fraction`` of it) and
writes keys, per-layer predictions and the index to ``db.dir`` (default: the cache directory
that ``exit=raee`` looks in, so a following ``python -m raee.run exit=raee`` picks it up).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from raee.run import CONF_DIR


def build(cfg: DictConfig) -> str:
    from hydra.utils import instantiate

    from raee.exits.raee_exit import RaeeExit
    from raee.experiment import prepare_head

    backbone = instantiate(cfg.backbone)
    head = instantiate(cfg.head)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    prepare_head(backbone, head, datamodule, cache_dir=cfg.paths.cache_dir)
    # the same locate-build-save path that exit=raee uses, forced to build
    raee = RaeeExit(instantiate(cfg.key_encoder), instantiate(cfg.retriever), instantiate(cfg.aggregator),
                    database=cfg.db.dir, fraction=cfg.db.fraction, seed=cfg.db.seed, rebuild=True,
                    tolerance=cfg.regression_tolerance)
    raee.fit(backbone, head, datamodule, cache_dir=cfg.paths.cache_dir)
    db = raee.db
    directory = db.meta["path"]
    correct_any = db.info.correct.any(1).float().mean().item()
    print(f"exit database: {db.size} examples, {backbone.num_layers + 1} layers, key dim {db.keys.shape[1]}, "
          f"{correct_any:.1%} have a correct layer -> {directory}")
    return str(directory)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    build(cfg)


if __name__ == "__main__":
    main()

"""Training: AR pretraining and TiDAR conversion of ZAYA1 models (configs, optimizer, train step, checkpoints,
loop, evaluation, ablations). Entry points: ``zaya train``, ``python -m zaya.train.ablate``,
``python -m zaya.train.evaluate``."""

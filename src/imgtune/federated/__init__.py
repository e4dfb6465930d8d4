"""Federated training on Flower: each site trains on its own images, only model parameters travel.

- ``site.py``: what a site does with its folder (open it under the coordinator's class list, train
  the travelling part of the model for a few local epochs, measure it on its val split); no Flower.
- ``coordinator.py``: the rounds, the Flower strategy, the pooled metrics and the run folder.
- ``apps.py``: the Flower ``ServerApp`` that carries the coordinator; ``client.py``: the ``ClientApp``
  that carries a site, and the audit mod that records what a site sends.
- ``secagg.py``: secure aggregation (Flower's SecAgg+) on both sides.
- ``launch.py``: the Flower processes (SuperLink, SuperNodes, ``flwr run``) on this machine.

docs/federated.md says what travels, and how to run three sites on three machines.
"""

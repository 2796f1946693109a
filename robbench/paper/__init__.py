"""The paper layer: what robbench adds on top of the harness to reproduce Camuto et al. (2021).

``reproduce`` runs the ready configs in ``configs/``, ``report`` writes the report with ``figures``
and checks the paper's ``claims``. Unlike the harness (everything else in ``robbench``), this package
knows the built-in plugins by name: it reads the metrics of ``margin``, ``bound``, ``damage``, ...
"""

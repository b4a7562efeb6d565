"""Integrations of the GRAO loss into other training libraries.

``grao_fast.integrations.trl``: :class:`GRAOTrainer` and :class:`GRAOConfig`, a drop-in
subclass of TRL's ``GRPOTrainer``. Import it from its module; TRL is an optional dependency
(``pip install grao-fast[trl]``), so this package imports nothing on its own.
"""

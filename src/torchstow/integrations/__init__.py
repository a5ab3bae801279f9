"""Integrations of torchstow with training frameworks (each needs its framework installed).

- :mod:`torchstow.integrations.lightning`: Lightning ``CheckpointIO`` plugins
  (``pip install 'torchstow[lightning]'``).
"""

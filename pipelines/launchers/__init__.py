"""Launchers turn one curriculum stage into a running ``torchrun`` job (local or Kubeflow)."""

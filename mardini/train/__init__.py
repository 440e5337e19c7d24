"""The trainer: one curriculum stage per DeepSpeed ZeRO-3 job (``python -m mardini.train``)."""

"""Ray Train: the stages on the driver (supernet training, retraining, seeds; :mod:`.runs`) and the
worker loop every Ray Train worker runs (:mod:`.worker`).  Above ``interop`` and ``search``.
"""

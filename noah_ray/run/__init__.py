"""Running commands: the one validation pass (:mod:`.preflight`), the stage pipeline with its
lease (:mod:`.pipeline`) and sweeps over datasets (:mod:`.sweep`).  Above ``hpo``.
"""

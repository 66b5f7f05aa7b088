"""Hyper-parameter search of retraining (Ray Tune + Optuna TPE + ASHA): the driver
(:mod:`.driver`) and one Tune trial with its tables (:mod:`.trial`).  Above ``train``.
"""

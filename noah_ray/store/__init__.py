"""Job storage: local directories or ``s3://`` through pyarrow filesystems (:mod:`.storage`), the one
layout under ``<storage>/<job>/`` (:mod:`.layout`), Parquet schemas (:mod:`.tables`), the searcher's
state log (:mod:`.statelog`), the typed run records ``spec.json`` / ``meta.json`` (:mod:`.records`),
the one-run-per-job lease (:mod:`.lease`), result queries (:mod:`.results`) and optional MLflow
tracking (:mod:`.tracking`).

Beside ``evolution`` (the two never import each other), above ``config``.  No torch.
"""

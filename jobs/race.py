"""``python -m jobs.race --config X.yaml``: race the search's finalists and the hand-sized baselines
(ASHA); the survivor is what ``jobs.retrain`` trains."""

from jobs import run

if __name__ == "__main__":
    raise SystemExit(run("race"))

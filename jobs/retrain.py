"""``python -m jobs.retrain --config X.yaml``: retrain the searched subnet and the baselines over the job's seeds."""

from jobs import run

if __name__ == "__main__":
    raise SystemExit(run("retrain"))

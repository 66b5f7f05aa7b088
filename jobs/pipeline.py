"""``python -m jobs.pipeline --config X.yaml``: supernet -> search -> race -> retrain, each stage resuming from what
storage holds."""

from jobs import run

if __name__ == "__main__":
    raise SystemExit(run("pipeline"))

"""``python -m jobs.hpo --config X.yaml [--method M]``: the hyper-parameter search of the job's ``hpo:`` section."""

from jobs import run

if __name__ == "__main__":
    raise SystemExit(run("hpo"))

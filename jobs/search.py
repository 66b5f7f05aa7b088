"""``python -m jobs.search --config X.yaml``: search the trained supernet for the best subnet under the parameter
limit (resumes)."""

from jobs import run

if __name__ == "__main__":
    raise SystemExit(run("search"))

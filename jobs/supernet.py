"""``python -m jobs.supernet --config X.yaml``: train the job's supernet (resumes from its last checkpoint)."""

from jobs import run

if __name__ == "__main__":
    raise SystemExit(run("supernet"))

"""``python -m jobs.sweep --config X.yaml``: the pipelines of every dataset a sweep file names, concurrently on
the cluster."""

from noah_ray.cli.main import sweep_main

if __name__ == "__main__":
    raise SystemExit(sweep_main())

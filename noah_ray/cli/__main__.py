"""``python -m noah_ray.cli``: the ``noah-ray`` command."""

import sys

from noah_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

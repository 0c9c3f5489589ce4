"""``python -m fastcl``: the same command line as the ``fastcl`` console script."""
from fastcl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m quantkern``: the same command line as the ``quantkern`` script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

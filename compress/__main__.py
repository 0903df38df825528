"""`python -m compress ...`: the `compress` command, for where its script is not on PATH (a venv not activated)."""
import sys

if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main())

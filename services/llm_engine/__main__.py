"""`python -m llm_engine` runs the `llm-engine` CLI."""

import sys

from llm_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())

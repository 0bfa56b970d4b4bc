"""`python -m llm_gateway` runs the `llm-gateway` CLI (`python -m llm_gateway.serve` runs llm-serve)."""

import sys

from llm_gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())

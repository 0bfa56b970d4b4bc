import sys

from llm_trainer.cli import main

sys.exit(main())

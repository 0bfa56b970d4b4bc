from llm_trainer.cli import main

main()

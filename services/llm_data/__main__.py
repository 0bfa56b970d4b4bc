from llm_data.cli import data_main

data_main()

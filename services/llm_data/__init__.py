"""`llm-data` and `llm-tokenizer`: prepare token shards and train tokenizers."""

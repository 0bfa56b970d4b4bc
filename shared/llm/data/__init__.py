"""Data: tokenizers, text sources, token shards, pretraining and SFT datasets, the DataModule.

tokenizers   BaseTokenizer protocol, SimpleCharacterTokenizer, HFTokenizer, load_tokenizer
bpe          train a byte-level BPE (`llm-tokenizer train`)
sources      text files, globs, JSONL fields, Parquet columns, saved `datasets`
prepare      text -> memory-mapped token shards (`llm-data prepare`); encoding, fastbpe
shards       shard format, index, TokenShards reader, fingerprint check
pretrain     next-token windows and the validation split over shards
sft          chat JSONL -> ids with an assistant-only loss mask; packing: rows, masks
datamodule   DataConfig and TextDataModule (rank-aware, exactly resumable)
corpus       the default corpus (Python's reference docs) and plain text files as documents
"""

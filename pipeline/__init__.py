"""batchgen: offline batch inference over datasets with vLLM, into sharded, resumable Parquet."""

__version__ = "0.1.0"

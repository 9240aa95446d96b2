"""Reuse of earlier outputs (`--reuse DIR`) and one generation per distinct request.

keys.py    the request key of a row: a digest of everything that decides its output
index.py   the per-shard key index written at commit, and the merged, sorted index a run
           builds of a --reuse folder to look keys up without holding them in memory
lookup.py  --reuse folders: checks, lookups in batches, reused rows read back from shards
dedup.py   identical requests within one run generated once and written to each row
"""

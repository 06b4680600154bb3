"""What a run keeps, and what a rerun trusts. `writer` owns the write-ahead log and the Parquet parts;
`answered` the resume state (`RowStates`: each row's last record, its prompt hash, and the row-state
words); `final` writes the output file from input and records; `guard` the run lock, the job's
fingerprint and the run mark. Imports `records`, `replies`, `input`, `storage`, the resolved job's types
(`plan`) and the leaves, never the executors above it.
"""

"""The Batch API executor: rows go to the provider in files and come back in its result files.
`answerer` submits, polls, downloads and merges; `ledger` records every file, upload and batch so a
killed run finds its batches again and never pays for a row twice. Uses the online stage's client
and failure classes (`online`), and `plan`, `money`, `checkpoint` below it.
"""

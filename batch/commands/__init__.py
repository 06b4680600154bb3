"""The read-only commands besides `run`: `status` (what a checkpoint holds), `estimate` (what a job would
cost), `export` (the final file as CSV or JSONL). Each reads the checkpoint, the ledger and the input,
and writes nothing to the checkpoint. Imports the stages below; only the runner, the API and the
command line import it.
"""

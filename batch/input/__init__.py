"""Reading the input table and turning rows into requests. `reader` streams a CSV, JSONL or Parquet file in
Arrow batches (ids checked, text columns made plain `string`, the file's identity watched for edits);
`prompts` renders a row's prompt or messages and bounds its tokens. Imports only the leaves (`errors`,
`config`, `logs`).
"""

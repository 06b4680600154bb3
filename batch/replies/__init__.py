"""What a reply becomes. `columns` parses a reply as JSON and turns its keys into typed columns of the final
file; `schema` resolves `output.json_schema`, says how it is asked for, and validates replies against it.
Imports `input` (the prompt note) and the leaves.
"""

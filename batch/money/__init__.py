"""What a run may spend and what it need not pay for. `budget` holds every request's worst case before it
is sent and settles it on the answer; `cache` is the local SQLite answer cache. Imports `records`,
`pricing`, the resolved job's types (`plan`) and the leaves.
"""

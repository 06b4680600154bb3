"""The online executor: one request per row over aiohttp. `answerer` takes rows from the executor and asks
the `pool`, which sends them under `limits` (rate and token buckets, the adaptive in-flight limit), with
retries classified by `failures` (business codes first), the `breaker` for an endpoint that stopped
answering, and `client`/`sse` to send a request and read its body or stream. Imports `plan`,
`executor`, `money`, `checkpoint` and below, never `batch_api` or the runner.
"""

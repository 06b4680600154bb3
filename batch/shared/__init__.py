"""The account's limits shared by every process that runs against it (`limits.shared: redis://...`), through Redis:
`connection` (the URL, its password kept secret, the client, the link's outages), `leases` (in-flight slots as
leases with a TTL), `rates` (requests and tokens per minute through the `limits` library's Redis storage) and
`spend` (the budget's holds and spending as counters). Imports `config`, `logs`, `errors` and below.
"""

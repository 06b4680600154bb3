"""A local OpenAI-compatible server for the demo, the tests and trying out a job without a key.

`python -m batch.simulator --help` for the command line. `server` is the HTTP server (chat completions,
streams, faults by marker), `batches` its Batch API, `answers` what the simulated model answers (pure
functions of the request), `config` its settings. The runtime never imports this package: only the
`batch simulate` command starts it. The names below are its API for your own tests.
"""

from batch.simulator.answers import answer_for, completion_for, count_tokens, json_answer_for, reply_marker
from batch.simulator.config import SimConfig
from batch.simulator.server import Simulator, SimulatorThread, main

__all__ = ["SimConfig", "Simulator", "SimulatorThread", "answer_for", "completion_for", "count_tokens",
           "json_answer_for", "main", "reply_marker"]

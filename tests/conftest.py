"""Fixtures: a real simulator on 127.0.0.1, job files in a temp folder, the real CLI (helpers.py has the rest)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from bucket_helpers import (
    BUCKETS,
    AzureContainer,
    Emulator,
    GCSBucket,
    OSSBucket,
    start_azurite,
    start_fake_gcs_server,
)
from helpers import DATA, RedisServer
from hypothesis import settings
from s3_helpers import S3Bucket

from batch.cli import main
from batch.config import dump_job
from batch.simulator import SimConfig, SimulatorThread

# Tests never fail on wall-clock time: no per-example deadline (two test processes share two cores).
settings.register_profile("batch", deadline=None, max_examples=100)
settings.load_profile("batch")


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimulatorThread]]:
    """Start simulators with the given SimConfig fields; all are stopped after the test."""
    started: list[SimulatorThread] = []

    def start(**config: Any) -> SimulatorThread:
        sim = SimulatorThread(SimConfig(**config))
        sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(start_sim: Callable[..., SimulatorThread]) -> SimulatorThread:
    return start_sim()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (helpers.RedisServer), stopped after it."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    yield server
    server.stop()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def fresh_logging() -> Iterator[logging.Logger]:
    """The "batch" logger as a program that never configured it has it (the command line's setup_logging, run by
    earlier tests in this process, leaves it set); put back afterwards."""
    logger = logging.getLogger("batch")
    before = logger.level, logger.propagate, logger.handlers[:], logger.filters[:]
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    logger.handlers[:] = []
    logger.filters[:] = []
    yield logger
    logger.setLevel(before[0])
    logger.propagate = before[1]
    logger.handlers[:], logger.filters[:] = before[2], before[3]


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a job file into tmp_path pointing at `sim`; `input_file` is copied from data/ or given as rows."""

    def make(sim: SimulatorThread | None = None, *, rows: list[dict[str, Any]] | None = None,
             input_file: str = "reviews.csv", **overrides: Any) -> Path:
        if rows is not None:
            input_path = tmp_path / input_file
            frame = pd.DataFrame(rows)
            if input_file.endswith(".csv"):
                frame.to_csv(input_path, index=False)
            elif input_file.endswith(".parquet"):
                frame.to_parquet(input_path, index=False)
            else:
                frame.to_json(input_path, orient="records", lines=True, force_ascii=False)
        else:
            shutil.copy(DATA / input_file, tmp_path / input_file)
        job: dict[str, Any] = {
            "name": "test-job",
            "input": {"path": input_file, "id_column": "review_id"},
            "prompt": {"template": "Classify: {text}"},
            "model": {"provider": "local", "name": "glm-4-flash",
                      "base_url": sim.url if sim else "http://127.0.0.1:9/v1", "params": {"max_tokens": 64}},
            "limits": {"concurrency": 4, "timeout_s": 10},
            "retry": {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
            "output": {"path": "out/result.parquet", "keep_columns": ["text"]},
        }
        job = deep_merge(job, overrides)
        path = tmp_path / "job.yaml"
        path.write_text(dump_job(job), encoding="utf-8")
        return path

    return make


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `batch ...` in-process through the real entry point; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port) for this test process, recording every request it is sent
    (moto's recorder: method, URL, headers) into a file; its endpoint URL.

    moto checks a write's condition (If-None-Match, If-Match) and then writes, in two steps; S3 does both at once.
    Its requests are handled one at a time, so two racing writers meet the atomic conditional writes S3 gives."""
    import io
    import os
    import threading

    # The recorder reads where to write when moto is imported: before the import.
    os.environ["MOTO_RECORDER_FILEPATH"] = str(tmp_path_factory.mktemp("moto") / "requests.jsonl")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def serialized(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        # The body read whole before the turn is taken: a client stopped mid-request (a test's SIGSTOPped run
        # sending a part) held the turn while moto read from its socket, and every other request waited for ever.
        length = environ.get("CONTENT_LENGTH")
        body = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read() \
            if environ.get("wsgi.input_terminated") else b""
        environ["wsgi.input"] = io.BytesIO(body)
        with one_at_a_time:
            return list(app(environ, start_response))

    server = make_server("127.0.0.1", 0, serialized, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    thread.join()


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket on the moto server, with the environment a user's would have (AWS_* variables) for this
    process and the batch processes it starts; its requests recorded from now on (S3Bucket.requests)."""
    return S3Bucket.make(moto_server, monkeypatch)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A Google Cloud Storage emulator (fake-gcs-server) on 127.0.0.1 for this test process."""
    server = start_fake_gcs_server(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """An Azure Blob Storage emulator (Azurite) on 127.0.0.1 for this test process."""
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> GCSBucket:
    """A new bucket on the GCS emulator, with the environment a user's would have (STORAGE_EMULATOR_HOST)."""
    return GCSBucket.make(gcs_server, monkeypatch)


@pytest.fixture
def azure(azurite_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> AzureContainer:
    """A new container on Azurite, with the environment a user's would have (AZURE_STORAGE_CONNECTION_STRING)."""
    return AzureContainer.make(azurite_server, monkeypatch)


@pytest.fixture(scope="session")
def oss_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An Alibaba Cloud OSS server of the project's own (tests/oss_server.py) on 127.0.0.1 for this test process."""
    from oss_server import OSSServer

    server = OSSServer(tmp_path_factory.mktemp("oss") / "requests.jsonl")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def oss(oss_server: Any, monkeypatch: pytest.MonkeyPatch) -> OSSBucket:
    """A new bucket on the OSS server, with the environment a user's would have (OSS_ENDPOINT, OSS_ACCESS_KEY_*)."""
    return OSSBucket.make(oss_server, monkeypatch)


@pytest.fixture(params=list(BUCKETS))
def bucket(request: pytest.FixtureRequest) -> S3Bucket | GCSBucket | AzureContainer | OSSBucket:
    """A new bucket on each object store in turn (S3 on moto, GCS on fake-gcs-server, Azure on Azurite, OSS on the
    project's own server)."""
    return request.getfixturevalue(BUCKETS[request.param])

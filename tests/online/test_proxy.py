"""Proxies: the online requests (aiohttp) and the Batch API's calls (the openai SDK) go through the same proxy, the one
the environment names for the base URL (HTTPS_PROXY / HTTP_PROXY, else ALL_PROXY; NO_PROXY exempts a host), read
once by the preflight. Through a real forwarding proxy on 127.0.0.1 that counts what it forwards."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from helpers import ForwardProxy, free_port, output_of

from batch.errors import EXIT_BATCHES_LIVE

PROXY_VARIABLES = [f"{scheme}_proxy" for scheme in ("http", "https", "all", "no")]
ONLY_THROUGH_THE_PROXY = "sim.invalid"  # a name no resolver answers: the proxy alone knows where it is


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any proxy variable, whatever the machine's has."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture
def start_proxy() -> Iterator:
    started: list[ForwardProxy] = []

    def start(hosts: dict[str, str] | None = None) -> ForwardProxy:
        proxy = ForwardProxy(hosts)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def reached_only_through(sim, proxy_hosts: dict[str, str]) -> str:
    """The simulator's URL with its host a name that only the proxy resolves."""
    parts = urlsplit(sim.url)
    proxy_hosts[ONLY_THROUGH_THE_PROXY] = parts.hostname
    return sim.url.replace(f"//{parts.hostname}:", f"//{ONLY_THROUGH_THE_PROXY}:", 1)


def paths(proxy: ForwardProxy) -> list[str]:
    return [urlsplit(url).path for _, url in proxy.requests]


@pytest.mark.parametrize("variable", ["ALL_PROXY", "all_proxy", "HTTP_PROXY"])
def test_online_and_batch_api_requests_go_through_the_proxy_the_environment_names(
        variable, start_sim, make_job, run_cli, no_proxy_env, start_proxy):
    sim = start_sim(batch_speed=0)
    hosts: dict[str, str] = {}
    url = reached_only_through(sim, hosts)
    proxy = start_proxy(hosts)
    no_proxy_env.setenv(variable, proxy.url)
    rows = [{"review_id": f"r{i}", "text": f"review {i}"} for i in range(6)]
    # A request that misses the proxy fails fast.
    quick = {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.05, "max_outage_s": 1}
    online = make_job(sim, rows=rows, model={"base_url": url}, retry=quick)
    code, out, err = run_cli("run", online)
    assert code == 0, out + err
    assert len(output_of(online)) == 6 and set(output_of(online)["status"]) == {"ok"}
    assert paths(proxy).count("/v1/chat/completions") == sim.stats()["requests"] == 6

    proxy.requests.clear()
    batch = make_job(sim, rows=rows, model={"base_url": url}, mode="batch_api", retry=quick,
                     output={"path": "batch/result.parquet"}, batch_api={"poll_interval_s": 0.05})
    code, out, err = run_cli("run", batch)
    assert code == EXIT_BATCHES_LIVE, out + err
    assert "/v1/files" in paths(proxy) and "/v1/batches" in paths(proxy)
    sim.advance(3600)
    code, out, err = run_cli("run", batch)
    assert code == 0, out + err
    assert set(output_of(batch)["status"]) == {"ok"}
    assert any(path.startswith("/v1/files/") and path.endswith("/content") for path in paths(proxy))


def test_no_proxy_exempts_the_host_in_both_modes(start_sim, make_job, run_cli, no_proxy_env):
    sim = start_sim(batch_speed=0)
    no_proxy_env.setenv("ALL_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1,localhost")
    rows = [{"review_id": f"r{i}", "text": f"review {i}"} for i in range(3)]
    code, out, err = run_cli("run", make_job(sim, rows=rows))
    assert code == 0, out + err
    batch = make_job(sim, rows=rows, mode="batch_api", output={"path": "batch/result.parquet"})
    assert run_cli("run", batch)[0] == EXIT_BATCHES_LIVE
    assert sim.stats()["batch_api"]["batches_created"] == 1


@pytest.mark.parametrize("variable", ["ALL_PROXY", "http_proxy"])
def test_a_proxy_batch_cannot_speak_through_is_one_clear_line(variable, start_sim, make_job, run_cli, no_proxy_env):
    sim = start_sim()
    no_proxy_env.setenv(variable, "socks5://user:secret-pw@127.0.0.1:1080")
    job = make_job(sim, rows=[{"review_id": "r1", "text": "one"}])
    for command in ("validate", "run"):
        code, out, err = run_cli(command, job)
        assert code == 2 and len(err.strip().splitlines()) == 1, out + err
        assert f"{variable}=socks5://" in err and "an http:// or https:// proxy" in err, err
        assert "secret-pw" not in err, err
    assert sim.stats()["requests"] == 0

"""limits.shared checked before anything is sent: a bad URL is exit 2 with one line, a Redis that does not answer
exit 75, its password never shown."""

from __future__ import annotations

import pytest
from helpers import free_port
from hypothesis import given
from hypothesis import strategies as st

from batch.config import mask_url_password
from batch.errors import EXIT_UNREACHABLE

PASSWORD = "hunter2-secret"


@pytest.mark.parametrize("url", [
    f"http://:{PASSWORD}@127.0.0.1:6379/0",  # not Redis's scheme
    f"redis://:{PASSWORD}@/0",  # no host
    f"redis://:{PASSWORD}@127.0.0.1:port/0",  # a port that is not a number
    f"redis://:{PASSWORD}@127.0.0.1:6379/zero",  # a database that is not a number
    f"redis://:{PASSWORD}@127.0.0.1:6379/0?ssl=1",  # options batch does not read
])
def test_a_url_that_is_not_a_redis_servers_is_one_line_naming_the_key(make_job, sim, run_cli, url):
    job = make_job(sim, limits={"shared": url})
    code, out, err = run_cli("run", job)
    assert code == 2
    assert err.count("\n") == 1 and "limits.shared" in err and "redis://HOST:PORT/DB" in err
    assert PASSWORD not in err + out
    assert sim.stats()["requests"] == 0


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_redis_that_does_not_answer_stops_the_run_before_anything_is_sent(make_job, sim, run_cli, command):
    """A Redis that is down is no mistake in the job: exit 75 (EX_TEMPFAIL), which a Kubernetes Job retries, where
    a mistake is 2, on which the Job's podFailurePolicy fails the index."""
    job = make_job(sim, limits={"shared": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"})
    code, out, err = run_cli(command, job)
    assert code == EXIT_UNREACHABLE
    assert err.count("\n") == 1 and "limits.shared" in err and "does not answer" in err
    assert "redis://:***@127.0.0.1" in err
    assert PASSWORD not in err + out
    assert sim.stats()["requests"] == 0
    assert not (job.parent / "out").exists()


def test_the_password_is_masked_in_the_run_log_and_summary(make_job, sim, run_cli, redis_server):
    redis_server.client().config_set("requirepass", PASSWORD)
    job = make_job(sim, limits={"shared": f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"})
    code, out, err = run_cli("run", job, "-v")
    assert code == 0, err
    folder = job.parent / "out" / "result.checkpoint"
    written = "".join(path.read_text(errors="replace") for path in folder.iterdir() if path.suffix in (".json", ".log"))
    assert PASSWORD not in err + out + written


def test_a_wrong_password_is_one_line_too(make_job, sim, run_cli, redis_server):
    redis_server.client().config_set("requirepass", PASSWORD)
    job = make_job(sim, limits={"shared": f"redis://:wrong-{PASSWORD}@127.0.0.1:{redis_server.port}/0"})
    code, _, err = run_cli("validate", job)
    assert code == 2 and err.count("\n") == 1 and "refused batch" in err and PASSWORD not in err


def test_a_lease_without_shared_limits_is_a_mistake(make_job, sim, run_cli):
    code, _, err = run_cli("validate", make_job(sim, limits={"shared_lease_s": 5}))
    assert code == 2 and err.count("\n") == 1 and "shared_lease_s" in err and "set shared too" in err


@given(user=st.text(st.characters(blacklist_characters=":/@", blacklist_categories=("Zs", "Cc", "Zl", "Zp"))),
       password=st.text(st.characters(blacklist_characters="@", blacklist_categories=("Zs", "Cc", "Zl", "Zp")),
                        min_size=1),
       around=st.sampled_from(["{}", "got '{}'", "a {} and more", "({})"]))
def test_a_urls_password_is_masked_wherever_it_is_quoted(user, password, around):
    url = f"redis://{user}:{password}@127.0.0.1:6379/0"
    assert mask_url_password(around.format(url)) == around.format(f"redis://{user}:***@127.0.0.1:6379/0")

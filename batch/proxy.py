"""Which proxy a request to the job's endpoint goes through: read from the environment once, by the preflight, into
the plan, and given to both clients (the online requests' aiohttp session and the Batch API's openai SDK), so
the two never disagree.

The variables are read as curl, requests and the openai SDK (httpx) read them: the one of the URL's scheme
(`HTTPS_PROXY` for an https:// base URL, `HTTP_PROXY` for an http:// one; the lower-case names first), else
`ALL_PROXY`; no proxy when `NO_PROXY` lists the host (or is `*`). Both clients speak to an http:// or https://
proxy only: another (socks5://, the usual one in `ALL_PROXY`) is a mistake said in one line, not a failure
of every request."""

from __future__ import annotations

import os
import urllib.request
from urllib.parse import urlsplit

from batch.errors import ConfigError

PROXY_SCHEMES = ("http", "https")


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (None: none, or NO_PROXY exempts its host); ConfigError for a
    proxy neither client speaks to, naming its variable (its password left out)."""
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    named = urllib.request.getproxies()  # the environment's *_proxy variables, by scheme; "all" for ALL_PROXY
    key = next((key for key in (parts.scheme, "all") if named.get(key)), None)
    if key is None:
        return None
    proxy = named[key] if "://" in named[key] else f"http://{named[key]}"  # host:port alone is an http proxy
    found = urlsplit(proxy)
    if found.scheme not in PROXY_SCHEMES:
        variable = next((name for name in os.environ if name.lower() == f"{key}_proxy" and os.environ[name]),
                        f"{key.upper()}_PROXY")
        shown = found._replace(netloc=found.hostname + (f":{found.port}" if found.port else "")).geturl() \
            if found.hostname else f"{found.scheme}://"
        raise ConfigError(f"{variable}={shown}: batch sends its requests through an http:// or https:// proxy only, "
                          f"not {found.scheme}:// (set {'HTTPS_PROXY' if parts.scheme == 'https' else 'HTTP_PROXY'} "
                          f"to one, or NO_PROXY={parts.hostname} to send to {parts.hostname} directly)")
    return proxy

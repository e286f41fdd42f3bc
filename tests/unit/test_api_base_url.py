"""The API base URL: https only, except to this machine or with an explicit setting
that is warned about at every start; no user info, query or fragment."""

from __future__ import annotations

import pytest

from service.settings import SettingsError, load_settings
from tests.settings_support import clear_relay_environment, load_as_the_relay, start_warnings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_environment(monkeypatch)


@pytest.mark.parametrize(
    "url",
    ["http://api.scantrust.com", "http://simulator:8000", "http://10.0.0.1/", "http://[::2]:80"],
)
def test_http_to_another_host_is_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as raised:
        load_as_the_relay(monkeypatch, {"SCM_RELAY_API_BASE_URL": url})
    message = str(raised.value)
    assert "SCM_RELAY_API_BASE_URL" in message
    assert "clear text" in message
    assert "SCM_RELAY_API_ALLOW_INSECURE_HTTP=true" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.8.9.10/",
        "http://localhost:8000/",
        "http://LOCALHOST/",
        "http://[::1]:8000",
        "https://api.staging.scantrust.io",
    ],
)
def test_https_and_loopback_http_are_accepted(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_as_the_relay(monkeypatch, {"SCM_RELAY_API_BASE_URL": url})
    assert settings.api.base_url.scheme in ("http", "https")


def test_the_insecure_setting_allows_http_to_another_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_as_the_relay(
        monkeypatch,
        {
            "SCM_RELAY_API_BASE_URL": "http://simulator:8000",
            "SCM_RELAY_API_ALLOW_INSECURE_HTTP": "true",
        },
    )
    assert str(settings.api.base_url) == "http://simulator:8000/"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("https://relay:pw@api.scantrust.com/", "holds user info"),
        ("https://relay@api.scantrust.com/", "holds user info"),
        ("https://api.scantrust.com/?token=x", "holds a query"),
        ("https://api.scantrust.com/?", "holds a query"),
        ("https://api.scantrust.com/#top", "holds a fragment"),
    ],
)
def test_user_info_query_and_fragment_are_refused(
    url: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCM_RELAY_API_BASE_URL", url)
    with pytest.raises(SettingsError) as raised:
        load_settings({})
    assert f"SCM_RELAY_API_BASE_URL: {fragment}" in str(raised.value)


async def test_every_start_with_insecure_http_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    insecure = {
        "SCM_RELAY_API_BASE_URL": "http://simulator:8000",
        "SCM_RELAY_API_ALLOW_INSECURE_HTTP": "true",
    }
    for _ in range(2):
        assert await start_warnings(monkeypatch, insecure) == [
            "SCM_RELAY_API_ALLOW_INSECURE_HTTP: the API token goes in clear text to simulator"
        ]
    # To this machine (the simulator) there is nothing to warn about.
    assert (
        await start_warnings(monkeypatch, {"SCM_RELAY_API_BASE_URL": "http://127.0.0.1:8000"}) == []
    )

"""``[metrics]`` and ``fetch_crls`` as an administrator meets them: ``medgw check-config``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.demo_run import free_port
from gateway.pki.demo import DemoLayout
from tests.helpers.check_config import check_config, reported, set_peer_url


def add(config: Path, text: str) -> None:
    with config.open("a") as handle:
        handle.write("\n" + text + "\n")


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("192.0.2.5:9464", "not a loopback address"),
        ("0.0.0.0:9464", "not a loopback address"),
        ("127.0.0.1", "not ADDRESS:PORT"),
        ("localhost:9464", "not an IP address"),
    ],
)
def test_check_config_refuses_a_metrics_address_off_this_host(
    layout: DemoLayout, listen: str, words: str
) -> None:
    config = layout.hospital.config_path
    add(config, f'[metrics]\nlisten = "{listen}"')
    result = check_config(config)
    assert result.returncode == 1
    assert reported(result, config, "metrics.listen", words, "127.0.0.1"), result.stdout


def test_check_config_refuses_the_port_of_a_zone_listener(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    add(config, f'[metrics]\nlisten = "127.0.0.1:{layout.hospital.port}"')
    result = check_config(config)
    assert result.returncode == 1
    assert reported(
        result, config, "metrics.listen", "also listener 'loopback'", "port of their own"
    ), result.stdout


def test_check_config_refuses_the_port_of_the_local_api(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    port = free_port()
    add(config, f'[api]\nlisten = "127.0.0.1:{port}"\n\n[metrics]\nlisten = "127.0.0.1:{port}"')
    result = check_config(config)
    assert reported(result, config, "metrics.listen", "local API", "port of their own"), (
        result.stdout
    )


def test_unknown_metrics_key_is_an_error(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    add(config, '[metrics]\nlisten = "127.0.0.1:9464"\nauth = "none"')
    result = check_config(config)
    assert result.returncode == 1 and "metrics.auth" in result.stdout + result.stderr


def test_the_metrics_port_is_one_of_our_own_listeners_for_the_connect_path(
    layout: DemoLayout,
) -> None:
    config = layout.hospital.config_path
    port = free_port()
    add(config, f'[metrics]\nlisten = "127.0.0.1:{port}"')
    loaded = load_config(config)
    assert loaded.metrics is not None and loaded.metrics.endpoint == ("127.0.0.1", port)
    from gateway.egress import Network

    route = Network.fixed(loaded.network_map).zone("loopback")
    source, why = route.judge("127.0.0.1", port)
    assert source is None and why is not None and "metrics" in why


def test_require_is_satisfied_by_fetch_crls(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    config.write_text(text.replace('crls = ["certs/crls/loopback"]', "crls = []"))
    result = check_config(config)
    assert reported(result, config, "zones[0].revocation", "fetch_crls = false", "fetch_crls"), (
        result.stdout
    )
    config.write_text(
        text.replace('crls = ["certs/crls/loopback"]', "crls = []").replace(
            "fetch_crls = false", "fetch_crls = true"
        )
    )
    loaded = load_config(config)
    assert loaded.zones[0].fetch_crls and loaded.zones[0].crl_refresh_hours == 6
    # check-config reads no distribution point: a status only the daemon's downloads can
    # establish is no error there (as with OCSP).
    result = check_config(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_crl_cache_is_one_of_medgws_work_folders(layout: DemoLayout) -> None:
    """An inbox inside state_dir/crls/ would mix received documents with the cache."""
    config = layout.hospital.config_path
    text = config.read_text()
    state = layout.hospital.root / "state"
    start = text.index("inbox_dir = ")
    end = text.index("\n", start)
    config.write_text(text[:start] + f'inbox_dir = "{state}/crls/inbox"' + text[end:])
    result = check_config(config)
    assert result.returncode == 1
    assert "the work folder crls/ in state_dir" in result.stdout + result.stderr, result.stdout


def test_a_peer_url_at_the_metrics_port_is_refused(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    port = free_port()
    add(config, f'[metrics]\nlisten = "127.0.0.1:{port}"')
    peer = set_peer_url(layout, f"https://127.0.0.1:{port}/as2")
    result = check_config(config)
    assert result.returncode == 1
    assert reported(result, peer, "url", "the metrics endpoint", "AS2 endpoint"), result.stderr

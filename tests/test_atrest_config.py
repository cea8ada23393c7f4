"""``[at_rest]``: the key folder may not be where a copy of what it protects goes (the
state folder, the audit log's folder, the inbox, the outbox); `medgw check-config` says
where it is wrong and how to fix it."""

from __future__ import annotations

import pytest

from gateway.config import load_config
from gateway.pki.demo import DemoLayout
from tests.helpers.check_config import check_config, reported


def with_at_rest(layout: DemoLayout, table: str) -> None:
    config = layout.hospital.config_path
    config.write_text(config.read_text() + "\n[at_rest]\n" + table + "\n")


def test_the_default_key_folder_is_beside_the_state_folder(layout: DemoLayout) -> None:
    config = load_config(layout.hospital.config_path)
    assert config.at_rest is not None and config.at_rest.enabled
    state = config.storage.state_dir
    assert config.at_rest.key_dir == state.with_name(state.name + "-keys")


@pytest.mark.parametrize(
    ("key_dir", "words", "fix"),
    [
        ("state/keys", "inside or contains the state folder", "a folder of its own outside"),
        (".", "inside or contains the state folder", "a folder of its own outside"),
        ("outbox/keys", "is inside the outbox folder", "give at_rest.key_dir a place"),
        ("inbox", "is the inbox folder", "give at_rest.key_dir a place"),
    ],
)
def test_a_key_folder_where_copies_go_is_refused(
    layout: DemoLayout, key_dir: str, words: str, fix: str
) -> None:
    with_at_rest(layout, f'key_dir = "{key_dir}"')
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout
    assert reported(result, layout.hospital.config_path, "at_rest.key_dir", words, fix), (
        result.stderr
    )


def test_unknown_keys_in_at_rest_are_errors(layout: DemoLayout) -> None:
    with_at_rest(layout, "encrypt = false")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1
    assert "at_rest.encrypt" in result.stderr

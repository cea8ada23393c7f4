"""Configuration rules that keep a bad value from doing damage later, checked the way
an administrator meets them: ``medgw check-config`` and a reload of a running daemon."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from gateway.demo_run import wait_until
from gateway.pki.demo import DemoLayout
from tests.cli import medgw
from tests.helpers.audit import wait_for_events
from tests.helpers.check_config import check_config, reported, set_peer_url
from tests.helpers.demo import revoke

# --- 1. peer URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://[::1/as2", "is not a valid URL"),
        ("https://127.0.0.1:99999/as2", "port"),
        ("https://127.0.0.1:0/as2", "port"),
        ("https://127.0.0.1:x/as2", "port"),
    ],
)
def test_check_config_reports_a_malformed_peer_url(
    layout: DemoLayout, url: str, words: str
) -> None:
    peer = set_peer_url(layout, url)
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert reported(result, peer, "url", words, "https://host:port/path"), result.stderr


def test_a_peer_name_with_a_colon_is_refused_naming_the_file_and_the_fix(
    layout: DemoLayout,
) -> None:
    """What is kept of a peer's messages is named "<kind>:<peer>:<Message-ID>": with a ':'
    in a peer's name, two peers' names of it could be the same."""
    peers = layout.hospital.root / "peers.d"
    renamed = peers / "lab:west.toml"
    (peers / "lab.toml").rename(renamed)
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert reported(
        result, renamed, "(file name)", "contains ':'", f"rename {renamed} without ':'"
    ), result.stdout + result.stderr


def test_a_malformed_async_receipt_url_is_reported_too(layout: DemoLayout) -> None:
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    text = peer.read_text()
    assert 'async_receipt_url = ""' in text
    peer.write_text(text.replace('async_receipt_url = ""', 'async_receipt_url = "https://[x/r"'))
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert reported(result, peer, "async_receipt_url", "is not a valid URL", "https://")


def test_sighup_with_a_malformed_peer_url_keeps_serving_on_the_old_config(
    layout: DemoLayout, processes: Any
) -> None:
    hospital = processes.start(layout.hospital.config_path)
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    good = peer.read_text()
    set_peer_url(layout, "https://[::1/as2")
    hospital.signal(signal.SIGHUP)
    [failed] = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    assert "url" in failed["reason"] and "not a valid URL" in failed["reason"]
    assert not any("Task exception" in line for line in hospital.raw)
    assert hospital.proc.poll() is None
    # Mended, the next reload is applied.
    peer.write_text(good)
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")


def test_a_malformed_hand_over_url_is_reported(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    config.write_text(config.read_text() + '\n[delivery]\nhttp_url = "http://[::1:9001/in"\n')
    result = check_config(config)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert reported(result, config, "delivery.http_url", "is not a valid URL", "127.0.0.1")


# A fault injected into a real daemon: from the moment the file named by
# MEDGW_TEST_BREAK_RELOAD exists, reading the configuration for a reload fails with
# an error no configuration check anticipates (a defect, not a ConfigError).
BREAK_RELOAD = """
import os
from pathlib import Path

import gateway.daemon.reload

_load_config = gateway.daemon.reload.load_config


def _broken(path):
    if Path(os.environ["MEDGW_TEST_BREAK_RELOAD"]).exists():
        raise RuntimeError("injected defect")
    return _load_config(path)


gateway.daemon.reload.load_config = _broken
"""


def test_a_defect_during_a_reload_is_a_failed_reload(
    layout: DemoLayout, processes: Any, tmp_path: Path
) -> None:
    from tests.helpers.notify import NotifySocket

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(BREAK_RELOAD)
    trigger = tmp_path / "break"
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = {
            "PYTHONPATH": str(hooks),
            "MEDGW_TEST_BREAK_RELOAD": str(trigger),
            "NOTIFY_SOCKET": str(notify.path),
        }
        hospital = processes.start(layout.hospital.config_path, env=env)
        wait_until(lambda: "READY=1" in notify.states(), 30, "READY=1")
        trigger.touch()
        hospital.signal(signal.SIGHUP)
        [failed] = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
        assert "RuntimeError: injected defect" in failed["reason"]
        assert "check-config" in failed["reason"]
        wait_until(lambda: notify.states().count("READY=1") >= 2, 30, "READY=1 after it")
        logged = hospital.wait_for(lambda line: line.get("event") == "config.reload_failed", 30)
        assert "previous" in logged["action"]
        assert not any("Task exception" in line for line in hospital.raw)
        # Still serving, and a later reload (the defect gone) is applied.
        trigger.unlink()
        hospital.signal(signal.SIGHUP)
        wait_for_events(layout.hospital.audit_log, "config.reloaded")
        assert hospital.proc.poll() is None
    finally:
        notify.close()


# --- 2. values that would do damage later -------------------------------------------------


def test_an_empty_as2_id_is_refused_in_gateway_toml_and_in_a_peer_file(
    layout: DemoLayout,
) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    assert f'as2_id = "{layout.hospital.as2_id}"' in text
    config.write_text(text.replace(f'as2_id = "{layout.hospital.as2_id}"', 'as2_id = ""'))
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    peer_text = peer.read_text()
    assert f'as2_id = "{layout.lab.as2_id}"' in peer_text
    peer.write_text(peer_text.replace(f'as2_id = "{layout.lab.as2_id}"', 'as2_id = ""'))
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    assert reported(result, config, "gateway.as2_id", "is empty", "HOSPITAL-TOKYO-01")
    assert reported(result, peer, "as2_id", "is empty", "HOSPITAL-TOKYO-01")


def with_api_socket(layout: DemoLayout, socket: str) -> Path:
    config = layout.lab.config_path
    config.write_text(
        config.read_text()
        + f'\n[api]\nsocket = "{socket}"\n'
        + '[[api.clients]]\nname = "lis"\ntoken_sha256 = "'
        + "0" * 64
        + '"\npeers = ["hospital"]\n'
    )
    return config


@pytest.mark.parametrize(
    ("socket", "what"),
    [
        ("audit/audit.jsonl", "the audit log"),
        ("state/spool.sqlite3", "spool.sqlite3"),
        ("state/spool.sqlite3-wal", "spool.sqlite3-wal"),
        ("state/medgw.lock", "medgw.lock"),
        ("state/control.sock", "control.sock"),
        ("state/incoming/api.sock", "incoming"),
        ("state", "the state folder"),
        ("inbox", "the inbox folder"),
        ("inbox/hospital/api.sock", "the inbox folder"),
        ("outbox/hospital/api.sock", "the outbox folder"),
        ("state/../audit/audit.jsonl", "the audit log"),
        ("certs/tls.key", "a private key"),
        ("gateway.toml", "this configuration file"),
        ("peers.d/api.sock", "the peers folder"),
    ],
)
def test_the_api_socket_may_not_be_a_file_medgw_keeps(
    layout: DemoLayout, socket: str, what: str
) -> None:
    config = with_api_socket(layout, socket)
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    assert reported(result, config, "api.socket", what, "/run/medgw/api.sock"), result.stderr
    assert "would delete" in result.stderr


def test_an_api_socket_of_its_own_in_the_state_folder_is_fine(layout: DemoLayout) -> None:
    result = check_config(with_api_socket(layout, "state/api.sock"))
    assert result.returncode == 0, result.stderr


def test_two_listeners_with_one_name_are_refused(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    start = text.index("[[listeners]]")
    end = text.index("[storage]")
    second = text[start:end].replace(f"port = {layout.hospital.port}", "port = 1")
    config.write_text(text[:end] + second + text[end:])
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    assert reported(result, config, "listeners[1].name", "'loopback' is used by another", "own")


# --- folders that overlap turn the gateway into a forwarder -------------------------------


def set_storage(layout: DemoLayout, **values: str) -> Path:
    """Replace ``[storage]`` keys of the hospital's gateway.toml (paths as written)."""
    config = layout.hospital.config_path
    text = config.read_text()
    for key, value in values.items():
        start = text.index(f"\n{key} = ") + 1
        end = text.index("\n", start)
        text = text[:start] + f'{key} = "{value}"' + text[end:]
    config.write_text(text)
    return config


@pytest.mark.parametrize(
    ("storage", "key", "words"),
    [
        # every received document straight back out
        ({"inbox_dir": "outbox"}, "storage.inbox_dir", "is the outbox folder"),
        # a received document dropped into the lab's outbox folder is sent to the lab
        ({"inbox_dir": "outbox/lab"}, "storage.inbox_dir", "is inside the outbox folder"),
        ({"outbox_dir": "inbox/out"}, "storage.outbox_dir", "is inside the inbox folder"),
        ({"inbox_dir": "state"}, "storage.inbox_dir", "is the state folder"),
        ({"inbox_dir": "state/payloads"}, "storage.inbox_dir", "the work folder payloads/"),
        ({"state_dir": "inbox/state"}, "storage.state_dir", "is inside the inbox folder"),
        ({"audit_log": "outbox/audit.jsonl"}, "storage.audit_log", "inside the outbox"),
        # our private keys would be sent to a peer
        ({"outbox_dir": "certs"}, "tls.key", "a private key of this gateway"),
        # a received document could replace a peer's certificate or a CRL
        ({"inbox_dir": "certs/peers"}, "tls_certificates", "a certificate file"),
        ({"inbox_dir": "certs"}, "zones[0].crls", "a CRL file or folder"),
        ({"inbox_dir": "peers.d"}, "gateway.peers_dir", "is the inbox folder"),
        ({"outbox_dir": "."}, "", "this configuration file"),
    ],
)
def test_overlapping_folders_are_refused(
    layout: DemoLayout, storage: dict[str, str], key: str, words: str
) -> None:
    config = set_storage(layout, **storage)
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    found = [line for line in lines if f": {key}: " in line and words in line]
    if key == "":
        found = [line for line in lines if f"{config}: " in line and words in line]
    assert found, result.stderr
    assert "may not overlap" in found[0] and "(fix: give " in found[0], found[0]


def test_overlap_through_a_symbolic_link_is_refused(layout: DemoLayout) -> None:
    (layout.hospital.root / "mail").symlink_to(layout.hospital.root / "outbox")
    config = set_storage(layout, inbox_dir="mail/lab")
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    assert reported(
        result, config, "storage.inbox_dir", "is inside the outbox folder", "storage.outbox_dir"
    ), result.stderr


def test_inbox_and_outbox_of_their_own_inside_the_state_folder_are_fine(
    layout: DemoLayout,
) -> None:
    """The layout of the example configuration (/var/lib/medgw and folders in it)."""
    config = set_storage(layout, state_dir="var", outbox_dir="var/outbox", inbox_dir="var/inbox")
    result = check_config(config)
    assert result.returncode == 0, result.stderr


def test_overlapping_folders_stop_a_start_and_a_reload(layout: DemoLayout, processes: Any) -> None:
    config = set_storage(layout, inbox_dir="outbox")
    result = medgw("run", "--config", config, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not starting" in result.stderr and "storage.inbox_dir" in result.stderr
    set_storage(layout, inbox_dir="inbox")
    hospital = processes.start(config)
    # A peer certificate moved into the inbox, where a received document could replace it.
    peer = layout.hospital.root / "peers.d" / "lab.toml"
    moved = layout.hospital.root / "inbox" / "lab-tls.crt"
    moved.parent.mkdir(exist_ok=True)
    moved.write_bytes((layout.hospital.root / "certs" / "peers" / "lab" / "tls.crt").read_bytes())
    text = peer.read_text()
    peer.write_text(text.replace('"certs/peers/lab/tls.crt"', f'"{moved}"'))
    hospital.signal(signal.SIGHUP)
    [failed] = wait_for_events(layout.hospital.audit_log, "config.reload_failed")
    assert "is inside the inbox folder" in failed["reason"], failed["reason"]
    assert hospital.proc.poll() is None
    peer.write_text(text)
    hospital.signal(signal.SIGHUP)
    wait_for_events(layout.hospital.audit_log, "config.reloaded")


# --- 5. private keys readable by a group or others -----------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o610, 0o604, 0o644])
def test_a_private_key_readable_beyond_its_owner_is_an_error(layout: DemoLayout, mode: int) -> None:
    key = layout.hospital.root / "certs" / "sign.key"
    key.chmod(mode)
    config = layout.hospital.config_path
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    assert reported(result, config, "smime.signing_key", str(key), f"chmod 600 {key}"), (
        result.stderr
    )
    assert f"mode {mode:o}" in result.stderr
    assert "error:" in result.stderr and "does not start" in result.stderr


def test_the_daemon_refuses_to_start_with_a_private_key_readable_by_others(
    layout: DemoLayout,
) -> None:
    key = layout.hospital.root / "certs" / "tls.key"
    key.chmod(0o644)
    result = medgw("run", "--config", layout.hospital.config_path, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"chmod 600 {key}" in result.stderr
    assert "not starting" in result.stderr


def test_keys_of_mode_600_give_no_warning(layout: DemoLayout) -> None:
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stderr
    assert "chmod 600" not in result.stdout + result.stderr


# --- 6. revocation checking switched off --------------------------------------------------


def test_revocation_off_is_a_warning(layout: DemoLayout) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    assert 'revocation = "require"' in text
    config.write_text(text.replace('revocation = "require"', 'revocation = "off"'))
    result = check_config(config)
    assert result.returncode == 0, result.stderr  # a warning, not an error
    assert reported(
        result, config, "zones[0].revocation", "still accepted", 'revocation = "require"'
    ), result.stdout


def test_revocation_require_gives_no_revocation_warning(layout: DemoLayout) -> None:
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stderr
    assert "revocation:" not in result.stdout


def test_a_peer_certificate_as_trust_anchor_is_refused_naming_the_file(
    layout: DemoLayout,
) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    anchor = 'trust_anchors = ["certs/trust/loopback.crt"]'
    assert anchor in text
    config.write_text(text.replace(anchor, 'trust_anchors = ["certs/peers/lab/tls.crt"]'))
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    peer_cert = layout.hospital.root / "certs" / "peers" / "lab" / "tls.crt"
    assert reported(
        result,
        config,
        "zones[0].trust_anchors",
        f"{peer_cert} holds CN=KITA-LAB,O=Kita Clinical Laboratory, issued by ",
        "put the CA's root certificate here",
    ), result.stdout + result.stderr
    assert "which is not a CA certificate" in result.stdout + result.stderr


def _self_signed(path: Path, shape: str) -> Path:
    """A self-signed certificate at ``path``, of one ``shape``: "end-entity", with
    basicConstraints cA false (a partner's own certificate trusted as its anchor);
    "v3-bare", an X.509 v3 certificate with no extension at all; "v1", an X.509 v1
    root (a version without extensions)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Partner self-signed")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=300))
    )
    if shape == "end-entity":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
    der = builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)
    if shape == "v1":
        # cryptography writes only v3: the same certificate as version 1, signed again.
        cert = asn1_x509.Certificate.load(der)
        tbs = cert["tbs_certificate"]
        tbs["version"] = "v1"
        cert["signature_value"] = key.sign(tbs.dump(force=True), ec.ECDSA(hashes.SHA256()))
        der = cert.dump(force=True)
    certificate = x509.load_der_x509_certificate(der)
    assert certificate.version is (x509.Version.v1 if shape == "v1" else x509.Version.v3)
    path.write_bytes(certificate.public_bytes(Encoding.PEM))
    return path


@pytest.mark.parametrize(
    ("shape", "words", "fix"),
    [
        (
            "end-entity",
            "a self-signed certificate that is not a CA certificate (basicConstraints cA false)",
            "ask the partner for a certificate issued by a CA",
        ),
        (
            "v3-bare",
            "a self-signed X.509 v3 certificate without basicConstraints, which RFC 5280 "
            "(4.2.1.9) requires of every CA certificate",
            "if it is your PKI's root, have the CA reissue it with basicConstraints cA true",
        ),
        ("v1", None, None),
    ],
    ids=["end-entity", "v3-bare", "v1"],
)
def test_a_self_signed_trust_anchor_is_accepted_and_one_that_is_no_ca_is_a_warning(
    layout: DemoLayout, shape: str, words: str | None, fix: str | None
) -> None:
    """Path validation takes a self-issued certificate as an anchor whatever its
    basicConstraints: a partner's self-signed certificate, or a root from before
    extensions; only certificates issued by someone else are refused there.  One that
    says it is no CA, or a v3 one that does not say it is one (RFC 5280 requires a CA
    certificate to), is a warning; a v1 root, which cannot say, is not."""
    config = layout.hospital.config_path
    extra = _self_signed(layout.hospital.root / "certs" / "trust" / "extra.crt", shape)
    text = config.read_text()
    anchor = 'trust_anchors = ["certs/trust/loopback.crt"]'
    assert anchor in text
    config.write_text(
        text.replace(
            anchor, 'trust_anchors = ["certs/trust/loopback.crt", "certs/trust/extra.crt"]'
        )
    )
    result = check_config(config)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    about = [line for line in out.splitlines() if str(extra) in line]
    if words is None or fix is None:
        assert about == [], out
    else:
        assert len(about) == 1 and about[0].startswith("warning:"), out
        assert reported(
            result,
            config,
            "zones[0].trust_anchors",
            f"{extra} holds CN=Partner self-signed, {words}",
            fix,
        ), out
    assert "error:" not in out


def test_a_misnamed_peer_file_is_a_warning_naming_it_and_an_editor_swap_file_is_not(
    layout: DemoLayout,
) -> None:
    folder = layout.hospital.root / "peers.d"
    (folder / "lab.toml").rename(folder / "lab.tml")
    (folder / ".lab.tml.swp").write_bytes(b"")
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not an error
    lines = [line for line in result.stdout.splitlines() if str(folder) in line]
    assert lines == [
        f"warning: {folder / 'lab.tml'}: ignored: only files named <peer>.toml in the peers "
        "folder are read, so no peer is configured from this one (fix: rename it to lab.toml "
        f"if it describes a peer, else move it out of {folder})"
    ], result.stdout


def test_a_backup_beside_its_peer_file_is_a_warning_to_move_it_out(layout: DemoLayout) -> None:
    folder = layout.hospital.root / "peers.d"
    (folder / "lab.toml.bak").write_bytes((folder / "lab.toml").read_bytes())
    result = check_config(layout.hospital.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"warning: {folder / 'lab.toml.bak'}: ignored: only files named <peer>.toml "
        in result.stdout
    )
    assert f"(fix: move it out of {folder} (a copy of lab.toml?))" in result.stdout


def test_a_reload_logs_the_new_configurations_warnings_as_the_start_does(
    layout: DemoLayout, processes: Any
) -> None:
    """A renamed peer file usually takes effect at a reload: its warning is logged then,
    before ``config.reloaded`` lists one peer fewer."""
    hospital = processes.start(layout.hospital.config_path)
    folder = layout.hospital.root / "peers.d"
    (folder / "lab.toml").rename(folder / "lab.tml")
    hospital.signal(signal.SIGHUP)
    reloaded = hospital.wait_for(lambda line: line.get("event") == "config.reloaded", 30)
    assert reloaded["peers"] == []
    logged = hospital.lines[: hospital.lines.index(reloaded)]
    warnings = [line["problem"] for line in logged if line.get("event") == "config.warning"]
    assert (
        f"warning: {folder / 'lab.tml'}: ignored: only files named <peer>.toml in the peers "
        "folder are read, so no peer is configured from this one (fix: rename it to lab.toml "
        f"if it describes a peer, else move it out of {folder})"
    ) in warnings, warnings


def test_medgw_reload_prints_the_new_configurations_warnings(
    layout: DemoLayout, processes: Any
) -> None:
    """The admin who asked for the reload sees what check-config would have shown: a
    reload applied with a warning is not one with nothing to fix."""
    processes.start(layout.hospital.config_path)
    folder = layout.hospital.root / "peers.d"
    (folder / "lab.toml").rename(folder / "lab.tml")
    done = medgw("reload", "--config", layout.hospital.config_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "configuration reloaded (1 problem(s) found; see above)", done.stdout
    assert lines[0].startswith(
        f"warning: {folder / 'lab.tml'}: ignored: only files named <peer>.toml"
    ), done.stdout

    # A peer certificate the new CRL revokes: check-config's error, said by the reload too.
    (folder / "lab.tml").rename(folder / "lab.toml")
    lab_tls = layout.hospital.root / "certs" / "peers" / "lab" / "tls.crt"
    crl = layout.hospital.root / "certs" / "crls" / "loopback" / "ca.crl"
    revoke(layout, crl, x509.load_pem_x509_certificate(lab_tls.read_bytes()))
    again = medgw("reload", "--config", layout.hospital.config_path)
    assert again.returncode == 0, again.stdout + again.stderr
    *said, last = again.stdout.splitlines()
    refused = [line for line in said if line.startswith("error:")]
    assert refused and all("lab" in line and "revoked" in line for line in refused), again.stdout
    assert last == f"configuration reloaded ({len(said)} problem(s) found; see above)", said


def test_a_misspelt_table_is_reported_first_with_the_name_meant_and_nothing_built_on_it(
    layout: DemoLayout,
) -> None:
    config = layout.hospital.config_path
    text = config.read_text()
    assert "\n[storage]\n" in text
    config.write_text(text.replace("\n[storage]\n", "\n[storge]\n"))
    result = check_config(config)
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stdout + result.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert errors[0] == (
        f"error: {config}: storge: unknown key: the table [storge] (fix: did you mean "
        "[storage]? rename it to [storage], or remove it; known keys: gateway, listeners, "
        "responsible, runtime, smime, storage, tls, zones)"
    ), errors
    assert errors[1] == (
        f"error: {config}: storage: required table is missing (fix: add a [storage] table "
        "to the file)"
    )
    # The keys of the missing table, each with a line of valid TOML; no overlap judged on
    # the paths they would have named.
    assert [e.split(": ")[2] for e in errors[2:]] == [
        "storage.state_dir",
        "storage.outbox_dir",
        "storage.inbox_dir",
        "storage.audit_log",
    ], errors
    assert f"{config}: 6 error(s)" in said


# --- a value of the wrong type: the fix shows the admin's own value ----------------------


@pytest.mark.parametrize(
    ("written", "key", "fix"),
    [
        ('port = "{port}"', "listeners[0].port", "`port = {port}`"),
        ('max_attempts = "7"', "runtime.max_attempts", "`max_attempts = 7`"),
        ("name = 7", "gateway.name", '`name = "7"`'),
    ],
)
def test_a_wrong_type_fix_shows_the_value_as_written(
    layout: DemoLayout, written: str, key: str, fix: str
) -> None:
    config = layout.hospital.config_path
    port = layout.hospital.port
    text = config.read_text()
    line = written.format(port=port)
    name = line.split(" =", 1)[0]
    original = next(x for x in text.splitlines() if x.startswith(f"{name} ="))
    config.write_text(text.replace(original, line, 1))
    result = check_config(config)
    assert result.returncode == 1, result.stdout
    assert reported(result, config, key, "must be", fix.format(port=port)), result.stderr

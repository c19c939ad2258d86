"""The allow-list with host bindings (service.peers) and its settings."""

from __future__ import annotations

import pytest

from service.errors import ConfigurationError
from service.peers import admitted, parse_allowed_peer
from service.settings import Settings


def test_a_bare_title_is_admitted_from_any_host_and_only_under_its_own_name() -> None:
    peers = [parse_allowed_peer("PACS1")]
    assert admitted(peers, "PACS1", "10.0.0.7")
    assert admitted(peers, "PACS1", "2001:db8::1")
    assert not admitted(peers, "PACS2", "10.0.0.7")


def test_a_title_bound_to_an_address_or_network_is_refused_elsewhere() -> None:
    peers = [parse_allowed_peer("PACS1@10.1.2.3"), parse_allowed_peer("ROUTER@192.168.0.0/24")]
    assert admitted(peers, "PACS1", "10.1.2.3")
    assert not admitted(peers, "PACS1", "10.1.2.4")
    assert admitted(peers, "ROUTER", "192.168.0.200")
    assert not admitted(peers, "ROUTER", "192.168.1.1")
    assert not admitted(peers, "ROUTER", "10.1.2.3"), "a host binding is per title, not a shared list"
    # A dual-stack socket reports an IPv4 caller as an IPv4-mapped IPv6 address.
    assert admitted(peers, "PACS1", "::ffff:10.1.2.3")
    assert not admitted(peers, "PACS1", "not-an-address")


def test_a_title_listed_twice_is_admitted_from_either_host() -> None:
    peers = [parse_allowed_peer("PACS1@10.0.0.1"), parse_allowed_peer("PACS1@[2001:db8::5]")]
    assert admitted(peers, "PACS1", "10.0.0.1")
    assert admitted(peers, "PACS1", "2001:db8::5")
    assert not admitted(peers, "PACS1", "10.0.0.2")


def test_a_host_name_is_resolved_to_its_addresses() -> None:
    (network,) = parse_allowed_peer("LOCAL@localhost").networks or (None,)
    assert network is not None and str(network.network_address) in ("127.0.0.1", "::1")


def test_an_unresolvable_host_or_an_empty_one_stops_the_start_with_the_entry_named() -> None:
    with pytest.raises(ConfigurationError, match="does not resolve"):
        parse_allowed_peer("PACS1@no-such-host.invalid")
    with pytest.raises(ConfigurationError, match="PACS1@"):
        Settings(allowed_ae=("PACS1@",))
    with pytest.raises(ConfigurationError, match="AE title"):
        Settings(allowed_ae=("A_TITLE_LONGER_THAN_16@10.0.0.1",))


def test_settings_keep_the_entries_as_written_and_resolve_them_on_request() -> None:
    settings = Settings(allowed_ae=("PACS1", "ROUTER@10.0.0.0/8"))
    assert settings.allowed_ae == ("PACS1", "ROUTER@10.0.0.0/8")
    assert [peer.ae_title for peer in settings.allowed_peers] == ["PACS1", "ROUTER"]
    assert settings.allowed_peers[0].networks is None

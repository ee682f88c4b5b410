"""Config parsing: defaults, overrides, and one readable line per mistake."""
from __future__ import annotations

import pytest

from registryd.config import Config, ConfigError, load_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "registryd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file() -> None:
    config = load_config()
    assert config.listen == ("tcp:5000",)
    assert config.delete_enabled is True
    assert config.data_dir


def test_example_config_is_valid() -> None:
    config = load_config("etc/registryd/registryd.toml")
    assert config == Config(data_dir=config.data_dir)


def test_file_values_and_listen_tables(tmp_path) -> None:
    path = write(tmp_path, """
data_dir = "/srv/reg"
[[listen]]
endpoint = "tcp:5001"
[[listen]]
endpoint = "tcp6:5001:interface=\\\\:\\\\:1"
[registry]
delete_enabled = false
max_manifest_size = 1024
[uploads]
expiry = 60
""")
    config = load_config(path)
    assert config.listen == ("tcp:5001", "tcp6:5001:interface=\\:\\:1")
    assert config.data_dir == "/srv/reg"
    assert config.delete_enabled is False
    assert config.max_manifest_size == 1024
    assert config.upload_expiry == 60


def test_command_line_overrides_file(tmp_path) -> None:
    path = write(tmp_path, 'listen = ["tcp:5001"]\ndata_dir = "/a"\n')
    config = load_config(path, {"listen": ("tcp:6000",), "data_dir": "/b"})
    assert config.listen == ("tcp:6000",)
    assert config.data_dir == "/b"


@pytest.mark.parametrize("overrides, text, message", [
    ({"data_dir": ""}, 'data_dir = ""', "'--data-dir' is empty"),
    ({"data_dir": " "}, 'data_dir = " "', "'--data-dir' is empty"),
    ({"listen": ("tcp:5000", "")}, 'listen = ["tcp:5000", ""]', "'--listen' is empty"),
])
def test_command_line_values_go_through_the_checks_of_their_keys(tmp_path, overrides, text, message) -> None:
    """A value from the command line is refused as the same value in the file is, naming the option."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert str(caught.value) == message
    with pytest.raises(ConfigError) as in_file:
        load_config(write(tmp_path, text))
    assert message.replace("--data-dir", "data_dir").replace("'--listen'", "'listen[1]'") in str(in_file.value)


@pytest.mark.parametrize("text, message", [
    ("foo = 1", "unknown key 'foo'"),
    ("[registry]\nbar = 1", "unknown key 'registry.bar'"),
    ("[registry]\ndelete_enabled = 'yes'", "'registry.delete_enabled' must be true or false"),
    ("[uploads]\nexpiry = true", "'uploads.expiry' must be an integer"),
    ("[uploads]\nexpiry = 0", "'uploads.expiry' must be greater than zero"),
    ("listen = 'tcp:5000'", "'listen' must be a list"),
    ("listen = []", "'listen' must name at least one endpoint"),
    ("listen = [1]", "'listen[0]' must be a string"),
    ("[[listen]]\nport = 1", "unknown key 'listen[0].port'"),
    ("registry = 1", "'registry' must be a table"),
    ("listen = [", "is not valid TOML"),
])
def test_mistakes_are_named_in_one_line(tmp_path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert path in str(info.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*No such file"):
        load_config(str(tmp_path / "absent.toml"))


def test_gc_and_cache_limit_settings(tmp_path) -> None:
    path = write(tmp_path, """
[gc]
interval = 0
delay = 60
[mirror]
max_size = "1.5GiB"
[server]
usage_interval = 30
""")
    config = load_config(path)
    assert (config.gc_interval, config.gc_delay, config.usage_interval) == (0, 60, 30)
    assert config.mirror_max_size == 1536 * 1024 * 1024
    assert load_config(write(tmp_path, "[mirror]\nmax_size = 1000\n")).mirror_max_size == 1000
    assert load_config(write(tmp_path, '[mirror]\nmax_size = "500MB"\n')).mirror_max_size == 500_000_000


def test_min_free_bytes_takes_units_like_every_size(tmp_path) -> None:
    assert load_config(write(tmp_path, '[server]\nmin_free_bytes = "1GiB"\n')).min_free_bytes == 1 << 30
    assert load_config(write(tmp_path, '[server]\nmin_free_bytes = "500MB"\n')).min_free_bytes == 500_000_000
    assert load_config(write(tmp_path, "[server]\nmin_free_bytes = 4096\n")).min_free_bytes == 4096
    for text, message in [('"plenty"', "must be a size in bytes"), ("0", "must be greater than zero"),
                          ('"0GiB"', "must be greater than zero"), ("-1", "must not be negative")]:
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, f"[server]\nmin_free_bytes = {text}\n"))
        assert f"'server.min_free_bytes' {message}" in str(caught.value)


@pytest.mark.parametrize("text, message", [
    ('[mirror]\nmax_size = "lots"', "'mirror.max_size' must be a size in bytes or a string like"),
    ("[mirror]\nmax_size = -1", "'mirror.max_size' must not be negative"),
    ("[mirror]\nmax_size = true", "'mirror.max_size' must be a size"),
    ("[gc]\ninterval = -5", "'gc.interval' must not be negative"),
    ('[gc]\ndelay = "1h"', "'gc.delay' must be an integer"),
    ("[gc]\nevery = 5", "unknown key 'gc.every'"),
    ("[server]\nusage_interval = 0", "'server.usage_interval' must be greater than zero"),
])
def test_gc_and_cache_limit_errors(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_storage_s3_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_S3_SECRET", "s3cret")
    config = load_config(write(tmp_path, """
[storage]
driver = "s3"
redirect = true
redirect_expiry = 300
[storage.s3]
endpoint = "http://127.0.0.1:7480"
bucket = "registry"
access_key_id = "AK"
secret_access_key_env = "TEST_S3_SECRET"
part_size = 8388608
"""))
    storage = config.storage
    assert (storage.driver, storage.redirect, storage.redirect_expiry) == ("s3", True, 300)
    assert storage.s3 is not None and storage.s3.bucket == "registry" and storage.s3.secret_access_key == "s3cret"
    assert storage.s3.part_size == 8 * 1024 * 1024
    assert load_config().storage.driver == "filesystem"


@pytest.mark.parametrize("text, message", [
    ('[storage]\ndriver = "nfs"', "'storage.driver' must be \"filesystem\" or \"s3\""),
    ('[storage]\ndriver = "s3"', "there is no [storage.s3] table"),
    ('[storage]\nredirect = true', "'storage.redirect' needs storage.driver = \"s3\""),
    ('[storage]\nflavour = 1', "unknown key 'storage.flavour'"),
    ('[storage.s3]\nbucket = "b"', "[storage.s3] is only used with storage.driver = \"s3\""),
    ('[storage]\ndriver = "s3"\n[storage.s3]\nendpoint = "http://h:1"', "bucket"),
    ('[storage]\nredirect_expiry = 0', "'storage.redirect_expiry' must be between 1 and 604800"),
    ("storage = 5", "'storage' must be a table"),
])
def test_storage_errors(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value)


S3_TABLE = """
[storage.s3]
endpoint = "http://127.0.0.1:7480"
bucket = "registry"
access_key_id = "AK"
secret_access_key = "s3cret"
"""


def test_storage_hot_cache_settings(tmp_path) -> None:
    config = load_config(write(tmp_path, '[storage]\ndriver = "s3"\ncache_size = "20GiB"\n' + S3_TABLE))
    assert (config.storage.cache_size, config.storage.cache_dir) == (20 * 1024 ** 3, None)
    config = load_config(write(tmp_path, f'[storage]\ndriver = "s3"\ncache_size = 1000000\n'
                                         f'cache_dir = "{tmp_path}/hot/../cache"\n' + S3_TABLE))
    assert (config.storage.cache_size, config.storage.cache_dir) == (1_000_000, str(tmp_path / "cache"))
    assert load_config(write(tmp_path, '[storage]\ndriver = "s3"\n' + S3_TABLE)).storage.cache_size == 0
    assert load_config().storage.cache_size == 0
    # 0 is "off", on either driver.
    assert load_config(write(tmp_path, "[storage]\ncache_size = 0\n")).storage.cache_size == 0


@pytest.mark.parametrize("text, message", [
    ('[storage]\ncache_size = "1GiB"', "'storage.cache_size' needs storage.driver = \"s3\""),
    ('[storage]\ncache_size = 0\ncache_dir = "/c"', "'storage.cache_dir' needs storage.driver = \"s3\""),
    ('[storage]\ndriver = "s3"\ncache_size = "lots"' + S3_TABLE,
     "'storage.cache_size' must be a size in bytes or a string like"),
    ('[storage]\ndriver = "s3"\ncache_size = -1' + S3_TABLE, "'storage.cache_size' must not be negative"),
    ('[storage]\ndriver = "s3"\ncache_size = true' + S3_TABLE, "'storage.cache_size' must be a size"),
    ('[storage]\ndriver = "s3"\ncache_dir = "/c"' + S3_TABLE, "'storage.cache_dir' needs a storage.cache_size"),
    ('[storage]\ndriver = "s3"\ncache_size = 10\ncache_dir = 5' + S3_TABLE, "'storage.cache_dir' must be a string"),
    ('[storage]\ndriver = "s3"\ncache_size = 10\ncache_dir = " "' + S3_TABLE, "'storage.cache_dir' is empty"),
    ('[storage]\ndriver = "s3"\nredirect = true\ncache_size = "1GiB"' + S3_TABLE,
     "'storage.cache_size' has no use with storage.redirect = true"),
])
def test_storage_hot_cache_errors(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value)

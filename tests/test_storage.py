"""The store: local paths and s3:// (moto_server) behave the same through fsspec."""

from __future__ import annotations

from mardini.storage import filesystem, join, store_root


def test_store_root_defaults(monkeypatch):
    monkeypatch.delenv("MARDINI_STORE", raising=False)
    assert store_root() == "./.mardini"
    monkeypatch.setenv("MARDINI_STORE", "s3://bucket/prefix/")
    assert store_root() == "s3://bucket/prefix"
    assert store_root("/data") == "/data"
    assert join("s3://b/p/", "/runs/", "x") == "s3://b/p/runs/x"


def test_round_trip_local_and_s3(tmp_path, s3_bucket):
    for root in (str(tmp_path), s3_bucket):
        fs, path = filesystem(join(root, "dir", "hello.txt"))
        with fs.open(path, "wb") as f:
            f.write(b"hi")
        fs2, dir_path = filesystem(join(root, "dir"))
        assert [p.rsplit("/", 1)[-1] for p in fs2.ls(dir_path)] == ["hello.txt"]
        with fs2.open(path, "rb") as f:
            assert f.read() == b"hi"

"""The store: local paths and s3:// (moto_server) behave the same through fsspec."""

from __future__ import annotations

import pytest

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


def test_retry_backs_off_then_succeeds_and_gives_up_after_its_attempts():
    from mardini.storage import retry

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "done"

    assert retry(flaky, "upload of x", attempts=5, backoff_s=0.01) == "done"
    assert len(calls) == 3

    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionError("no route")

    with pytest.raises(ConnectionError, match="no route"):
        retry(down, "upload of x", attempts=3, backoff_s=0.01)
    assert len(calls) == 3  # capped

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/latest")

    with pytest.raises(FileNotFoundError):
        retry(missing, "reading latest", attempts=3, backoff_s=0.01)
    assert len(calls) == 1  # an answer, not a transient failure


def test_each_rank_downloads_only_its_own_zero3_partitions():
    from mardini.train.checkpoint import rank_files

    where = "b/runs/c/dm/checkpoints/step-4"
    listing = [f"{where}/zero_to_fp32.py"] + [
        f"{where}/{prefix}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
        for r in range(12)
        for prefix, kind in (("", "model"), ("bf16_", "optim"))
    ]
    assert rank_files(listing, 1, 12, where) == [
        f"{where}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        f"{where}/zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]  # not rank 10's or 11's
    with pytest.raises(RuntimeError, match="written by 12 ranks and this job has 8"):
        rank_files(listing, 0, 8, where)

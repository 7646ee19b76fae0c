"""`ray_kept`: the stages of one flow run share one Ray instead of starting their own.

Its own module: it needs a process where no Ray is running (test_infra_ray.py keeps one up
for its whole module).
"""

from __future__ import annotations

import pytest

from infra.ray_cluster import ray_kept, ray_session


def test_sessions_inside_ray_kept_share_one_cluster_stopped_at_the_end():
    import ray

    assert not ray.is_initialized()
    with ray_kept():
        assert not ray.is_initialized()  # started only when a stage asks for it
        with ray_session() as first:
            assert ray.get(ray.remote(lambda: 1).remote(), timeout=60) == 1
        assert ray.is_initialized(), "the first stage's Ray must outlive its session"
        with ray_session() as second:
            assert second == first
        with ray_kept():  # nested: one block
            with ray_session() as third:
                assert third == first
        assert ray.is_initialized()
    assert not ray.is_initialized()
    assert not first.temp_dir.exists()


def test_ray_kept_keeps_the_logs_when_the_block_fails():
    import ray

    with pytest.raises(RuntimeError, match="stage failed"):
        with ray_kept():
            with ray_session() as session:
                pass
            raise RuntimeError("stage failed")
    assert not ray.is_initialized()
    assert session.temp_dir.exists(), "Ray's logs are kept when the run failed"
    import shutil

    shutil.rmtree(session.temp_dir)

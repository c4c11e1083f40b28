"""PackLock: exclusive between loaders, shared for waiters, survives its file being removed."""

from __future__ import annotations

import os

from hmoe.shm.lock import PackLock


def test_exclusive_excludes_everyone(shm_config):
    first, second = PackLock("p", shm_config), PackLock("p", shm_config)
    assert first.acquire(timeout_s=0)
    assert not second.acquire(timeout_s=0)
    assert not second.acquire(exclusive=False, timeout_s=0.1)
    first.release()
    assert second.acquire(exclusive=False, timeout_s=0)
    assert PackLock("p", shm_config).acquire(exclusive=False, timeout_s=0)  # shared with shared
    assert not first.acquire(timeout_s=0)
    second.release()


def test_removed_lock_file_is_not_a_lock(shm_config):
    holder = PackLock("p", shm_config)
    holder.acquire()
    holder.remove_file()  # gc removed it while we held it
    newcomer = PackLock("p", shm_config)
    assert newcomer.acquire(timeout_s=0)  # locks a fresh file, not the orphaned inode
    assert os.path.exists(newcomer.path)
    newcomer.release()
    holder.release()


def test_context_manager_releases(shm_config):
    with PackLock("p", shm_config) as lock:
        assert lock.held
    assert not lock.held and PackLock("p", shm_config).acquire(timeout_s=0)

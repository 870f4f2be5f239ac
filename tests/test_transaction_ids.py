"""Transaction ids: 128 random bits each, unique, and never shared by forked workers
(the ids are read from the system 256 at a time; a child must not reuse the parent's)."""

from __future__ import annotations

import os

from luthien_control import transaction
from luthien_control.transaction import new_transaction_id


def test_ids_are_32_hex_digits_and_unique() -> None:
    ids = [new_transaction_id() for _ in range(2_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_forked_worker_does_not_reuse_the_parents_ids() -> None:
    new_transaction_id()  # the pool is full in the parent
    waiting = list(transaction._id_pool)
    assert waiting
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then exit without pytest's teardown
        os.write(write, "".join(new_transaction_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 1024).decode()
    os.close(read)
    child_ids = {child[i : i + 32] for i in range(0, len(child), 32)}
    assert len(child_ids) == 4
    assert not child_ids & set(waiting)

"""Error paths raise the documented exceptions, with messages a user can act on."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from pagein._abi import libc
from pagein.errors import UffdError, Unavailable, UnsupportedFeature
from pagein.sys import _uffd_api as uffd_api
from pagein.sys.mapping import PAGE_SIZE, Mapping
from pagein.sys.uffd import ApiInfo, Feature, RegisterMode, Userfaultfd

pytestmark = pytest.mark.kernel
P = PAGE_SIZE


def test_fill_of_an_unregistered_range_names_the_range() -> None:
    src = bytearray(P)
    with Mapping.anonymous(2 * P) as m, Userfaultfd.open() as u:
        with pytest.raises(UffdError) as e:
            u.copy(m.address, libc.buffer_address(src), P)
        assert e.value.errno in (errno.ENOENT, errno.EINVAL)
        assert f"0x{m.address:x}-0x{m.address + P:x}" in str(e.value)
        assert "UFFDIO_COPY" in str(e.value)
        u.wake(m.address, P)  # waking nobody is not an error
        u.register(m.address, P, RegisterMode.MISSING)
        with pytest.raises(UffdError) as e2:
            u.zeropage(m.address + P, P)  # the second page is not registered
        assert e2.value.start == m.address + P and e2.value.length == P


def test_misaligned_ranges_are_einval_with_a_hint() -> None:
    src = bytearray(2 * P)
    with Mapping.anonymous(4 * P) as m, Userfaultfd.open() as u:
        with pytest.raises(UffdError) as e:
            u.register(m.address + 1, P, RegisterMode.MISSING)
        assert e.value.errno == errno.EINVAL and "aligned" in str(e.value)
        u.register(m.address, 4 * P, RegisterMode.MISSING)
        for call in (lambda: u.copy(m.address + 8, libc.buffer_address(src), P),
                     lambda: u.copy(m.address, libc.buffer_address(src), P + 1),
                     lambda: u.zeropage(m.address, 0),
                     lambda: u.unregister(m.address, 100)):
            with pytest.raises(UffdError) as e:
                call()
            assert e.value.errno == errno.EINVAL and "aligned" in str(e.value)


def test_register_over_a_hole_or_a_busy_range() -> None:
    with Mapping.anonymous(4 * P) as m, Userfaultfd.open() as a, Userfaultfd.open() as b:
        m.close()  # now a hole
        with pytest.raises(UffdError) as e:
            a.register(m.address, P, RegisterMode.MISSING)
        assert e.value.errno in (errno.ENOMEM, errno.EINVAL)
    with Mapping.anonymous(P) as m, Userfaultfd.open() as a, Userfaultfd.open() as b:
        a.register(m.address, P, RegisterMode.MISSING)
        with pytest.raises(UffdError) as e:
            b.register(m.address, P, RegisterMode.MISSING)
        assert e.value.errno == errno.EBUSY and "another uffd" in str(e.value)


def test_minor_mode_on_private_anonymous_memory_is_refused() -> None:
    with Mapping.anonymous(P) as m, Userfaultfd.open() as u, pytest.raises(UffdError) as e:
        u.register(m.address, P, RegisterMode.MINOR)
    assert "MINOR needs shmem or hugetlbfs" in str(e.value)


def test_a_closed_uffd_raises_value_error_and_closes_once() -> None:
    u = Userfaultfd.open()
    fd = u.fileno()
    u.close()
    u.close()  # idempotent
    assert u.closed
    for call in (lambda: u.fileno(), lambda: u.read_events(),
                 lambda: u.register(0, P, RegisterMode.MISSING), lambda: u.wake(0, P),
                 lambda: u.copy(0, 0, P), lambda: u.zeropage(0, P)):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(OSError):
        os.fstat(fd)  # the fd really is closed


def test_unknown_feature_bit_is_named() -> None:
    with pytest.raises(UnsupportedFeature) as e:
        Userfaultfd.open(Feature(1 << 40))
    assert "unknown feature bit 40" in str(e.value)
    assert e.value.missing == ["unknown feature bit 40"]


def test_missing_feature_names_the_feature_and_the_kernel_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the kernel predates UFFDIO_MOVE: the real probe is replaced by its result
    # minus MOVE, so the message is the one an older kernel produces.
    real = uffd_api.supported_api()
    monkeypatch.setitem(uffd_api._SUPPORTED, False,
                        ApiInfo(real.features & ~Feature.MOVE, real.ioctls))
    with pytest.raises(UnsupportedFeature) as e:
        Userfaultfd.open(Feature.EVENT_REMOVE | Feature.MOVE)
    assert e.value.missing == ["UFFD_FEATURE_MOVE"]
    assert "Linux >= 6.8" in str(e.value)
    # Optional features are dropped silently instead.
    with Userfaultfd.open(Feature.EVENT_REMOVE, optional=Feature.MOVE) as u:
        assert u.api.features == Feature.EVENT_REMOVE


def test_enabled_features_are_exactly_those_asked_for() -> None:
    with Userfaultfd.open(Feature.EVENT_REMOVE | Feature.THREAD_ID) as u:
        assert u.api.features == Feature.EVENT_REMOVE | Feature.THREAD_ID
    with Userfaultfd.open(Feature.WP_ASYNC) as u:
        assert Feature.WP_UNPOPULATED in u.api.features  # the kernel implies it


def _as_nobody(fn_name: str) -> tuple[str, str]:
    """Run one probe in a forked child that dropped root; return (exception type, text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        out: tuple[str, str] = ("none", "")
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # drops every capability, CAP_SYS_PTRACE included
            if fn_name == "plain":
                Userfaultfd.open().close()
            else:
                Userfaultfd.open(Feature.EVENT_FORK, user_mode_only=True).close()
        except Exception as e:
            out = (type(e).__name__, str(e))
        finally:
            os.write(w, pickle.dumps(out))
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        os.waitpid(pid, 0)
    result: tuple[str, str] = pickle.loads(data)
    return result


def test_permission_errors_name_the_device_sysctl_and_capability() -> None:
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        unprivileged = f.read().strip()
    if unprivileged == "0":
        kind, text = _as_nobody("plain")
        assert kind == Unavailable.__name__
        assert "/dev/userfaultfd" in text and "vm.unprivileged_userfaultfd" in text
        assert "user_mode_only=True" in text
    kind, text = _as_nobody("fork")
    assert kind == UnsupportedFeature.__name__
    assert "UFFD_FEATURE_EVENT_FORK" in text and "CAP_SYS_PTRACE" in text

"""The listening socket's path: nothing done to it follows a symbolic link, and
its directory must be one no other user can change (OpenSSH's StrictModes).

The race a user who could write the directory might win (a link swapped in
between the bind and the chown/chmod) is made to happen every time: ``bind``
is wrapped so that the link is swapped in right after it.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from signd.server.listener import ListenerError, open_listener

NOBODY = 65534
GID = 4242

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another uid)")


def test_the_socket_gets_its_mode_and_group(tmp_path: Path) -> None:
    path = tmp_path / "signd.sock"
    sock = open_listener(str(path), 0o660, GID)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, GID)
    finally:
        sock.close()


def test_a_link_swapped_in_after_bind_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("someone else's file\n")
    victim.chmod(0o600)
    path = tmp_path / "run" / "signd.sock"
    path.parent.mkdir(mode=0o700)
    real_bind = socket.socket.bind

    def bind_then_swap(self: socket.socket, address: Any) -> None:
        real_bind(self, address)
        os.rename(path, path.with_name("moved.sock"))
        os.symlink(victim, path)

    monkeypatch.setattr(socket.socket, "bind", bind_then_swap)
    with pytest.raises(ListenerError, match="replaced after it was bound"):
        open_listener(str(path), 0o660, GID)
    st = os.stat(victim)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)


@pytest.mark.parametrize(
    ("owner", "mode", "message"),
    [
        (NOBODY, 0o775, "is owned by nobody (uid 65534), not by root; run: chown root"),
        (0, 0o770, "is writable by its group (mode 0770); run: chmod go-w"),
        (0, 0o777, "is writable by its group and others (mode 0777); run: chmod go-w"),
        (NOBODY, 0o1777, "is owned by nobody"),
    ],
)
def test_a_socket_directory_others_can_change_is_refused(
    tmp_path: Path, owner: int, mode: int, message: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, owner, owner)
    shared.chmod(mode)
    with pytest.raises(ListenerError) as info:
        open_listener(str(shared / "signd.sock"), 0o660)
    sock = shared / "signd.sock"
    assert f"server.socket {sock}: directory {shared} {message}" in str(info.value)
    assert not (shared / "signd.sock").exists()


def test_a_root_owned_sticky_directory_is_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    sock = open_listener(str(sticky / "signd.sock"), 0o660)
    sock.close()


def test_a_link_owned_by_another_user_on_the_way_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ListenerError, match=f"{link} is a symbolic link owned by nobody"):
        open_listener(str(link / "signd.sock"), 0o660)
    assert not (real / "signd.sock").exists()
